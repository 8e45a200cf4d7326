r"""Coverage: the share of the decoder blocks' weights a search space holds, and what it leaves out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from autoqra.discovery import Found, suffix
from autoqra.unit_types import WeightTensor

#: Share of decoder weights in the space below which :meth:`Coverage.warn` warns.
COVERAGE_WARN = 0.90


@attrs.frozen
class Coverage:
    """Share of the decoder blocks' weights (elements of weight matrices, routers excluded) in the space.

    Attributes:
        covered / total: weight elements in the space / in all decoder weight matrices but routers.
        left_out: ``(tensor name, elements, reason)`` of the matrices not in the space.
        suggest: ``target_modules`` entries that would add the left-out weights autoqra can quantize.
    """

    covered: int
    total: int
    left_out: tuple[tuple[str, int, str], ...] = ()
    suggest: tuple[str, ...] = ()

    @property
    def share(self) -> float:
        return self.covered / self.total if self.total else 1.0

    def line(self) -> str:
        """``covered: 99.8 % of decoder weights`` (plus what is left out, when something is)."""
        s = f"covered: {100 * self.share:.1f} % of decoder weights"
        if self.left_out:
            s += f" ({len(self.left_out)} weight matrices left out)"
        return s

    def warning(self) -> str | None:
        """The warning text when the share is below :data:`COVERAGE_WARN`, else ``None``."""
        if self.share >= COVERAGE_WARN:
            return None
        names = ", ".join(n for n, _, _ in self.left_out[:8]) + (" ..." if len(self.left_out) > 8 else "")
        msg = f"only {100 * self.share:.1f} % of the decoder weights are in the search space; left out (16-bit): {names}"
        if self.suggest:
            msg += f"; target_modules={list(self.suggest)} would add them"
        why = sorted({r for _, _, r in self.left_out if r != "not in target_modules"})
        if why:
            msg += "; cannot be quantized: " + "; ".join(why)
        return msg

    def to_dict(self) -> dict[str, Any]:
        return {"covered": self.covered, "total": self.total, "share": self.share,
                "left_out": [list(x) for x in self.left_out], "suggest": list(self.suggest)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Coverage:
        return cls(int(d["covered"]), int(d["total"]), tuple(tuple(x) for x in d.get("left_out", ())),
                   tuple(d.get("suggest", ())))


def coverage(found: Sequence[Found], chosen: Sequence[WeightTensor]) -> Coverage:
    """The :class:`Coverage` of ``chosen`` tensors among everything :func:`discover` found."""
    names = {t.name for t in chosen}
    total = covered = 0
    left: list[tuple[str, int, str]] = []
    suggest: dict[str, None] = {}
    for f in found:
        if f.reason == "router":
            continue
        total += f.tensor.numel
        if f.tensor.name in names:
            covered += f.tensor.numel
        elif f.reason is None:
            left.append((f.tensor.name, f.tensor.numel, "not in target_modules"))
            suggest[suffix(f.tensor)] = None
        else:
            left.append((f.tensor.name, f.tensor.numel, f.reason))
    return Coverage(covered, total, tuple(left), tuple(suggest))
