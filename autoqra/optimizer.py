r"""Two-phase AutoQRA orchestration over the Searcher / Evaluator interfaces.

The optimizer owns what searchers must not: budget repair (through the context), fidelities,
the trial store and the limits. Every evaluation goes through :meth:`AutoQRA.evaluate_many`, which
looks each trial up in the store first, dispatches the rest as one batch to the executor (in this
process, or on Ray workers) and stores each result the moment it arrives. Results are kept in
candidate order, so decisions never depend on which worker finished first; since searchers and
the surrogate are deterministic in the seed, re-running a killed search replays to the same point
with finished trials read back from the store (nothing finished is re-run).

Batches: the baselines; each Phase-I generation's low-fidelity offspring, then its promotions;
Phase-II asks of ``phase2_batch`` points (default: the executor's worker count, 1 locally).

Order of work: baselines (uniform bits at the largest feasible rank, 16-bit reference) →
Phase I (multi-fidelity NSGA-II) → Phase II (on high-fidelity trials only) → choice of the best
feasible point.

Guidance (``cost_model``): with the calibrated cost model (:mod:`autoqra.guidance.costmodel`, the default) the
repair, the warm start, the mutations and Phase II's prior are in nats per byte; Phase I screens every
offspring at the low fidelity (0 steps: apply + held-out loss), ranks them by the screen score plus
the cost model's predicted rank gain, trains the best at the mid rung and continues the best of those
to high (rungs continue each other in the evaluator); its selection and stop follow the score. The
warm-start seed (the first Phase I candidate) is always evaluated at high fidelity, so the result can
say whether the search beat it. Without a cost model (``guidance="priors"``) the landed behaviour
stays: importance priors, MLP-surrogate promotion from low to high, hypervolume stop.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import attrs
import numpy as np

from autoqra.config import OptimizeConfig
from autoqra.evaluators.base import EvalResult, Evaluator, Fidelity
from autoqra.executors.base import Executor, LocalExecutor
from autoqra.guidance.costmodel import calibrate_quant_scale
from autoqra.guidance.importance import spearman
from autoqra.pareto import HVStagnation, hypervolume_2d, pareto_mask
from autoqra.problem import Problem
from autoqra.progress import Progress
from autoqra.quant_backends import UNQUANTIZED_BITS
from autoqra.searchers.base import get_searcher
from autoqra.searchers.surrogate import PairRecord, Surrogate
from autoqra.space import Assignment
from autoqra.stages.final_rung import FinalRung, FinalRungSettings
from autoqra.store import TrialStore, trial_key
from autoqra.trial import Trial

log = logging.getLogger(__name__)


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
class SearchSettings:
    """How the optimizer searches (fidelities, sizes, limits), resolved from an :class:`OptimizeConfig`.

    Attributes:
        low / mid / high: the fidelities (optimizer steps); ``mid`` None = no middle rung.
        phase1 / phase2: searcher names or instances (``phase2`` None skips Phase II).
        pop_size, promote_k, max_generations: Phase I sizes; phase2_iterations: Phase II evaluations.
        alpha: Phase II utility weight (paper variants); choose_alpha: weight of the final choice (1.0 = best
            score under the budget).
        use_surrogate: promote by prediction (False promotes every offspring); warm_start: the seed rule.
        max_trials / time_limit: limits (evaluations, seconds); phase2_batch: points per Phase II ask.
        phase1_options: further Phase I searcher settings (objectives, mutation, knapsack_k).
    """

    low: Fidelity
    high: Fidelity
    mid: Fidelity | None = None
    phase1: Any = "nsga2"
    phase2: Any = "local"
    pop_size: int = 10
    promote_k: int = 2
    max_generations: int = 2
    phase2_iterations: int = 4
    alpha: float = 0.6
    choose_alpha: float = 1.0
    use_surrogate: bool = True
    warm_start: str = "anchored"
    max_trials: int | None = None
    time_limit: float | None = None
    phase2_batch: int | None = None
    phase1_options: dict[str, Any] = attrs.Factory(dict)
    final: FinalRungSettings | None = None

    @classmethod
    def from_config(cls, cfg: OptimizeConfig, *, guided: bool, phase1: Any = None, phase2: Any = None) -> SearchSettings:
        """Settings of ``cfg`` (``phase1`` / ``phase2``: searcher instances that replace the config's names).

        ``guided``: a cost model guides the search (score selection, swap moves, knapsack seeds in Phase I);
        otherwise the paper's Pareto selection and mutation.
        """
        mid = cfg.resolved("mid_steps")
        opts = ({"objectives": "score", "mutation": "swap", "knapsack_k": cfg.knapsack_k} if guided
                else {"objectives": "pareto", "mutation": "paper", "knapsack_k": 0})
        return cls(
            low=Fidelity(cfg.resolved("low_steps"), "low"), high=Fidelity(cfg.resolved("high_steps"), "high"),
            mid=Fidelity(mid, "mid") if mid is not None else None,
            phase1=phase1 if phase1 is not None else cfg.phase1, phase2=phase2 if phase2 is not None else cfg.phase2,
            pop_size=cfg.resolved("pop_size"), promote_k=cfg.resolved("promote_k"),
            max_generations=cfg.resolved("max_generations"), phase2_iterations=cfg.resolved("phase2_iterations"),
            alpha=cfg.alpha, choose_alpha=cfg.choose_alpha, use_surrogate=cfg.use_surrogate,
            warm_start=cfg.warm_start, max_trials=cfg.max_trials, time_limit=cfg.time_limit,
            phase2_batch=cfg.phase2_batch, phase1_options=opts,
            final=FinalRungSettings(cfg.resolved("final_steps"), [cfg.seed + i for i in range(cfg.resolved("final_seeds"))],
                                    cfg.resolved("final_candidates"), cfg.final_uniform_margin) if cfg.final_rung else None)


class AutoQRA:
    """One search run. Build through :func:`autoqra.optimize`; call :meth:`run`.

    Args:
        problem: what is searched (space, memory model, budget, target, priors, repair, seed).
        evaluator: scores assignments (on ``problem.space`` with 16 bits added, for the reference).
        store: the trial store (finished trials are read back, never re-run).
        settings: fidelities, sizes and limits.
        fingerprint: the source model's fingerprint (part of every trial key).
        cost_model: the calibrated cost model (None: priors guidance).
        progress / executor: the live progress line; where trials run (default: this process).
        final_evaluator: ``make(seed)`` -> the final recipe's evaluator (:mod:`autoqra.stages.final_rung`); the
            final rung runs when it and ``settings.final`` are given (its trainings run in this process).
    """

    def __init__(self, problem: Problem, evaluator: Evaluator, store: TrialStore, settings: SearchSettings, *,
                 fingerprint: str, cost_model: Any = None, progress: Progress | None = None,
                 executor: Executor | None = None, final_evaluator: Any = None) -> None:
        self.problem, self.settings, self.evaluator, self.store = problem, settings, evaluator, store
        self.space, self.memory = problem.space, problem.memory
        self.memory_eval = self.memory.with_space(evaluator.space) if evaluator.space.bits != self.space.bits \
            else self.memory
        self.budget_bytes, self.target, self.seed = problem.budget_bytes, problem.target, problem.seed
        self.fingerprint = fingerprint
        st = settings
        self.low, self.mid, self.high = st.low, st.mid, st.high
        self.pop_size, self.promote_k, self.max_generations = st.pop_size, st.promote_k, st.max_generations
        self.phase2_iterations, self.alpha, self.choose_alpha = st.phase2_iterations, st.alpha, st.choose_alpha
        self.max_trials, self.time_limit = st.max_trials, st.time_limit
        self.use_surrogate, self.warm_start = st.use_surrogate, st.warm_start
        self.phase1_spec, self.phase2_spec, self.phase1_options = st.phase1, st.phase2, dict(st.phase1_options)
        self.progress = progress or Progress(enabled=False)
        self.cost_model = cost_model
        if cost_model is not None:
            problem.set_cost_table(cost_model.table(self.space))
        self.quant_hedge = (0.5, 2.0)  # knapsack seeds under these multiples of the calibrated quant_scale
        self.seed_assignment: Assignment | None = None
        self.n_evals = 0  # evaluations run or read back in this process (limits count both)
        self.n_run = 0  # evaluations actually run in this process
        self.t0 = time.perf_counter()
        self.eval_seconds = 0.0
        self.hv_history: list[dict[str, float]] = []
        self.surrogate = Surrogate(self.space, problem.importance_q, problem.importance_r, seed=self.seed)
        self.generations = 0
        self.stop_reasons: dict[str, str] = {}
        self.hv_ref: float | None = None
        self.evaluator_spec = evaluator.spec()
        self.baseline_keys: dict[str, str] = {}
        # this run's trials in candidate order (the store may hold more) -> the phase that first asked for each
        self.run_phase: dict[str, str] = {}
        self.executor = executor or LocalExecutor(evaluator)
        self.phase2_batch = int(st.phase2_batch or self.executor.n_workers)
        self.trial_seconds = 0.0  # sum of the trials' own seconds (> wall time with parallel workers)
        self.final_rung = FinalRung(st.final, final_evaluator) if st.final is not None and final_evaluator else None
        self.final_choice: Trial | None = None
        self.final_seconds = 0.0

    # ------------------------------------------------------------ evaluation
    def bytes_of(self, a: Assignment) -> int:
        """Budget-target bytes of ``a`` (works for the 16-bit reference too, even off the ladder)."""
        return self.memory_eval.predict(a).bytes_for(self.target)

    def key_of(self, a: Assignment, fidelity: Fidelity, evaluator: Evaluator | None = None) -> str:
        """Trial-store key of ``a`` at ``fidelity`` in this run (``evaluator``: another than the search's)."""
        spec = self.evaluator_spec if evaluator is None else evaluator.spec()
        return trial_key(a, fidelity, spec, self.memory.backend.spec(), self.fingerprint)

    def evaluate(self, a: Assignment, fidelity: Fidelity, phase: str) -> EvalResult:
        """Evaluate (or read back from the store) one trial; a batch of one of :meth:`evaluate_many`."""
        return self.evaluate_many([a], fidelity, phase)[0]

    def evaluate_many(self, assignments: list[Assignment], fidelity: Fidelity, phase: str,
                      evaluator: Evaluator | None = None) -> list[EvalResult]:
        """Evaluate a batch at ``fidelity``; returns results in candidate order.

        Stored trials are read back; repeats within the batch are evaluated once; the rest go
        to the executor as one batch and each result is stored (durably) as it finishes. The
        limits count evaluations exactly as one-at-a-time evaluation does: with ``max_trials``
        landing mid-batch only what fits is evaluated; the time limit is checked as each trial
        starts. When a limit cuts the batch, what finished is stored and ``LimitReached`` raised.
        ``evaluator``: evaluate with another evaluator than the search's (the final rung's recipe), in this
        process; its spec keys the trials.

        Raises:
            LimitReached: the trial or time limit stopped the batch (``.results`` has what finished).
        """
        keys = [self.key_of(a, fidelity, evaluator) for a in assignments]
        results: list[EvalResult | None] = [None] * len(assignments)
        cached: dict[int, EvalResult] = {}  # index -> stored result
        first: dict[str, int] = {}  # key -> index of its first occurrence in the batch
        todo: list[int] = []  # indices to evaluate, in candidate order
        n, cut, reason = self.n_evals, len(assignments), None
        for i, key in enumerate(keys):
            # stored trials and repeats count like new ones, so what a shared store holds never changes
            # how many trials a run makes (a limit-matched ablation gets exactly its budget)
            if self.max_trials is not None and n >= self.max_trials:
                cut, reason = i, f"trial limit {self.max_trials} reached"
                break
            if key in first:  # a repeat reads its first occurrence back, like a stored trial
                n += 1
                continue
            first[key] = i
            old = self.store.get(key)
            if old is not None:
                cached[i] = old.result
                n += 1
                continue
            todo.append(i)
            n += 1
        if todo:
            executor = self.executor if evaluator is None else LocalExecutor(evaluator)
            stop_at = self._dispatch(assignments, keys, todo, fidelity, phase, results, executor)
            if stop_at is not None and stop_at < cut:
                cut, reason = stop_at, f"time limit {self.time_limit:.0f} s reached"
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

        def may_start(j: int) -> bool:
            if self.time_limit is not None and time.perf_counter() - self.t0 >= self.time_limit:
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
                assignments[i], fidelity, phase, res, self.memory_eval.predict(assignments[i]), keys[i], seed=self.seed,
                extra={"generation": self.generations, "budget_bytes": self.budget_bytes, "worker": done.worker}))
            self._report(phase, assignments[i], fidelity, res, cached=False)
        return stopped[0] if stopped else None

    def _report(self, phase: str, a: Assignment, fidelity: Fidelity, res: EvalResult, cached: bool) -> None:
        """One finished (or read back) trial to the progress view."""
        nb = self.bytes_of(a)
        self.progress.trial(phase, res, cached, fidelity=fidelity, assignment=a, nbytes=nb,
                            feasible=nb <= self.budget_bytes)

    @property
    def run_keys(self) -> list[str]:
        """This run's trial keys in candidate order."""
        return list(self.run_phase)

    def trials(self) -> list[Trial]:
        """This run's trials in candidate order (read back from the store), whatever order workers finished in.

        Only this run's own trials count, never others a shared store holds: that keeps a
        re-run's decisions identical to the first run's, which is what makes resume exact. Each
        trial's ``phase`` is this run's (a trial read back may have been stored by another search,
        in another phase).
        """
        return [attrs.evolve(t, phase=phase) for k, phase in self.run_phase.items() if (t := self.store.get(k)) is not None]

    def high_trials(self) -> list[Trial]:
        """This run's ok high-fidelity trials (baselines included), feasible or not."""
        return [t for t in self.trials() if t.status == "ok" and t.fidelity.steps == self.high.steps
                and t.phase != "final"]

    def front(self) -> list[Trial]:
        """Pareto front (score ↑, bytes ↓) of feasible high-fidelity trials."""
        trials = [t for t in self.high_trials() if self.bytes_of(t.assignment) <= self.budget_bytes]
        if not trials:
            return []
        mask = pareto_mask([t.score for t in trials], [self.bytes_of(t.assignment) for t in trials])
        return sorted((t for t, m in zip(trials, mask) if m), key=lambda t: self.bytes_of(t.assignment))

    # ------------------------------------------------------------- baselines
    def baselines(self) -> dict[str, str]:
        """Evaluate uniform bits at the largest feasible rank (each quantized ladder bits) and the
        16-bit reference; returns ``{name: trial key}``."""
        out = self.baseline_keys  # filled with the finished ones, so a limit mid-way keeps them
        named: list[tuple[str, Assignment]] = []
        ranks = [r for r in self.space.ranks if r > 0] or list(self.space.ranks)
        for b in [b for b in self.space.bits if b != UNQUANTIZED_BITS]:
            feas = [r for r in ranks if self.bytes_of(self.space.uniform(b, r)) <= self.budget_bytes]
            if feas:
                named.append((f"uniform-{b}bit-r{feas[-1]}", self.space.uniform(b, feas[-1])))
        # 16-bit reference: at the largest feasible rank when it fits, else unconstrained at rank ≈ 8
        a16 = [Assignment(self.space.unit_names, [UNQUANTIZED_BITS] * self.space.n_units, [r] * self.space.n_units)
               for r in ranks]
        feas16 = [a for a in a16 if self.bytes_of(a) <= self.budget_bytes]
        ref = feas16[-1] if feas16 else min(a16, key=lambda a: (abs(a.ranks[0] - 8), a.ranks[0]))
        tag = "" if feas16 else " (over budget, reference)"
        named.append((f"16bit-r{ref.ranks[0]}{tag}", ref))
        self.progress.plan("baseline", len(named), self.high)
        self.progress.phase("baselines", len(named))
        results: list[EvalResult | None] = []
        try:
            results = list(self.evaluate_many([a for _, a in named], self.high, "baseline"))
        except LimitReached as e:
            results = e.results
            raise
        finally:
            for (name, a), res in zip(named, results):
                if res is not None:
                    out[name] = self.key_of(a, self.high)
        return out

    # --------------------------------------------------------------- phase I
    def _best_high(self) -> float:
        """Best feasible high-fidelity score so far (-inf before any)."""
        return max((t.score for t in self.front()), default=-math.inf)

    def _hv(self) -> float:
        trials = self.front()
        if not trials:
            return 0.0
        if self.hv_ref is None:  # fixed once (the worst high-fidelity score so far), so HV is monotone
            self.hv_ref = min(t.score for t in self.high_trials()) - 1e-3
        return hypervolume_2d([t.score for t in trials], [self.bytes_of(t.assignment) for t in trials],
                              self.hv_ref, float(self.budget_bytes) * 1.0001)

    def calibrate(self) -> None:
        """Fit the cost model's ``quant_scale`` on the baselines' real high-fidelity scores (how much of a
        0-step KL a trained candidate still pays), then rebuild the table repair and searchers use;
        the hedged tables (``quant_hedge`` multiples) give Phase I extra knapsack seeds."""
        if self.cost_model is None:
            return
        trials = self.high_trials()
        c = calibrate_quant_scale(self.cost_model, [t.assignment for t in trials], [t.score for t in trials])
        if c is not None:
            self.cost_model = attrs.evolve(self.cost_model, quant_scale=c)
            log.info("cost model: quant_scale %.3f from %d baselines", c, len(trials))
        self.problem.set_cost_table(self.cost_model.table(self.space),
                                    [self.cost_model.table(self.space, m * self.cost_model.quant_scale)
                                     for m in self.quant_hedge])

    def rank_gain(self, a: Assignment) -> float:
        """The cost model's predicted rank gain of ``a`` at the high fidelity (nats; 0 without a model)."""
        cm = self.cost_model
        if cm is None:
            return 0.0
        return float(sum(cm.rank_gain[u, cm.ranks.index(r)] for u, r in enumerate(a.ranks)))

    def _promote(self, cands: list[Assignment], lows: list[EvalResult], recs: list[PairRecord]) -> list[int]:
        """Indices of ok low-fidelity candidates, best predicted high-fidelity score first.

        With a cost model: calibrated screen score + predicted rank gain (a 0-step screen cannot see rank);
        otherwise the MLP surrogate's ranking (its fallback before it is fitted: the low score).
        """
        if not any(r.ok for r in lows):
            return []
        if self.cost_model is not None:  # the screen pays the full 0-step damage; training recovers 1 - c of it
            c = self.cost_model.quant_scale
            pred = np.array([c * r.score + self.rank_gain(a) if r.ok else -np.inf for a, r in zip(cands, lows)])
            order = np.argsort(-pred, kind="stable")
        else:
            order = self.surrogate.rank(recs)
        return [int(i) for i in order if lows[i].ok]

    def _climb(self, cands: list[Assignment], promoted: list[int], best: list[EvalResult]) -> list[int]:
        """Train ``promoted`` at the mid rung (when there is one) and keep the better half of them by
        mid score; returns the indices that go on to high. ``best`` is updated in place."""
        if self.mid is None or not promoted:
            return promoted
        mids = self.evaluate_many([cands[i] for i in promoted], self.mid, "phase1")
        for i, r in zip(promoted, mids):
            best[i] = r
        ok = sorted((i for i, r in zip(promoted, mids) if r.ok), key=lambda i: -best[i].score)
        keep = max(1, math.ceil(len(ok) / 2)) if self.use_surrogate else len(ok)
        return ok[:keep]

    def phase1(self) -> None:
        kw = dict(pop_size=self.pop_size, max_generations=self.max_generations, warm_start=self.warm_start,
                  **self.phase1_options)
        searcher = get_searcher(self.phase1_spec, self.problem, **kw) \
            if isinstance(self.phase1_spec, str) else get_searcher(self.phase1_spec, self.problem)
        stag = HVStagnation(window=3, rel_eps=1e-3)
        pairs: list[PairRecord] = []
        while not searcher.done and self.generations < self.max_generations:
            self.generations += 1
            cands = searcher.ask(self.pop_size)
            if not cands:
                break
            self._plan_phase1(len(cands), *self._gen_plan(self.generations == 1)[1:])
            self.progress.phase(f"Phase I · generation {self.generations}", len(cands))
            lows = self.evaluate_many(cands, self.low, "phase1")
            recs = [PairRecord(a, r.score if r.ok else -1e9, self.bytes_of(a)) for a, r in zip(cands, lows)]
            promoted = self._promote(cands, lows, recs)
            k = self.promote_k * (2 if self.mid is not None else 1)
            if self.use_surrogate:  # the ablation without surrogate promotes every successful offspring
                promoted = promoted[:k]
            seed_first = self.generations == 1 and lows[0].ok  # the warm-start seed always reaches high
            if seed_first:
                self.seed_assignment = cands[0]
                promoted = [0, *(i for i in promoted if i != 0)]
            best = list(lows)
            n = len(promoted)
            self._plan_phase1(0, n if self.mid else 0, min(n, math.ceil(n / 2) + seed_first)
                              if self.mid and self.use_surrogate else n)
            to_high = self._climb(cands, promoted, best)
            if seed_first and 0 not in to_high:
                to_high = [0, *to_high]
            self._plan_phase1(0, 0, len(to_high))
            his = self.evaluate_many([cands[i] for i in to_high], self.high, "phase1") if to_high else []
            for i, hi in zip(to_high, his):
                best[i] = hi
                if hi.ok and lows[i].ok:
                    pairs.append(PairRecord(cands[i], lows[i].score, recs[i].bytes, hi.score))
            if self.cost_model is None and self.use_surrogate and len(pairs) >= self.surrogate.min_pairs:
                self.surrogate.fit(pairs)
            searcher.tell(cands, best)
            hv = self._hv()
            self.hv_history.append({"generation": self.generations, "hv": hv, "evals": self.n_evals,
                                    "best": self._best_high(), "seconds": time.perf_counter() - self.t0})
            self.progress.front(len(self.front()))
            if self.cost_model is None and stag.update(hv):
                self.stop_reasons["phase1"] = "hypervolume stagnation"
                break
        self.stop_reasons.setdefault(
            "phase1", "generation limit" if self.generations >= self.max_generations else
            "best score stagnation" if getattr(searcher, "objectives", "") == "score" and searcher.done
            else "searcher done")
        self.surrogate_report = self.surrogate.report()

    def _gen_plan(self, first: bool) -> tuple[int, int, int]:
        """At most (screens, mid, high) evaluations one Phase-I generation asks for (the warm-start seed adds one
        to each rung of the first)."""
        pop, s = self.pop_size, int(first)
        if not self.use_surrogate:
            return pop, pop if self.mid else 0, pop
        k = min(pop, self.promote_k * (2 if self.mid is not None else 1) + s)
        return (pop, k, min(k, math.ceil(k / 2) + s)) if self.mid else (pop, 0, k)

    def _plan_phase1(self, low: int, mid: int, high: int) -> None:
        """Tell the progress view what Phase I still asks for: ``low`` / ``mid`` / ``high`` evaluations left in
        this generation, then every later generation at its most."""
        rest = self.max_generations - max(self.generations, 1)
        per = self._gen_plan(first=False)
        for fid, n, m in zip((self.low, self.mid, self.high), (low, mid, high), per):
            if fid is not None:
                self.progress.plan("phase1", n + rest * m, fid)

    # -------------------------------------------------------------- phase II
    def phase2(self) -> None:
        if self.phase2_spec is None:
            self.stop_reasons["phase2"] = "skipped"
            return
        warm = [t for t in self.high_trials() if self.bytes_of(t.assignment) <= self.budget_bytes]
        if len(warm) < 2:
            self.stop_reasons["phase2"] = f"skipped: {len(warm)} feasible high-fidelity trials (needs 2)"
            return
        q = self.phase2_batch  # q points per ask (batch acquisition), evaluated concurrently
        searcher = get_searcher(self.phase2_spec, self.problem, alpha=self.alpha, batch_size=q) \
            if isinstance(self.phase2_spec, str) else get_searcher(self.phase2_spec, self.problem)
        searcher.tell([t.assignment for t in warm], [t.result for t in warm])
        self.progress.phase("Phase II", self.phase2_iterations, upto=True)
        n_done, it = 0, 0  # phase2_iterations caps evaluations
        while n_done < self.phase2_iterations:
            if searcher.done:
                break
            cands = searcher.ask(min(q, self.phase2_iterations - n_done))
            if not cands:
                break
            it += 1
            self.progress.phase(f"Phase II · iteration {it}", len(cands), line=False)
            searcher.tell(cands, self.evaluate_many(cands, self.high, "phase2"))
            n_done += len(cands)
        self.stop_reasons["phase2"] = "searcher done (EI saturation / region collapse)" if searcher.done \
            else "iteration limit"
        self.phase2_history = getattr(searcher, "history", [])

    # ------------------------------------------------------------ final rung
    def final(self) -> None:
        """The final rung (:mod:`autoqra.stages.final_rung`): train the best distinct feasible candidates and the
        fitting uniform baselines near the best of them with the final recipe; the best mean validation score
        becomes the answer (``final_choice``: the top-rung trial it stands for)."""
        fr = self.final_rung
        if fr is None:
            self.stop_reasons.setdefault("final", "off")
            return
        t0 = time.perf_counter()
        fits = [t for t in self.high_trials() if self.bytes_of(t.assignment) <= self.budget_bytes]
        base = {k: n for n, k in self.baseline_keys.items()}
        uniforms = {base[t.key]: t for t in fits if t.key in base}
        cands = [t for t in fits if t.key not in base]
        entrants = fr.entrants(cands, uniforms)
        if not entrants:
            self.stop_reasons["final"] = "skipped: no feasible top-rung trial"
            return
        self.progress.plan("final", fr.planned(len(entrants)), fr.settings.fidelity)
        self.progress.phase(f"final rung · {len(entrants)} entrants × {len(fr.settings.seeds)} seed(s), "
                            f"{fr.settings.steps} steps", fr.planned(len(entrants)))

        def evaluate(ev: Evaluator, assignments: list[Assignment], fid: Fidelity, phase: str):
            res = self.evaluate_many(assignments, fid, phase, evaluator=ev)
            return [(self.key_of(a, fid, ev), r) for a, r in zip(assignments, res)]

        try:
            fr.run(entrants, evaluate)
        finally:
            self.final_seconds = time.perf_counter() - t0
        entry = fr.choose()
        self.final_choice = entry.trial if entry is not None else None
        self.stop_reasons["final"] = (f"chose {entry.label} (validation {entry.mean:+.4f})" if entry is not None
                                      else "every final training failed: chose on the top rung")

    # ---------------------------------------------------------------- choice
    def choose(self, alpha: float | None = None) -> Trial | None:
        """Best utility α·score − (1−α)·memory (min-max over the feasible front) among feasible trials.

        ``alpha`` defaults to ``choose_alpha`` (1.0 = the best score under the budget).
        """
        alpha = self.choose_alpha if alpha is None else alpha
        front = self.front()
        if not front:
            return None
        s = np.array([t.score for t in front])
        m = np.array([self.bytes_of(t.assignment) for t in front], dtype=float)
        sn = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else np.ones_like(s)
        mn = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m)
        u = alpha * sn - (1 - alpha) * mn
        return front[int(np.argmax(u))]

    def run(self) -> dict[str, Any]:
        """Run baselines, Phase I and Phase II (as far as the limits allow); return the run's summary."""
        stopped = None
        try:
            with self.progress:
                self.progress.limit = self.max_trials  # planned: every stage, at most the trial limit
                self._plan_phase1(*self._gen_plan(first=True))
                self.progress.plan("phase2", self.phase2_iterations if self.phase2_spec is not None else 0, self.high)
                if self.final_rung is not None:  # an estimate until the entrants are known
                    fs = self.final_rung.settings
                    self.progress.plan("final", (fs.candidates + 1) * len(fs.seeds), fs.fidelity)
                self.baseline_keys = self.baselines()
                self.calibrate()
                self.phase1()
                self.progress.end("phase1")
                self.phase2()
                self.progress.end("phase2")
                self.final()
                self.progress.end("final")
        except LimitReached as e:
            stopped = str(e)
            log.info("search stopped: %s", e)
        self.progress.finish(stopped)
        wall = time.perf_counter() - self.t0
        return {
            "baselines": self.baseline_keys, "run_keys": self.run_keys, "best": self.final_choice or self.choose(),
            "best_utility_key": getattr(self.choose(self.alpha), "key", None), "front": self.front(), "stopped": stopped,
            "stop_reasons": self.stop_reasons, "hv_history": self.hv_history, "wall_seconds": wall,
            "eval_seconds": self.eval_seconds, "n_evals": self.n_evals, "n_run": self.n_run,
            "trial_seconds": self.trial_seconds, "executor": self.executor.describe(), "phase2_batch": self.phase2_batch,
            "overhead_fraction": (max(0.0, wall - self.eval_seconds) / wall) if wall > 0 and self.n_run else math.nan,
            "surrogate": getattr(self, "surrogate_report", {}), "phase2_history": getattr(self, "phase2_history", []),
            "seed_key": self.key_of(self.seed_assignment, self.high) if self.seed_assignment is not None else None,
            "cost_model": self.cost_report(),
            "final_rung": [e.to_dict() for e in self.final_rung.entries] if self.final_rung is not None else [],
            "final_rung_seconds": self.final_seconds,
        }

    def cost_report(self) -> dict[str, Any]:
        """The cost model's table and the Spearman of its additive prediction against this run's real
        scores: high-fidelity trials (feasible or not) and the low-fidelity screens (quantization part)."""
        cm = self.cost_model
        if cm is None:
            return {}
        out: dict[str, Any] = {**cm.to_dict()}
        high = [t for t in self.high_trials() if t.assignment.bits != (UNQUANTIZED_BITS,) * self.space.n_units]
        pred = [cm.predict(t.assignment) for t in high if all(b in cm.bits for b in t.assignment.bits)]
        scores = [t.score for t in high if all(b in cm.bits for b in t.assignment.bits)]
        out["spearman_high"] = spearman(np.array(pred), np.array(scores)) if len(scores) >= 3 else math.nan
        out["n_high"] = len(scores)
        lows = [t for t in self.trials() if t.status == "ok" and t.fidelity.steps == self.low.steps
                and t.phase == "phase1"]
        if len(lows) >= 3:
            pq = [-cm.quant[np.arange(self.space.n_units), [cm.bits.index(b) for b in t.assignment.bits]].sum()
                  for t in lows]
            out["spearman_screen"] = spearman(np.array(pq), np.array([t.score for t in lows]))
        return out
