r"""Progress of a run, told the same way on a terminal and in a log file.

* :class:`Progress`: a search and its preparation. On a terminal, a live view (rich); otherwise plain
  lines on stderr (one per phase start, per finished trial, per preparation step); when disabled, the
  same lines as ``INFO`` records of the ``autoqra.progress`` logger (shown only where logging is set up
  to show them, e.g. by ``autoqra bench``).
* :class:`StepBar` (:func:`step_bar`): one training run (``autoqra train``).

Counting. A search's number of trials is not known in advance (promotions, early stops, limits), so
:class:`Progress` holds a *planned* count per stage that the optimizer raises and lowers as it decides:
:meth:`Progress.plan` says how many evaluations a stage will still ask for (at each fidelity), :meth:`Progress.end`
trims a stage to what it did, :meth:`Progress.finish` trims everything when the search ends or stops. A trial
read back from the store counts as done (shown as ``stored``). So ``done <= planned`` at every moment and the
two meet at the end. A new stage (e.g. a final rung) needs nothing more than ``plan(stage, n, fidelity)``
before its batches and ``end(stage)`` after them, with its trials reported under the same stage name.

Parts in their own modules, re-exported here: the text of the lines (:func:`fmt_duration`, :func:`compact`,
:func:`fold`) in :mod:`autoqra.progress_text`, :class:`StepBar` in :mod:`autoqra.step_bar`; what trials cost
(the ETA's :class:`~autoqra.progress_eta.TrialTimes`) in :mod:`autoqra.progress_eta`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from autoqra.progress_eta import TrialTimes
from autoqra.progress_text import compact, fmt_duration, fold  # noqa: F401
from autoqra.step_bar import StepBar, step_bar  # noqa: F401

log = logging.getLogger(__name__)

#: A preparation step's progress callback: ``fn(step, done, total, unit="units")``, e.g.
#: ``fn("KL table", 12, 30)``; ``done = 0`` when the step starts.
ProgressFn = Callable[..., None]


def _fid(fidelity: Any) -> tuple[str | None, int | None]:
    """``(label, steps)`` of a :class:`~autoqra.evaluators.base.Fidelity` (or a label / step count / None)."""
    if fidelity is None:
        return None, None
    if isinstance(fidelity, int):
        return str(fidelity), fidelity
    if isinstance(fidelity, str):
        return fidelity, None
    steps = getattr(fidelity, "steps", None)
    return (getattr(fidelity, "name", "") or str(steps)), steps


class Progress:
    """Progress of a search: trials done / planned, best score, ETA; and the preparation before it.

    Use as a context manager around the work (nesting is fine: only the outermost one draws and closes the
    live view). Events: :meth:`plan` / :meth:`end` / :meth:`finish` (the planned count), :meth:`phase` (a
    phase starts), :meth:`running` / :meth:`trial` (one evaluation), :meth:`front`, :meth:`step` /
    :meth:`callback` (a preparation step's units), :meth:`note` (a one-off preparation line).

    Args:
        enabled: show progress: a live view on a terminal, plain lines otherwise. ``False``: no view, the
            lines go to the ``autoqra.progress`` logger at ``INFO``.
        console: where to draw (default: a rich console on stderr).
        interval: at most one line per this many seconds for one preparation step in line mode (its start
            and its last unit always get one).
    """

    def __init__(self, enabled: bool = True, *, console: Console | None = None, interval: float = 5.0) -> None:
        self.enabled, self.interval = enabled, interval
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.live_capable = enabled and self.console.is_terminal
        self.limit: int | None = None  # trial limit: planned never exceeds it
        self._plan: dict[tuple[str, str | None], int] = {}  # (stage, fidelity label) -> planned evaluations
        self._done: dict[tuple[str, str | None], int] = {}
        self._steps: dict[str | None, int | None] = {}  # fidelity label -> optimizer steps
        self.times = TrialTimes()  # what the run trials cost: the ETA
        self.stored = 0
        self.n_run = 0
        self._best: dict[str | None, float] = {}  # fidelity label -> best ok (feasible) score
        self.front_size = 0
        self.label = ""
        self.current = ""
        self.prep = ""
        self.finished: str | None = None
        self.t0 = time.perf_counter()
        self._live: Any = None
        self._depth = 0
        self._step_key: tuple[str, int] | None = None
        self._step_t0 = 0.0
        self._step_last = -math.inf

    # -------------------------------------------------------------- context
    def __enter__(self) -> Progress:
        self._depth += 1
        if self._depth == 1 and self.live_capable:
            self._live = Live(self._render(), console=self.console, refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        if exc and exc[0] is not None:  # stopped by an exception: nothing more will run
            self._trim()
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    # ------------------------------------------------------------- counting
    @property
    def done(self) -> int:
        """Evaluations finished (run or read back from the store)."""
        return sum(self._done.values())

    @property
    def planned(self) -> int:
        """Evaluations planned in all: what is done plus what the stages still expect (capped by ``limit``)."""
        total = sum(max(self._plan.get(k, 0), self._done.get(k, 0)) for k in {*self._plan, *self._done})
        if self.limit is not None:
            total = min(total, self.limit)
        return max(total, self.done)

    @property
    def total(self) -> int | None:
        """The planned count (None before anything is planned or done)."""
        return self.planned if (self._plan or self._done) else None

    def plan(self, stage: str, n: int, fidelity: Any = None) -> None:
        """From now on ``stage`` asks for ``n`` more evaluations (at ``fidelity``, when given; a stage may plan
        each fidelity it uses). Replaces the stage's earlier estimate for that fidelity."""
        label, steps = _fid(fidelity)
        self._steps.setdefault(label, steps)
        key = (stage, label)
        self._plan[key] = self._done.get(key, 0) + max(0, int(n))
        self._refresh()

    def end(self, stage: str) -> None:
        """``stage`` is over: its planned count becomes what it did."""
        for key in self._plan:
            if key[0] == stage:
                self._plan[key] = self._done.get(key, 0)
        self._refresh()

    def _trim(self) -> None:
        self._plan = dict(self._done)
        self.limit = None

    def finish(self, stopped: str | None = None) -> None:
        """The search is over (``stopped``: why it stopped early): planned becomes done; one summary line."""
        self._trim()
        self.finished = stopped or "done"
        head = f"search stopped ({stopped})" if stopped else "search done"
        best = self._best_text()
        self._line(f"{head}: {self.done}/{self.planned} trials ({self.stored} stored, {self.n_run} run)"
                   + (f" · {best}" if best else "") + f" · {fmt_duration(self.elapsed())}", always=True)

    # --------------------------------------------------------------- events
    def phase(self, label: str, n: int, line: bool = True, upto: bool = False) -> None:
        """A phase (or one batch of it) starts with ``n`` candidates (``upto``: at most); ``line=False``: the live
        label only."""
        self.label, self.prep = label, ""
        if line:
            eta = self.eta()
            self._line(f"{label}: {'up to ' if upto else ''}{n} candidate{'s' if n != 1 else ''} · "
                       f"trials {self.done}/{self.planned} so far"
                       + (f" · ETA {fmt_duration(eta)}" if eta is not None else ""), always=True)
        self._refresh()

    def running(self, phase: str, assignment: Any, fidelity: Any) -> None:
        label, steps = _fid(fidelity)
        self.current = f"{label or steps} · {compact(assignment)}"
        self._refresh()

    def trial(self, phase: str, result: Any, cached: bool, *, fidelity: Any = None, assignment: Any = None,
              nbytes: int | None = None, feasible: bool | None = None) -> None:
        """One evaluation of ``phase`` finished (``cached``: read back from the store, not run).

        ``fidelity`` / ``assignment`` / ``nbytes`` (budget-target bytes) / ``feasible`` (within the budget)
        are shown in its line; the best score is the best feasible one at the highest fidelity seen.
        """
        label, steps = _fid(fidelity)
        self._steps.setdefault(label, steps)
        key = (phase, label)
        if key not in self._plan and (phase, None) in self._plan:  # the stage planned without fidelities
            key = (phase, None)
        self._done[key] = self._done.get(key, 0) + 1
        if cached:
            self.stored += 1
        else:
            self.n_run += 1
            ran = result.metrics.get("steps_run", steps)  # a continued rung runs fewer
            self.times.add(phase, label, result.seconds, ran)
        if result.ok and feasible is not False:
            self._best[label] = max(self._best.get(label, -math.inf), float(result.score))
        parts = [f"trial {self.done}/{self.planned}", phase, *([label] if label else [])]
        if assignment is not None:
            parts.append(compact(assignment))
        parts.append(f"score {result.score:.4f}" if result.ok else f"{result.status}")
        if nbytes is not None:
            parts.append(f"{nbytes / 1e6:.2f} MB" + (" (over budget)" if feasible is False else ""))
        parts.append("stored" if cached else f"{result.seconds:.1f}s")
        best = self._best_text()
        if best:
            parts.append(best)
        eta = self.eta()
        parts.append(f"ETA {fmt_duration(eta)}" if eta is not None else "ETA –")
        self.current = ""
        self._line(" · ".join(parts))
        self._refresh()

    def front(self, n: int) -> None:
        self.front_size = n
        self._refresh()

    def note(self, text: str) -> None:
        """A one-off preparation line (``"cost model: read back from the store"``)."""
        self.prep = text
        self._line(text, always=True)
        self._refresh()

    def step(self, what: str, done: int, total: int, unit: str = "units") -> None:
        """Units ``done`` of ``total`` of a preparation step (``what``: ``"cost model: KL table"``); ``done = 0``
        starts it. Line mode: its start, its last unit, and at most one line per ``interval`` seconds between."""
        now = time.perf_counter()
        key = (what, total)
        if key != self._step_key or done == 0:
            self._step_key, self._step_t0, self._step_last = key, now, -math.inf
        eta = (now - self._step_t0) / done * (total - done) if 0 < done < total else None
        text = f"{what} {done}/{total} {unit}" + (f" · ETA {fmt_duration(eta)}" if eta is not None else "") \
            + (f" · {fmt_duration(now - self._step_t0)}" if done == total else "")
        self.prep = text
        if done == 0 or done >= total or now - self._step_last >= self.interval:
            self._step_last = now
            self._line(text)
        self._refresh()

    def callback(self, prefix: str) -> ProgressFn:
        """A :data:`ProgressFn` for a library function: ``fn(step, done, total, unit)`` → :meth:`step` of
        ``"<prefix>: <step>"``."""
        def fn(step: str, done: int, total: int, unit: str = "units") -> None:
            self.step(f"{prefix}: {step}", done, total, unit)
        return fn

    # ------------------------------------------------------------ rendering
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self) -> float | None:
        """Seconds left for what is planned (None before any trial has run)."""
        if not self.n_run:
            return None
        left, secs = 0, 0.0
        for key, p in self._plan.items():
            n = p - self._done.get(key, 0)
            if n > 0:
                m = self.times.expected(key[0], key[1], self._steps.get(key[1]))
                left, secs = left + n, secs + n * (m or 0.0)
        cap = self.planned - self.done  # a trial limit cuts the plan
        return secs * (cap / left) if left > cap and left > 0 else secs

    def _best_text(self) -> str:
        if not self._best:
            return ""
        label = max(self._best, key=lambda lb: (self._steps.get(lb) or 0))
        return f"best {self._best[label]:.4f}" + (f" ({label})" if label else "")

    def text(self) -> str:
        """The live view's first line (the same counts as the lines)."""
        eta = self.eta()
        parts = [
            self.label or "preparing",
            f"trials {self.done}/{self.planned}" + (f" ({self.stored} stored)" if self.stored else ""),
            self._best_text() or "best –",
            f"front {self.front_size}",
            f"elapsed {fmt_duration(self.elapsed())}",
            f"ETA {fmt_duration(eta)}" if eta is not None else "ETA –",
        ]
        return " · ".join(parts)

    def _render(self) -> Text:
        sub = self.current and f"running: {self.current}" or (self.prep if not self.label else "")
        return Text(self.text() + (f"\n  {sub}" if sub else ""))

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _line(self, text: str, always: bool = False) -> None:
        """One progress line: printed in line mode (``always``: above the live view too), logged when disabled."""
        stamped = f"[{fmt_duration(self.elapsed()):>6}] {text}"
        if not self.enabled:
            log.info("%s", stamped)
        elif self._live is None:
            self.console.print(stamped, markup=False, highlight=False)
        elif always:
            self._live.console.print(text, markup=False, highlight=False)
