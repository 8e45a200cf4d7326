r"""Text of progress lines: durations (``1m20s``) and assignments with runs folded (``b4r4×12 b8r4``)."""

from __future__ import annotations

from typing import Any


def fmt_duration(seconds: float) -> str:
    """``45s``, ``1m20s``, ``2h05m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def compact(assignment: Any, width: int = 60) -> str:
    """Short text of an assignment: runs of equal units folded (``b4r4×12 b8r4 b4r0×17``), cut at ``width``."""
    return fold([f"b{b}r{r}" for b, r in zip(assignment.bits, assignment.ranks)], width)


def fold(words: list[str], width: int = 60) -> str:
    """``words`` joined by spaces with runs of equal words folded (``b4r4×12``), cut at ``width``."""
    runs: list[list[Any]] = []
    for p in words:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    text = " ".join(p if n == 1 else f"{p}×{n}" for p, n in runs)
    return text if len(text) <= width else text[: width - 1] + "…"
