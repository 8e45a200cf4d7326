r"""The starts of the Phase-I NSGA-II (paper §2.3): where its first generation comes from
(:func:`first_generation_seeds`; the searcher jitters copies of them into the rest of the generation).

All work on the integer encoding of :meth:`SearchSpace.encode` (``[bit_idx_1..L, rank_idx_1..L]``).

* :func:`warm_start_seed` — Eq. 6: ``q_u = round_Q(q_min + (q_max - q_min) * tau(I_q(u)))`` and the
  same for ranks with ``I_r``; ``round`` snaps to the nearest ladder *value* (ties: the lower one).
* :func:`anchored_seeds` — budget-anchored alternative; its first start puts every unit at the highest
  uniform bit-width that fits (with Eq. 6 ranks where they fit there, else none), then fills the budget's
  slack greedily with the one-step upgrade of most importance per byte. Unlike Eq. 6 it never puts a unit
  below the uniform level the budget affords, so low priors cannot send layers to 2 bits when 4 fit. Its
  second start (when it is another point) keeps the Eq. 6 ranks at the highest bit-width where *they*
  fit: the first generation then holds both and selection decides whether bits or adapter ranks are
  worth more on this model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from autoqra.guidance.moves import greedy_fill
from autoqra.guidance.seeds import anchored_cost_seed, knapsack_seeds
from autoqra.space import Assignment, SearchSpace

_TAU: dict[str, Callable[[np.ndarray], np.ndarray]] = {"identity": lambda v: v, "sqrt": np.sqrt, "square": np.square}


def _round_to_ladder(values: np.ndarray, ladder: tuple[int, ...]) -> np.ndarray:
    lad = np.asarray(ladder, dtype=float)
    return np.argmin(np.abs(values[:, None] - lad[None, :]), axis=1)


def warm_start_seed(
    space: SearchSpace, importance_q: np.ndarray, importance_r: np.ndarray, tau: str = "identity"
) -> Assignment:
    """The Eq. 6 seed individual (not repaired): importance scaled onto each ladder and rounded."""
    if tau not in _TAU:
        raise ValueError(f"tau={tau!r} is not allowed; choose one of {sorted(_TAU)}")
    f = _TAU[tau]
    iq = np.clip(np.asarray(importance_q, dtype=float), 0.0, 1.0)
    ir = np.clip(np.asarray(importance_r, dtype=float), 0.0, 1.0)
    b, r = space.bits, space.ranks
    bi = _round_to_ladder(b[0] + (b[-1] - b[0]) * f(iq), b)
    ri = _round_to_ladder(r[0] + (r[-1] - r[0]) * f(ir), r)
    return space.decode(np.concatenate([bi, ri]))


def _uniform_start(space: SearchSpace, rank_options: list[np.ndarray], bytes_of: Callable[[np.ndarray], int],
                   budget_bytes: int) -> np.ndarray | None:
    """All units at the highest bit-width where one of ``rank_options`` (tried in order) fits; None if none."""
    for b in reversed(range(len(space.bits))):
        for r in rank_options:
            x = space.uniform_encoded(b, r)  # embedding / head units at 16 bits (their top), rank 0
            if bytes_of(x) <= budget_bytes:
                return x
    return None


def _fill(x: np.ndarray, space: SearchSpace, imp: np.ndarray, bytes_of: Callable[[np.ndarray], int],
          budget_bytes: int) -> np.ndarray:
    """Greedy fill: apply the fitting one-step upgrade with the most ``imp`` per byte added until none fits."""
    return greedy_fill(x, space.upper, lambda _: imp, bytes_of, budget_bytes)


def anchored_seeds(
    space: SearchSpace,
    importance_q: np.ndarray,
    importance_r: np.ndarray,
    bytes_of: Callable[[np.ndarray], int],
    budget_bytes: int,
    tau: str = "identity",
    eps: float = 1e-8,
) -> list[np.ndarray]:
    """Budget-anchored starts (encodings; see the module docstring), each filled greedily.

    1. *Bits first*: all units at the highest bit-width whose uniform assignment fits
       ``budget_bytes`` with the Eq. 6 ranks, or else with the lowest ranks. Eq. 6 ranks never
       pull this start below the uniform bit-width the budget affords.
    2. *Eq. 6 ranks first* (only when it differs from 1): all units at the highest bit-width where
       the Eq. 6 ranks fit. On a model where adapters cost as much as a bit-width step this is
       the better start; on a large LLM, where they are cheap, the two coincide.

    Fill: while some one-step upgrade (one unit's bits or rank one rung up) still fits, apply the
    one with the largest ``(I + eps) / bytes_added`` (ties: lowest variable index). Returns the
    ladder minimum's encoding alone when even that does not fit (repair then reports the
    infeasible budget).
    """
    n = space.n_units
    eq6_ranks = space.encode(warm_start_seed(space, importance_q, importance_r, tau))[n:]
    lowest = np.zeros(n, dtype=np.int64)
    imp = np.concatenate([np.asarray(importance_q, float), np.asarray(importance_r, float)]) + eps
    out: list[np.ndarray] = []
    for options in ([eq6_ranks, lowest], [eq6_ranks]):
        start = _uniform_start(space, options, bytes_of, budget_bytes)
        if start is not None:
            x = _fill(start, space, imp, bytes_of, budget_bytes)
            if not any(np.array_equal(x, y) for y in out):
                out.append(x)
    return out or [np.zeros(2 * n, dtype=np.int64)]


def first_generation_seeds(ctx: Any, warm_start: str, iq: np.ndarray, ir: np.ndarray, tau: str,
                           knapsack_k: int) -> list[np.ndarray] | None:
    """The encodings the first generation starts from, for the search problem ``ctx``
    (:class:`~autoqra.problem.Problem`): the ``warm_start`` start (``"eq6"``: :func:`warm_start_seed`, only with
    importance priors; ``"anchored"``: the cost model's anchored seed when there is a cost table, else
    :func:`anchored_seeds`; ``"none"``: nothing), then with a cost table up to ``knapsack_k`` knapsack optima
    (the optimum under each hedged calibration first), distinct. None: no seed (a random first generation)."""
    space, bytes_of, table, budget = ctx.space, ctx.bytes_encoded, ctx.cost_table, ctx.budget_bytes
    seed_x: list[np.ndarray] | None = None
    if warm_start == "eq6" and (ctx.importance_q is not None or ctx.importance_r is not None):
        seed_x = [space.encode(warm_start_seed(space, iq, ir, tau))]
    elif warm_start == "anchored":
        seed_x = ([anchored_cost_seed(space, table, bytes_of, budget)] if table is not None
                  else anchored_seeds(space, iq, ir, bytes_of, budget, tau))
    if table is not None and knapsack_k:
        extra = knapsack_seeds(space, table, bytes_of, budget, knapsack_k, ctx.memory)
        for t in ctx.seed_tables:
            extra = knapsack_seeds(space, t, bytes_of, budget, 1, ctx.memory)[:1] + extra
        seed_x = list(seed_x or [])
        for x in extra:
            if len(seed_x) < 1 + knapsack_k and not any(np.array_equal(x, y) for y in seed_x):
                seed_x.append(x)
    return seed_x
