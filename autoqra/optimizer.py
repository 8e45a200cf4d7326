r"""Two-phase AutoQRA orchestration: the stages in order, over one trial runner.

Order of work: baselines (:mod:`autoqra.stages.baselines`) → calibration of the guidance on them →
Phase I (:mod:`autoqra.stages.phase1`: the searcher's generations climbing the fidelity ladder of
:mod:`autoqra.stages.ladder`) → Phase II (:mod:`autoqra.stages.phase2`, top rung only) → the final rung
(:mod:`autoqra.stages.final_rung`) → the answer. Every evaluation goes through the run's
:class:`~autoqra.stages.runner.TrialRunner` (store look-up, limits, executor, progress), so a killed search
re-run with the same seed replays to the same point and reads finished trials back.

Guidance (:mod:`autoqra.guidance.strategy`) is one object: :class:`~autoqra.guidance.strategy.CostGuidance`
with a calibrated cost model (the default), :class:`~autoqra.guidance.strategy.PriorGuidance` without. It
supplies the problem's tables, the Phase I searcher's selection and mutation, the screen ranking, the
calibration and any extra stop; the optimizer itself has no mode branches.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from autoqra.evaluators.base import Evaluator
from autoqra.executors.base import Executor
from autoqra.guidance.strategy import CostGuidance, Guidance, PriorGuidance
from autoqra.problem import Problem
from autoqra.progress import Progress
from autoqra.searchers.base import get_searcher
from autoqra.stages.baselines import run_baselines
from autoqra.stages.final_rung import FinalRung
from autoqra.stages.front import Front
from autoqra.stages.ladder import FidelityLadder
from autoqra.stages.phase1 import PhaseOne
from autoqra.stages.phase2 import run_phase2
from autoqra.stages.runner import LimitReached, Limits, TrialRunner
from autoqra.stages.settings import RunSummary, SearchSettings
from autoqra.store import TrialStore
from autoqra.trial import Trial

__all__ = ["AutoQRA", "LimitReached", "RunSummary", "SearchSettings"]

log = logging.getLogger(__name__)


class AutoQRA:
    """One search run. Build through :func:`autoqra.optimize`; call :meth:`run`.

    Args:
        problem: what is searched (space, memory model, budget, target, priors, repair, seed).
        evaluator: scores assignments (on ``problem.space`` with 16 bits added, for the reference).
        store: the trial store (finished trials are read back, never re-run).
        settings: fidelities, sizes and limits.
        fingerprint: the source model's fingerprint (part of every trial key).
        cost_model: the calibrated cost model (:class:`CostGuidance`; None: :class:`PriorGuidance`), or a
            :class:`~autoqra.guidance.strategy.Guidance` of the caller's.
        progress / executor: the live progress line; where trials run (default: this process).
        final_evaluator: ``make(seed)`` -> the final recipe's evaluator (:mod:`autoqra.stages.final_rung`); the
            final rung runs when it and ``settings.final`` are given (its trainings run in this process).
    """

    def __init__(self, problem: Problem, evaluator: Evaluator, store: TrialStore, settings: SearchSettings, *,
                 fingerprint: str, cost_model: Any = None, progress: Progress | None = None,
                 executor: Executor | None = None, final_evaluator: Any = None) -> None:
        st = self.settings = settings
        self.evaluator, self.store, self.fingerprint = evaluator, store, fingerprint
        self.guidance: Guidance = (cost_model if isinstance(cost_model, Guidance) else
                                   CostGuidance(cost_model, st.knapsack_k) if cost_model is not None else
                                   PriorGuidance(problem, st.use_surrogate))
        self.problem = self.guidance.prepare(problem)
        self.space, self.memory, self.budget_bytes, self.target = (problem.space, problem.memory, problem.budget_bytes,
                                                                   problem.target)
        self.runner = TrialRunner(store, evaluator, self.problem.footprint, self.problem.bytes_of, problem.budget_bytes,
                                  backend_spec=problem.memory.backend.spec(), fingerprint=fingerprint, executor=executor,
                                  limits=Limits(st.max_trials, st.time_limit), seed=problem.seed, progress=progress)
        self.front = Front(self.runner, self.problem, st.high.steps)
        self.ladder = FidelityLadder(st.low, st.high, st.mid, st.promote_k, st.use_surrogate)
        self.final_rung = FinalRung(st.final, final_evaluator) if st.final is not None and final_evaluator else None
        self.baseline_keys: dict[str, str] = {}
        self.stop_reasons: dict[str, str] = {}
        self.phase_one = PhaseOne(self.ladder, self.guidance, self.runner, self.front, st.pop_size, st.max_generations)
        self.phase2_batch = int(st.phase2_batch or self.runner.executor.n_workers)
        self.phase2_history: list = []
        self.final_choice: Trial | None = None
        self.final_seconds = 0.0

    @property
    def progress(self) -> Progress:
        return self.runner.progress

    @property
    def executor(self) -> Executor:
        return self.runner.executor

    def trials(self) -> list[Trial]:
        """This run's trials in candidate order (:meth:`TrialRunner.trials`)."""
        return self.runner.trials()

    def _searcher(self, spec: Any, **kw: Any):
        return get_searcher(spec, self.problem, offered=kw) if isinstance(spec, str) else get_searcher(spec, self.problem)

    def calibrate(self) -> None:
        """The guidance recalibrated on the baselines' real top-rung scores: a new problem for what follows."""
        self.problem = self.guidance.calibrate(self.problem, self.front.high_trials())  # footprint, budget unchanged
        if getattr(self.guidance, "calibration", None):
            log.info("cost model: quant_scale %.3f from %d baselines", self.guidance.calibration["quant_scale"],
                     self.guidance.calibration["trials"])

    def phase1(self) -> None:
        st = self.settings
        searcher = self._searcher(st.phase1, pop_size=st.pop_size, max_generations=st.max_generations,
                                  warm_start=st.warm_start, **self.guidance.phase1_options)
        self.stop_reasons["phase1"] = self.phase_one.run(searcher).stop_reason or "searcher done"

    def phase2(self) -> None:
        st = self.settings
        if st.phase2 is None:
            self.stop_reasons["phase2"] = "skipped"
            return
        self.stop_reasons["phase2"], self.phase2_history = run_phase2(
            lambda q: self._searcher(st.phase2, alpha=st.alpha, batch_size=q), self.runner, self.front, st.high,
            st.phase2_iterations, self.phase2_batch)

    def final(self) -> None:
        """The final rung: the answer is the entrant with the best mean validation score after the final recipe."""
        if self.final_rung is None:
            self.stop_reasons.setdefault("final", "off")
            return
        t0 = time.perf_counter()
        try:
            self.final_choice, self.stop_reasons["final"] = self.final_rung.stage(
                self.runner, self.front.feasible(), self.baseline_keys, self.problem, self.settings.high)
        finally:
            self.final_seconds = time.perf_counter() - t0

    def _plan(self) -> None:
        """What every stage will ask for at most, before the first trial (the limit caps the total)."""
        st, prog = self.settings, self.progress
        prog.limit = st.max_trials
        self.phase_one.plan()
        prog.plan("phase2", st.phase2_iterations if st.phase2 is not None else 0, st.high)
        if self.final_rung is not None:  # an estimate until the entrants are known
            fs = self.final_rung.settings
            prog.plan("final", (fs.candidates + 1) * len(fs.seeds), fs.fidelity)

    def run(self) -> RunSummary:
        """Run every stage (as far as the limits allow); return the run's summary."""
        stopped = None
        try:
            with self.progress:
                self._plan()
                run_baselines(self.runner, self.problem, self.settings.high, self.baseline_keys)
                self.calibrate()
                for stage in ("phase1", "phase2", "final"):
                    getattr(self, stage)()
                    self.progress.end(stage)
        except LimitReached as e:
            stopped = str(e)
            log.info("search stopped: %s", e)
        self.progress.finish(stopped)
        return self.summary(stopped)

    def summary(self, stopped: str | None = None) -> RunSummary:
        r, p1, fr = self.runner, self.phase_one.state, self.final_rung
        utility = self.front.choose(self.settings.alpha)
        return RunSummary(
            baselines=dict(self.baseline_keys), run_keys=r.run_keys,
            best=self.final_choice or self.front.choose(self.settings.choose_alpha),
            best_utility_key=getattr(utility, "key", None), front=self.front.front(),
            seed_key=r.key_of(p1.seed_assignment, self.settings.high) if p1.seed_assignment is not None else None,
            stopped=stopped, stop_reasons=dict(self.stop_reasons), hv_history=list(p1.hv_history),
            wall_seconds=r.wall_seconds(), eval_seconds=r.eval_seconds, trial_seconds=r.trial_seconds,
            n_evals=r.n_evals, n_run=r.n_run, executor=self.executor.describe(),
            phase2_batch=self.phase2_batch,
            guidance=self.guidance.report(r.trials(), self.settings.low.steps, self.settings.high.steps,
                                          self.space.n_units),
            phase2_history=self.phase2_history,
            final_rung=[e.to_dict() for e in fr.entries] if fr is not None else [], final_rung_seconds=self.final_seconds)

