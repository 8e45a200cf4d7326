r"""Progress of one training run (``autoqra train``, the final training): :class:`StepBar` / :func:`step_bar`."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from autoqra.progress_text import fmt_duration, fold


class StepBar:
    """Progress of one training run: a rich bar (steps, loss, ETA) on a terminal, plain lines on stderr
    otherwise (at most one per 10 s, and the last step), nothing when disabled.

    Use through :func:`step_bar`; call :meth:`update` with the 0-based step after each optimizer step.
    """

    def __init__(self, total: int, enabled: bool, label: str, console: Console | None = None,
                 interval: float = 10.0) -> None:
        self.total, self.enabled, self.interval = total, enabled, interval
        self.label = fold(label.split(" "), 100)  # "final training · b4r4×30"
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self._bar: Any = None
        self._task: Any = None
        self._last_log = -math.inf
        self._first: tuple[int, float] | None = None
        self.t0 = time.perf_counter()

    def __enter__(self) -> StepBar:
        self.t0 = time.perf_counter()
        if self.enabled and self.console.is_terminal:
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                     console=self.console)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label[:70], total=self.total, loss="-")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def update(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step + 1, loss=f"{loss:.4f}")
            return
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._first is None:  # a resumed run starts mid-way: the ETA counts from here
            self._first = (step, now)
        if now - self._last_log >= self.interval or step + 1 == self.total:
            self._last_log = now
            s0, t0 = self._first
            rate = (now - t0) / (step - s0) if step > s0 else None
            eta = f" · ETA {fmt_duration(rate * (self.total - step - 1))}" if rate is not None and step + 1 < self.total else ""
            self.console.print(f"[{fmt_duration(now - self.t0):>6}] {self.label}: step {step + 1}/{self.total} "
                               f"· loss {loss:.4f}{eta}", markup=False, highlight=False)


def step_bar(total: int, enabled: bool = True, label: str = "training") -> StepBar:
    """A :class:`StepBar` context manager."""
    return StepBar(total, enabled, label)
