r"""Phase I searcher: NSGA-II (pymoo, ask/tell) with importance-prior warm start and guided mutation.

Objectives (both minimised inside pymoo): ``(-score, bytes)`` where ``bytes = ctx.bytes_of(a)``.
Operators (see :mod:`autoqra.searchers.nsga2_ops`): Eq. 6 warm start with jittered copies,
per-unit uniform crossover, importance-guided + coupled mutation, budget repair of every
offspring, duplicate elimination against the population *and* everything asked before.

Generations: :meth:`NSGA2Searcher.ask` hands out one generation at a time (the rest is queued for
later asks); pymoo is told only once every result of the generation has arrived. Failed trials
(``not result.ok``) get a finite score below every ok score seen (``worst - max(1, range)``, or
-1e9 before any ok score), so they are dominated but never crash pymoo.

Resume: ``state_dict()`` stores the seed and every told generation ``(X, F)`` (plus the results of
a partly told generation). ``load_state_dict`` replays them through a fresh pymoo algorithm with
the same seed, which reproduces its internal state exactly, so the next asks are identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2, RankAndCrowding, binary_tournament
from pymoo.core.evaluator import Evaluator
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.termination import NoTermination
from pymoo.operators.selection.tournament import TournamentSelection
from pymoo.problems.static import StaticProblem

import autoqra.searchers.nsga2_ops as ops
from autoqra.pareto import HVStagnation, front_hypervolume
from autoqra.problem import Problem as SearchProblem
from autoqra.searchers.base import Searcher, register_searcher
from autoqra.searchers.nsga2_seeds import first_generation_seeds
from autoqra.space import Assignment

if TYPE_CHECKING:
    from autoqra.evaluators.base import EvalResult

logger = logging.getLogger(__name__)
_NO_OK_SCORE = -1e9


WARM_STARTS = ("eq6", "anchored", "none")


def _warm_start_mode(v: str) -> str:
    if v not in WARM_STARTS:
        raise ValueError(f"warm_start={v!r} is not allowed; choose one of {list(WARM_STARTS)}")
    return str(v)


@register_searcher("nsga2")
class NSGA2Searcher(Searcher):
    """Multi-objective NSGA-II over the integer encoding of the space.

    Args:
        pop_size: population size = candidates per generation.
        crossover_prob: probability that a mating applies the per-unit uniform crossover.
        gamma: exponent of the importance sampling weights (paper: 1.5).
        coupled_prob: probability that an offspring's mutation is the coupled (budget-balanced) edit.
        warm_start: how the first generation is seeded: ``"anchored"`` (default; the highest
            uniform bit-width the budget affords, slack filled by importance per byte, plus the
            start that keeps the Eq. 6 ranks when that is another point;
            :func:`~autoqra.searchers.nsga2_seeds.anchored_seeds`), ``"eq6"`` (or True; the paper's
            Eq. 6 seed from the importance priors; without priors the first generation is random)
            or ``"none"`` (uniform random + repair).
        jitter_resets: random single-variable resets per jittered copy of the seed.
        tau: shaping of the priors in Eq. 6 (``"identity"``, ``"sqrt"``, ``"square"``).
        hv_window: hypervolume stagnation window in generations (``done`` rule); 0 disables it.
        hv_rel_eps: relative hypervolume gain below which the search is ``done``.
        max_generations: optional cap on told generations (``done`` afterwards).
        objectives: ``"score"`` (default: selection on the score alone, as the final choice is the best
            score under the hard budget; every candidate is repaired to fit, so a bytes objective only
            keeps cheaper, worse points alive) or ``"pareto"`` (the paper: score and bytes).
        mutation: the mutation operator: a function ``(searcher, cost table, bytes_of) -> (pymoo Mutation, seed
            jitter or None)`` (the guidance passes its own: :func:`~autoqra.searchers.nsga2_ops.swap_operator`,
            :func:`~autoqra.searchers.nsga2_ops.importance_operator`) or its name in ``nsga2_ops.MUTATIONS``:
            ``"swap"`` (byte-neutral moves on the context's cost table; default when it has one) or ``"paper"``
            (importance-guided single step + coupled edit).
        knapsack_k: with a cost table, the first generation also holds up to k knapsack seeds after
            the warm-start seed: the exact optimum of each of the context's ``seed_tables`` (other
            calibrations), then the best distinct assignments of ``cost_table`` itself.
        stop_eps: in ``"score"`` mode, ``done`` once the best score has not risen by more than this
            (nats) for ``hv_window`` generations.
    """

    def __init__(
        self,
        pop_size: int = 16,
        crossover_prob: float = 0.9,
        gamma: float = 1.5,
        coupled_prob: float = 0.3,
        warm_start: str = "anchored",
        jitter_resets: int = 4,
        tau: str = "identity",
        hv_window: int = 3,
        hv_rel_eps: float = 1e-3,
        max_generations: int | None = None,
        objectives: str = "score",
        mutation: str | Callable = "swap",
        knapsack_k: int = 3,
        stop_eps: float = 2e-3,
    ) -> None:
        if objectives not in ("score", "pareto"):
            raise ValueError(f"objectives={objectives!r} is not allowed; choose 'score' or 'pareto'")
        if not callable(mutation) and mutation not in ops.MUTATIONS:
            raise ValueError(f"mutation={mutation!r} is not allowed; choose one of {list(ops.MUTATIONS)} or pass "
                             "an operator function")
        if int(knapsack_k) < 0 or stop_eps < 0:
            raise ValueError(f"knapsack_k={knapsack_k!r} and stop_eps={stop_eps!r} must be >= 0")
        self.objectives = objectives
        self.mutation = mutation if callable(mutation) else ops.MUTATIONS[mutation]
        self.knapsack_k, self.stop_eps = int(knapsack_k), float(stop_eps)
        if int(pop_size) < 2:
            raise ValueError(f"pop_size={pop_size!r} must be >= 2")
        for field, v in (("crossover_prob", crossover_prob), ("coupled_prob", coupled_prob)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{field}={v!r} must lie in [0, 1]")
        if gamma < 0 or jitter_resets < 0:
            raise ValueError(f"gamma={gamma!r} and jitter_resets={jitter_resets!r} must be >= 0")
        self.pop_size = int(pop_size)
        self.crossover_prob = float(crossover_prob)
        self.gamma = float(gamma)
        self.coupled_prob = float(coupled_prob)
        self.warm_start = _warm_start_mode(warm_start)
        self.jitter_resets = int(jitter_resets)
        self.tau = tau
        self.hv_window = int(hv_window)
        self.hv_rel_eps = float(hv_rel_eps)
        self.max_generations = max_generations

    # ----------------------------------------------------------------- set-up
    def bind(self, ctx: SearchProblem) -> None:
        super().bind(ctx)
        self._setup(ctx.seed)

    def _setup(self, seed: int) -> None:
        ctx, space = self.ctx, self.ctx.space
        n = space.n_units
        self.seed = int(seed)
        self.iq = np.full(n, 0.5) if ctx.importance_q is None else np.asarray(ctx.importance_q, dtype=float)
        self.ir = np.full(n, 0.5) if ctx.importance_r is None else np.asarray(ctx.importance_r, dtype=float)
        self._repair_x = ctx.repair_encoded
        bytes_of = ctx.bytes_encoded
        table = ctx.cost_table
        seed_x = first_generation_seeds(ctx, self.warm_start, self.iq, self.ir, self.tau, self.knapsack_k)
        self.seeds = [space.decode(x) for x in seed_x or []]
        self._archive: set[tuple[int, ...]] = set()
        n_obj = 2 if self.objectives == "pareto" else 1
        self.problem = Problem(n_var=2 * n, n_obj=n_obj, xl=np.zeros(2 * n), xu=space.upper.astype(float), vtype=int)
        mutation, jitter = self.mutation(self, table, bytes_of)
        self.algorithm = NSGA2(
            pop_size=self.pop_size,
            sampling=ops.WarmStartSampling(seed_x, self._repair_x, self.jitter_resets, jitter),
            selection=TournamentSelection(func_comp=binary_tournament),
            crossover=ops.UnitUniformCrossover(n, self.crossover_prob),
            mutation=mutation,
            survival=RankAndCrowding(),
            repair=ops.BudgetRepair(self._repair_x),
            eliminate_duplicates=ops.ArchiveDuplicateElimination(self._archive),
        )
        self.algorithm.setup(self.problem, termination=NoTermination(), seed=self.seed, verbose=False)
        self.generation = 0  # generations fully told
        self._pending: Population | None = None  # the generation being evaluated
        self._pending_keys: list[tuple[int, ...]] = []
        self._told: dict[tuple[int, ...], list[float]] = {}  # key -> F of the pending generation
        self._queue: list[tuple[int, ...]] = []  # pending keys not handed out yet
        self._history: list[dict[str, list]] = []
        self._ok_scores: list[float] = []
        self._exhausted = False
        self._hv_ref: float | None = None
        self.stagnation = HVStagnation(max(self.hv_window, 1), self.hv_rel_eps)
        self._best_history: list[float] = []

    @property
    def done(self) -> bool:
        """True once the space is exhausted, ``max_generations`` is reached, or the search stagnates
        (HV in ``"pareto"`` mode, the best score in ``"score"`` mode)."""
        if self._exhausted:
            return True
        if self.max_generations is not None and self.generation >= self.max_generations:
            return True
        if self.objectives == "score":
            h, w = self._best_history, self.hv_window
            return w > 0 and len(h) > w and h[-1] <= h[-1 - w] + self.stop_eps
        return self.hv_window > 0 and self.stagnation.stopped

    # ------------------------------------------------------------------ ask
    def _new_generation(self) -> None:
        pop = self.algorithm.ask()
        if pop is None or len(pop) == 0:
            self._exhausted = True
            logger.info("nsga2: no new unique offspring can be generated; the search is exhausted")
            return
        X = np.rint(np.asarray(pop.get("X"), dtype=float)).astype(np.int64)
        pop.set("X", X)
        self._pending = pop
        self._pending_keys = [tuple(r.tolist()) for r in X]
        self._archive.update(self._pending_keys)
        self._queue = list(self._pending_keys)
        self._told = {}

    def ask(self, n: int) -> list[Assignment]:
        """Up to ``n`` candidates of the current generation (a new one starts once all are told)."""
        if self._pending is None and not self.done:
            self._new_generation()
        out, self._queue = self._queue[: max(int(n), 0)], self._queue[max(int(n), 0) :]
        return [self.ctx.space.decode(np.array(k)) for k in out]

    # ----------------------------------------------------------------- tell
    def _fail_score(self) -> float:
        if not self._ok_scores:
            return _NO_OK_SCORE
        lo, hi = min(self._ok_scores), max(self._ok_scores)
        return lo - max(1.0, hi - lo)

    def tell(self, assignments: Sequence[Assignment], results: Sequence[EvalResult]) -> None:
        """Record results; pymoo is told once the whole pending generation has results.

        Assignments that are not part of the pending generation are ignored (logged at debug).
        """
        if len(assignments) != len(results):
            raise ValueError(f"tell got {len(assignments)} assignments but {len(results)} results")
        for a, r in zip(assignments, results):
            key = tuple(self.ctx.space.encode(a).tolist())
            if self._pending is None or key not in self._pending_keys:
                logger.debug("nsga2: ignoring a result for an assignment outside the pending generation")
                continue
            self._told[key] = [float(r.score) if r.ok else None, float(self.ctx.bytes_of(a))]
            if r.ok:
                self._ok_scores.append(float(r.score))
        if self._pending is not None and len(self._told) == len(self._pending_keys):
            self._finish_generation()

    def _finish_generation(self) -> None:
        fail = self._fail_score()
        told = [self._told[k] for k in self._pending_keys]
        F = np.array([[-(s if s is not None else fail), m][: self.problem.n_obj] for s, m in told])
        ok = [s is not None for s, _ in told]
        self._record(self._pending, self._pending_keys, F, ok)

    def _record(self, pop: Population, keys: Sequence[tuple[int, ...]], F: np.ndarray, ok: list[bool]) -> None:
        self._history.append({"X": [list(k) for k in keys], "F": F.tolist(), "ok": list(ok)})
        Evaluator().eval(StaticProblem(self.problem, F=F), pop)
        self.algorithm.tell(infills=pop)
        self._pending, self._pending_keys, self._told, self._queue = None, [], {}, []
        self.generation += 1
        self._update_hv()

    def _update_hv(self) -> None:
        oks = [-f[0] for g in self._history for f, ok in zip(g["F"], g["ok"]) if ok]
        self._best_history.append(max(oks) if oks else -np.inf)
        if self.problem.n_obj == 1:
            return
        pts = [(-f[0], f[1]) for g in self._history for f, ok in zip(g["F"], g["ok"]) if ok]
        if not pts:
            self.stagnation.update(0.0)
            return
        s, m = np.array(pts, dtype=float).T
        if self._hv_ref is None:  # the score reference is fixed once, below the first points, so HV is monotone
            span = max(float(s.max() - s.min()), abs(float(s.min())), 1e-12)
            self._hv_ref = float(s.min()) - 0.1 * span
        hv = front_hypervolume(s, m, self.ctx.budget_bytes, self._hv_ref)
        self.stagnation.update(hv)
        logger.info("nsga2: generation %d told, %d ok points, hypervolume %.6g", self.generation, len(pts), hv)

    # --------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: seed, told generations ``{X, F, ok}``, partial results of the pending one."""
        partial = [[list(k), v] for k, v in self._told.items()] if self._pending is not None else None
        return {"seed": self.seed, "generations": self._history, "partial": partial}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay ``state`` through a fresh algorithm with the stored seed (call after ``bind``)."""
        self._setup(int(state["seed"]))
        for g in state["generations"]:
            X = np.asarray(g["X"], dtype=np.int64)
            self._new_generation()
            if self._pending is None or not np.array_equal(np.asarray(self._pending_keys), X):
                logger.warning("nsga2: replay diverged from the stored generation; using the stored points")
                self._pending = Population.new("X", X)
            keys = [tuple(r.tolist()) for r in X]
            self._archive.update(keys)
            F = np.asarray(g["F"], dtype=float)
            self._ok_scores += [float(-f) for f, ok in zip(F[:, 0], g["ok"]) if ok]
            self._record(self._pending, keys, F, list(g["ok"]))
        if state.get("partial") is not None:
            self._new_generation()
            for key, v in state["partial"]:
                if tuple(key) not in self._pending_keys:
                    continue
                self._told[tuple(key)] = v
                if v[0] is not None:
                    self._ok_scores.append(float(v[0]))
            self._queue = [k for k in self._pending_keys if k not in self._told]
