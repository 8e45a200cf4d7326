r"""The one way to get a trial's result: key, store look-up, limits, executor dispatch, progress.

:meth:`TrialRunner.evaluate_many` looks each trial up in the store first, dispatches the rest as one batch to
the executor (in this process, or on Ray workers) and stores each result the moment it arrives. Results are
kept in candidate order, so decisions never depend on which worker finished first; since searchers and the
surrogate are deterministic in the seed, re-running a killed search replays to the same point with finished
trials read back from the store (nothing finished is re-run). The optimizer's stages, the bench harness and
the benchmarks all evaluate through it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs

from autoqra.evaluators.base import EvalResult, Evaluator, Fidelity
from autoqra.executors.base import Executor, LocalExecutor
from autoqra.memory.model import MemoryBreakdown
from autoqra.progress import Progress
from autoqra.space import Assignment
from autoqra.store import TrialStore, trial_key
from autoqra.trial import Trial


class LimitReached(Exception):
    """The trial or time limit was reached: the search stops and returns what it has.

    Attributes:
        results: for a batch cut by the limit, its results in candidate order (``None`` for
            items not evaluated).
    """

    def __init__(self, message: str, results: list[EvalResult | None] | None = None) -> None:
        super().__init__(message)
        self.results = results or []


@attrs.frozen
class Limits:
    """``max_trials``: evaluations (run or read back; None = no cap); ``time_limit``: seconds since the runner
    started, checked as each trial starts (None = none)."""

    max_trials: int | None = None
    time_limit: float | None = None


class TrialRunner:
    """Evaluates batches of assignments for one run and keeps the run's trials in candidate order.

    Args:
        store: the trial store (finished trials are read back, never re-run).
        evaluator: the search's evaluator (its spec keys the trials).
        footprint: ``footprint(a) -> MemoryBreakdown`` (:meth:`autoqra.problem.Problem.footprint`).
        budget_bytes / bytes_of: the budget (None: none, e.g. a benchmark's final trainings) and ``bytes_of(a)`` on
            its target (for progress and the record).
        backend_spec / fingerprint: the rest of every trial's key.
        executor: where trials run (default: this process).
        limits: trial and time limits; seed: stored with each trial; progress: the live view.
    """

    def __init__(self, store: TrialStore, evaluator: Evaluator, footprint: Callable[[Assignment], MemoryBreakdown],
                 bytes_of: Callable[[Assignment], int], budget_bytes: int | None, *, backend_spec: dict, fingerprint: str,
                 executor: Executor | None = None, limits: Limits = Limits(), seed: int = 0,
                 progress: Progress | None = None) -> None:
        self.store, self.evaluator, self.footprint, self.bytes_of = store, evaluator, footprint, bytes_of
        self.budget_bytes, self.backend_spec, self.fingerprint = budget_bytes, backend_spec, fingerprint
        self.evaluator_spec = evaluator.spec()
        self.executor = executor or LocalExecutor(evaluator)
        self.limits, self.seed = limits, seed
        self.progress = progress or Progress(enabled=False)
        # stored in each new trial's ``extra`` (a caller outside a search replaces them with its own)
        self.tags: dict[str, Any] = {"generation": 0, "budget_bytes": budget_bytes}
        self.t0 = time.perf_counter()
        self.n_evals = 0  # evaluations run or read back in this process (limits count both)
        self.n_run = 0  # evaluations actually run in this process
        self.eval_seconds = 0.0  # time blocked on the executor
        self.trial_seconds = 0.0  # sum of the trials' own seconds (> wall time with parallel workers)
        # this run's trials in candidate order (the store may hold more) -> the phase that first asked for each
        self.run_phase: dict[str, str] = {}

    def key_of(self, a: Assignment, fidelity: Fidelity, evaluator: Evaluator | None = None) -> str:
        """Trial-store key of ``a`` at ``fidelity`` in this run (``evaluator``: another than the search's)."""
        spec = self.evaluator_spec if evaluator is None else evaluator.spec()
        return trial_key(a, fidelity, spec, self.backend_spec, self.fingerprint)

    def evaluate(self, a: Assignment, fidelity: Fidelity, phase: str) -> EvalResult:
        """One trial: a batch of one of :meth:`evaluate_many`."""
        return self.evaluate_many([a], fidelity, phase)[0]

    def trial(self, a: Assignment, fidelity: Fidelity, phase: str, evaluator: Evaluator | None = None) -> tuple[Trial, bool]:
        """The stored trial of ``a`` at ``fidelity`` (evaluated first when the store lacks it) and whether it ran
        now."""
        n = self.n_run
        self.evaluate_many([a], fidelity, phase, evaluator)
        t = self.store.get(self.key_of(a, fidelity, evaluator))
        if t is None:  # cannot happen: evaluate_many stores what it runs
            raise RuntimeError("the trial was not stored")
        return t, self.n_run > n

    def evaluate_many(self, assignments: list[Assignment], fidelity: Fidelity, phase: str,
                      evaluator: Evaluator | None = None) -> list[EvalResult]:
        """Evaluate a batch at ``fidelity``; returns results in candidate order.

        Stored trials are read back; repeats within the batch are evaluated once; the rest go to the executor as
        one batch and each result is stored (durably) as it finishes. The limits count evaluations exactly as
        one-at-a-time evaluation does: with ``max_trials`` landing mid-batch only what fits is evaluated; the
        time limit is checked as each trial starts. When a limit cuts the batch, what finished is stored and
        ``LimitReached`` raised. ``evaluator``: evaluate with another evaluator than the search's (the final
        rung's recipe), in this process; its spec keys the trials.

        Raises:
            LimitReached: the trial or time limit stopped the batch (``.results`` has what finished).
        """
        keys = [self.key_of(a, fidelity, evaluator) for a in assignments]
        results: list[EvalResult | None] = [None] * len(assignments)
        cached: dict[int, EvalResult] = {}  # index -> stored result
        first: dict[str, int] = {}  # key -> index of its first occurrence in the batch
        todo: list[int] = []  # indices to evaluate, in candidate order
        n, cut, reason, cap = self.n_evals, len(assignments), None, self.limits.max_trials
        for i, key in enumerate(keys):
            # stored trials and repeats count like new ones, so what a shared store holds never changes
            # how many trials a run makes (a limit-matched ablation gets exactly its budget)
            if cap is not None and n >= cap:
                cut, reason = i, f"trial limit {cap} reached"
                break
            n += 1
            if key in first:  # a repeat reads its first occurrence back, like a stored trial
                continue
            first[key] = i
            old = self.store.get(key)
            if old is not None:
                cached[i] = old.result
                continue
            todo.append(i)
        if todo:
            executor = self.executor if evaluator is None else LocalExecutor(evaluator)
            stop_at = self._dispatch(assignments, keys, todo, fidelity, phase, results, executor)
            if stop_at is not None and stop_at < cut:
                cut, reason = stop_at, f"time limit {self.limits.time_limit:.0f} s reached"
        ran = set(todo)
        for i in range(cut):  # bookkeeping in candidate order, independent of completion order
            res = results[i] if i in ran else cached.get(i, results[first[keys[i]]])
            if res is None:  # cannot happen: every item before the cut finished
                raise RuntimeError(f"trial {i} of a batch did not finish")
            results[i] = res
            self.run_phase.setdefault(keys[i], phase)
            self.n_evals += 1
            if i not in ran:
                self._report(phase, assignments[i], fidelity, res, cached=True)
        if reason is not None:
            raise LimitReached(reason, results=results[:cut] + [None] * (len(assignments) - cut))
        return results  # type: ignore[return-value]

    def _dispatch(self, assignments: list[Assignment], keys: list[str], todo: list[int], fidelity: Fidelity,
                  phase: str, results: list[EvalResult | None], executor: Executor) -> int | None:
        """Run ``todo`` on the executor, storing each result as it finishes; returns the batch index
        of the first item the time limit kept from starting (None when all ran)."""
        stopped: list[int] = []
        limit = self.limits.time_limit

        def may_start(j: int) -> bool:
            if limit is not None and time.perf_counter() - self.t0 >= limit:
                stopped.append(todo[j])
                return False
            self.progress.running(phase, assignments[todo[j]], fidelity)
            return True

        it = iter(executor.submit_batch([(assignments[i], fidelity) for i in todo], may_start))
        while True:
            t = time.perf_counter()
            try:
                done = next(it)
            except StopIteration:
                break
            finally:  # time blocked on the executor counts as evaluation time (meaningful with workers)
                self.eval_seconds += time.perf_counter() - t
            i, res = todo[done.index], done.result
            results[i] = res
            self.n_run += 1
            self.trial_seconds += res.seconds
            self.store.put(Trial(
                assignments[i], fidelity, phase, res, self.footprint(assignments[i]), keys[i], seed=self.seed,
                extra={**self.tags, "worker": done.worker}))
            self._report(phase, assignments[i], fidelity, res, cached=False)
        return stopped[0] if stopped else None

    def _report(self, phase: str, a: Assignment, fidelity: Fidelity, res: EvalResult, cached: bool) -> None:
        """One finished (or read back) trial to the progress view."""
        nb = self.bytes_of(a)
        self.progress.trial(phase, res, cached, fidelity=fidelity, assignment=a, nbytes=nb,
                            feasible=None if self.budget_bytes is None else nb <= self.budget_bytes)

    @property
    def run_keys(self) -> list[str]:
        """This run's trial keys in candidate order."""
        return list(self.run_phase)

    def trials(self) -> list[Trial]:
        """This run's trials in candidate order (read back from the store), whatever order workers finished in.

        Only this run's own trials count, never others a shared store holds: that keeps a re-run's decisions
        identical to the first run's, which is what makes resume exact. Each trial's ``phase`` is this run's (a
        trial read back may have been stored by another search, in another phase).
        """
        return [attrs.evolve(t, phase=phase) for k, phase in self.run_phase.items() if (t := self.store.get(k)) is not None]

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.t0
