"""What a search's trials cost in wall time, for :class:`autoqra.progress.Progress`'s ETA.

:class:`TrialTimes` keeps the seconds of every trial that ran (not those read back from a store) by fidelity,
by stage and in all, and a line ``seconds = a + b * steps`` over the optimizer steps each trial actually ran
(the ``steps_run`` metric of :class:`~autoqra.evaluators.base.FitStats`; a rung that continued a saved state
paid only for the steps after it). A planned trial at a fidelity that has run costs that fidelity's mean; at
one that has not (a final rung training from scratch) it costs the line at its steps.
"""

from __future__ import annotations

import math
from typing import Any


class TrialTimes:
    """Seconds of the run trials, and the expected seconds of a planned one."""

    def __init__(self) -> None:
        self._secs: dict[Any, list[float]] = {}  # ("fid", label) / ("stage", stage) / "all" -> [sum, n]
        self._by_steps: list[tuple[float, float]] = []  # (optimizer steps it ran, seconds)

    def add(self, stage: str, label: str | None, seconds: float, steps_run: float | None) -> None:
        """A trial of ``stage`` at fidelity ``label`` ran for ``seconds`` (``steps_run``: its optimizer steps,
        None when unknown)."""
        for k in (("fid", label), ("stage", stage), "all"):
            acc = self._secs.setdefault(k, [0.0, 0])
            acc[0] += float(seconds)
            acc[1] += 1
        if steps_run is not None and math.isfinite(float(steps_run)):
            self._by_steps.append((float(steps_run), float(seconds)))

    def expected(self, stage: str, label: str | None, steps: int | None) -> float | None:
        """Seconds of a planned trial of ``stage`` at fidelity ``label`` (``steps`` optimizer steps): the mean of
        the trials run at that fidelity; else, for a trial trained from scratch, :meth:`line` at ``steps``; else
        the stage's, else all trials' mean; None before any trial ran."""
        acc = self._secs.get(("fid", label))
        if acc:
            return acc[0] / acc[1]
        if steps is not None:
            fit = self.line()
            if fit is not None:
                return max(0.0, fit[0] + fit[1] * steps)
        for k in (("stage", stage), "all"):
            acc = self._secs.get(k)
            if acc:
                return acc[0] / acc[1]
        return None

    def line(self) -> tuple[float, float] | None:
        """``(a, b)`` of the least-squares line ``seconds = a + b * steps`` over the run trials (``a, b >= 0``;
        through the origin when the free fit's intercept is negative); None while fewer than two distinct step
        counts have run."""
        if len({s for s, _ in self._by_steps}) < 2:
            return None
        x = [s for s, _ in self._by_steps]
        y = [t for _, t in self._by_steps]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        b = max(0.0, sum((u - mx) * (v - my) for u, v in zip(x, y)) / sum((u - mx) ** 2 for u in x))
        a = my - b * mx
        if a < 0:
            a, b = 0.0, sum(u * v for u, v in zip(x, y)) / sum(u * u for u in x)
        return a, b
