r"""Variation operators of the Phase-I NSGA-II (paper §2.3-2.4), as pure functions and pymoo operators.

All operators work on the integer encoding of :meth:`SearchSpace.encode`
(``[bit_idx_1..L, rank_idx_1..L]``, lower bound 0, upper bound ``space.upper``).

* the starts of Phase I (:func:`~autoqra.searchers.nsga2_seeds.warm_start_seed`,
  :func:`~autoqra.searchers.nsga2_seeds.anchored_seeds`) are :mod:`autoqra.searchers.nsga2_seeds`.
* :func:`importance_mutation` — one ladder step on a unit drawn with probability ∝ (I_q + I_r)^gamma;
  bits or rank 50/50; up with probability I_t(u) (the importance of the chosen kind), else down;
  a step that would leave the ladder goes the other way.
* :func:`coupled_mutation` — one memory-increasing step (bits on a unit ∝ I_q^gamma, or rank on a unit
  ∝ I_r^gamma, 50/50), then repair pays for it with the cheapest downgrades elsewhere.
* :class:`UnitUniformCrossover` — uniform crossover per *unit*: each unit's (bits, rank) pair comes
  from one parent or the other with probability 1/2, so the two offspring swap whole units.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from pymoo.core.crossover import Crossover
from pymoo.core.duplicate import DefaultDuplicateElimination
from pymoo.core.mutation import Mutation
from pymoo.core.repair import Repair
from pymoo.core.sampling import Sampling

from autoqra.guidance.moves import swap_down, swap_up

EncodedRepair = Callable[[np.ndarray], np.ndarray]
_UNIQUE_TRIES = 20


def _weights(v: np.ndarray, gamma: float) -> np.ndarray:
    w = np.power(np.clip(v, 0.0, None), gamma) + 1e-12
    return w / w.sum()


def importance_mutation(
    x: np.ndarray, upper: np.ndarray, iq: np.ndarray, ir: np.ndarray, gamma: float, rng: np.random.Generator
) -> np.ndarray:
    """Importance-guided single edit of one encoding (returns a copy; see module docstring)."""
    n = iq.shape[0]
    y = np.array(x, dtype=np.int64).copy()
    u = int(rng.choice(n, p=_weights(iq + ir, gamma)))
    use_rank = bool(rng.random() < 0.5)
    j = n + u if use_rank else u
    imp = ir[u] if use_rank else iq[u]
    if upper[j] == 0:
        return y
    step = 1 if rng.random() < imp else -1
    if not 0 <= y[j] + step <= upper[j]:
        step = -step
    y[j] += step
    return y


def coupled_mutation(
    x: np.ndarray,
    upper: np.ndarray,
    iq: np.ndarray,
    ir: np.ndarray,
    gamma: float,
    rng: np.random.Generator,
    repair: EncodedRepair,
) -> np.ndarray:
    """Budget-balanced edit: one memory-increasing step, then ``repair`` (returns a copy)."""
    n = iq.shape[0]
    y = np.array(x, dtype=np.int64).copy()
    kinds = [0, 1] if rng.random() < 0.5 else [1, 0]  # 0 = bits, 1 = rank
    for kind in kinds:
        room = y[kind * n : (kind + 1) * n] < upper[kind * n : (kind + 1) * n]
        if room.any():
            imp = (ir if kind else iq) * room
            w = _weights(imp, gamma) * room
            u = int(rng.choice(n, p=w / w.sum()))
            y[kind * n + u] += 1
            break
    return repair(y)


class WarmStartSampling(Sampling):
    """Initial population: the repaired seed(s) first, then jittered copies (``jitter_resets``
    random single-variable resets each, repaired; or ``jitter(x, rng)``, e.g. byte-neutral moves),
    taken from the seeds in turn. ``seed`` is one
    encoding, a list of them, or None (uniform random + repair). Rows are kept unique when
    possible (up to 20 tries per row)."""

    def __init__(self, seed: np.ndarray | list[np.ndarray] | None, repair: EncodedRepair,
                 jitter_resets: int = 4, jitter: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None
                 ) -> None:
        super().__init__()
        self.jitter = jitter
        seeds = [] if seed is None else [seed] if isinstance(seed, np.ndarray) and seed.ndim == 1 else list(seed)
        self.seeds = [np.asarray(x, dtype=np.int64) for x in seeds]
        self.repair_fn = repair
        self.jitter_resets = int(jitter_resets)

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        rng = random_state
        upper = np.asarray(problem.xu, dtype=np.int64)
        rows: list[np.ndarray] = []
        seen: set[tuple[int, ...]] = set()

        def fresh(i: int) -> np.ndarray:
            if not self.seeds:
                return rng.integers(0, upper + 1)
            y = self.seeds[i % len(self.seeds)].copy()
            if self.jitter is not None:
                return self.jitter(y, rng)
            for _ in range(self.jitter_resets):
                j = int(rng.integers(len(y)))
                y[j] = rng.integers(0, upper[j] + 1)
            return y

        for i in range(n_samples):
            for t in range(_UNIQUE_TRIES):
                if i < len(self.seeds) and t == 0:
                    y = self.repair_fn(self.seeds[i])
                elif t < _UNIQUE_TRIES // 2:
                    y = self.repair_fn(fresh(i))
                else:  # jitter keeps colliding (tight budget): fall back to uniform random
                    y = self.repair_fn(rng.integers(0, upper + 1))
                if tuple(y.tolist()) not in seen:
                    break
            seen.add(tuple(y.tolist()))
            rows.append(y)
        return np.array(rows, dtype=np.int64)


class UnitUniformCrossover(Crossover):
    """Uniform crossover over units: each unit's (bits, rank) pair is swapped with probability 1/2."""

    def __init__(self, n_units: int, prob: float = 0.9) -> None:
        super().__init__(2, 2, prob=prob)
        self.n_units = int(n_units)

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        _, n_matings, _ = X.shape
        mask = random_state.random((n_matings, self.n_units)) < 0.5
        m = np.concatenate([mask, mask], axis=1)
        return np.stack([np.where(m, X[0], X[1]), np.where(m, X[1], X[0])])


class ImportanceMutation(Mutation):
    """pymoo wrapper: per individual, a coupled edit with probability ``coupled_prob``, else an
    importance-guided single edit (the two modes of the paper's mutation)."""

    def __init__(
        self, iq: np.ndarray, ir: np.ndarray, gamma: float, coupled_prob: float, repair: EncodedRepair
    ) -> None:
        super().__init__(prob=1.0)
        self.iq, self.ir, self.gamma = iq, ir, float(gamma)
        self.coupled_prob = float(coupled_prob)
        self.repair_fn = repair

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        upper = np.asarray(problem.xu, dtype=np.int64)
        out = np.asarray(X, dtype=np.int64).copy()
        for i in range(out.shape[0]):
            if random_state.random() < self.coupled_prob:
                out[i] = coupled_mutation(out[i], upper, self.iq, self.ir, self.gamma, random_state, self.repair_fn)
            else:
                out[i] = importance_mutation(out[i], upper, self.iq, self.ir, self.gamma, random_state)
        return out


class SwapMutation(Mutation):
    """Byte-neutral mutation on the cost table (:mod:`autoqra.guidance.moves`): per individual, with probability
    1/2 a :func:`~autoqra.guidance.moves.swap_down` (cheap downgrade, freed bytes spent by fill), else a
    :func:`~autoqra.guidance.moves.swap_up` (valuable upgrade, paid by repair). A move that changes nothing is
    redrawn, never reflected."""

    def __init__(self, table: np.ndarray, bytes_of: Callable[[np.ndarray], int], budget: int,
                 repair: EncodedRepair, top: int = 6) -> None:
        super().__init__(prob=1.0)
        self.table, self.bytes_of, self.budget, self.repair_fn, self.top = table, bytes_of, int(budget), repair, top

    def move(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One byte-neutral move of a (repaired) encoding."""
        fin = np.isfinite(self.table)  # each unit's options: the finite prefix of its rows (embedding / head units)
        upper = np.concatenate([fin.any(2).sum(1), fin.any(1).sum(1)]).astype(np.int64) - 1
        x = self.repair_fn(np.asarray(x, dtype=np.int64))
        if rng.random() < 0.5:
            return swap_down(x, upper, self.table, self.bytes_of, self.budget, rng, self.top)
        return swap_up(x, upper, self.table, self.bytes_of, self.repair_fn, rng, self.top)

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        out = np.asarray(X, dtype=np.int64).copy()
        for i in range(out.shape[0]):
            out[i] = self.move(out[i], random_state)
        return out


class BudgetRepair(Repair):
    """pymoo wrapper applying the budget repair to every row."""

    def __init__(self, repair: EncodedRepair) -> None:
        super().__init__()
        self.repair_fn = repair

    def _do(self, problem, X, **kwargs):
        X = np.rint(np.asarray(X, dtype=float)).astype(np.int64)
        return np.array([self.repair_fn(row) for row in X], dtype=np.int64).reshape(X.shape)


class ArchiveDuplicateElimination(DefaultDuplicateElimination):
    """pymoo's duplicate elimination, plus removal of anything in ``archive`` (every point asked so
    far, as tuples of ints), so no assignment is proposed twice in one run."""

    def __init__(self, archive: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.archive = archive

    def do(self, pop, *args, return_indices=False, to_itself=True):
        out = super().do(pop, *args, return_indices=return_indices, to_itself=to_itself)
        if return_indices or len(out) == 0 or not self.archive:
            return out
        X = np.rint(np.asarray(out.get("X"), dtype=float)).astype(np.int64)
        keep = np.array([tuple(row.tolist()) not in self.archive for row in X], dtype=bool)
        return out[keep]


# ------------------------------------------------------------------ mutation operators by guidance
def swap_operator(searcher: Any, table: np.ndarray | None, bytes_of: Any) -> tuple[Mutation, Any]:
    """The cost model's operator: byte-neutral swaps on ``table`` (:class:`SwapMutation`); its move also jitters
    the warm-start seed. Without a table, :func:`importance_operator`."""
    if table is None:
        return importance_operator(searcher, table, bytes_of)
    m = SwapMutation(table, bytes_of, searcher.ctx.budget_bytes, searcher._repair_x)
    return m, m.move


def importance_operator(searcher: Any, table: np.ndarray | None, bytes_of: Any) -> tuple[Mutation, Any]:
    """The paper's operator: an importance-guided single step or the coupled edit (:class:`ImportanceMutation`)."""
    return ImportanceMutation(searcher.iq, searcher.ir, searcher.gamma, searcher.coupled_prob, searcher._repair_x), None


#: Mutation operators by name (``NSGA2Searcher(mutation=...)`` also takes one of these functions directly)
MUTATIONS = {"swap": swap_operator, "paper": importance_operator}
