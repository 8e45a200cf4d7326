r"""Live progress of a search (rich): phase, generation, trials done/total, best score, front size, ETA."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

log = logging.getLogger(__name__)


class Progress:
    """A one-line live view; falls back to logging when disabled or not on a terminal.

    Args:
        total: expected number of evaluations (for the bar and the ETA), if known.
        enabled: draw the live view (``False`` → only log lines).
    """

    def __init__(self, total: int | None = None, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled
        self.done = self.cached = 0
        self.best = -math.inf
        self.front_size = 0
        self.label = ""
        self.current = ""
        self.t0 = time.perf_counter()
        self.run_seconds = 0.0
        self.n_run = 0
        self._live: Any = None

    # -------------------------------------------------------------- context
    def __enter__(self) -> Progress:
        if self.enabled:
            console = Console(stderr=True)
            if console.is_terminal:
                self._live = Live(self._render(), console=console, refresh_per_second=2, transient=False)
                self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    # --------------------------------------------------------------- events
    def phase(self, label: str, n: int) -> None:
        self.label = label
        log.info("%s (%d candidates)", label, n)
        self._refresh()

    def running(self, phase: str, assignment: Any, fidelity: Any) -> None:
        self.current = f"{fidelity.name or fidelity.steps} · {assignment.short()[:60]}"
        self._refresh()

    def trial(self, phase: str, result: Any, cached: bool) -> None:
        self.done += 1
        self.cached += int(cached)
        if not cached:
            self.n_run += 1
            self.run_seconds += result.seconds
        if result.ok:
            self.best = max(self.best, result.score)
        log.info("[%s] %s score=%.4f %s%.1fs", phase, result.status, result.score, "cached " if cached else "", result.seconds)
        self._refresh()

    def front(self, n: int) -> None:
        self.front_size = n
        self._refresh()

    # ------------------------------------------------------------ rendering
    def eta(self) -> float | None:
        if self.total is None or self.n_run == 0:
            return None
        return max(0, self.total - self.done) * self.run_seconds / self.n_run

    def text(self) -> str:
        tot = f"/{self.total}" if self.total else ""
        eta = self.eta()
        parts = [
            self.label or "starting",
            f"trials {self.done}{tot}" + (f" ({self.cached} from store)" if self.cached else ""),
            f"best {self.best:.4f}" if math.isfinite(self.best) else "best –",
            f"front {self.front_size}",
            f"elapsed {time.perf_counter() - self.t0:,.0f}s",
            f"ETA ~{eta:,.0f}s" if eta is not None else "ETA –",
        ]
        return " · ".join(parts)

    def _render(self) -> Text:
        return Text(self.text() + (f"\n  running: {self.current}" if self.current else ""))

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())


class StepBar:
    """Progress of one training run: a rich bar (steps, loss, ETA) on a terminal, log lines otherwise.

    Use through :func:`step_bar`; call :meth:`update` with the 0-based step after each optimizer step.
    """

    def __init__(self, total: int, enabled: bool, label: str) -> None:
        self.total, self.enabled, self.label = total, enabled, label
        self._bar: Any = None
        self._task: Any = None
        self._last_log = 0.0

    def __enter__(self) -> StepBar:
        if self.enabled:
            console = Console(stderr=True)
            if console.is_terminal:
                self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                         console=console)
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
        now = time.perf_counter()
        if self.enabled and (now - self._last_log > 10 or step + 1 == self.total):
            self._last_log = now
            log.info("%s: step %d/%d loss %.4f", self.label, step + 1, self.total, loss)


def step_bar(total: int, enabled: bool = True, label: str = "training") -> StepBar:
    """A :class:`StepBar` context manager."""
    return StepBar(total, enabled, label)
