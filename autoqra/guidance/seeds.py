r"""Warm starts from the cost model: the calibrated anchored seed and the knapsack's k best.

* :func:`anchored_cost_seed`: every unit at the highest uniform bit-width whose assignment fits the
  budget without adapters, then :func:`~autoqra.guidance.moves.fill` spends the slack on the one-step
  upgrades of largest predicted gain per byte (the anchored rule of the priors-guided search, with
  calibrated nats in place of min–max normalised importances).
* :func:`knapsack_seeds`: the k best distinct assignments of the additive prediction under the
  budget, solved exactly by :func:`~autoqra.guidance.knapsack.k_best` over byte-exact per-unit option costs.
  Unlike the anchored seed it may put a unit *below* the uniform bit-width to pay for another's
  bits or ranks.

Per-unit option costs come from the memory model by differences around the ladder minimum; they are
exact because the memory model is additive over units (plus the backend's ``shared_bytes`` of the
bit-widths used, which is subtracted from the capacity at its largest).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from autoqra.guidance.knapsack import k_best
from autoqra.guidance.moves import fill
from autoqra.quant_backends import UNQUANTIZED_BITS
from autoqra.space import SearchSpace

BytesFn = Callable[[np.ndarray], int]


def option_costs(space: SearchSpace, bytes_of: BytesFn) -> tuple[np.ndarray, int]:
    """``(costs (n_units, n_bits·n_ranks), base)``: bytes of each unit's option above the ladder
    minimum (option index ``bi·n_ranks + ri``) and the footprint of the minimum itself."""
    n, nb, nr = space.n_units, len(space.bits), len(space.ranks)
    x0 = np.zeros(2 * n, dtype=np.int64)
    base = bytes_of(x0)
    costs = np.zeros((n, nb * nr), dtype=np.int64)
    for u in range(n):
        for bi, ri in itertools.product(range(nb), range(nr)):
            if bi == 0 and ri == 0:
                continue
            x = x0.copy()
            x[u], x[n + u] = bi, ri
            costs[u, bi * nr + ri] = bytes_of(x) - base
    return costs, base


def _shared_slack(memory, space: SearchSpace) -> int:
    """Largest ``shared_bytes`` the backend adds for any subset of the ladder (0 for most backends)."""
    shared = getattr(getattr(memory, "backend", None), "shared_bytes", None)
    if shared is None:
        return 0
    qb = [b for b in space.bits if b != UNQUANTIZED_BITS]
    subsets = itertools.chain.from_iterable(itertools.combinations(qb, k) for k in range(len(qb) + 1))
    return max(int(shared(list(c))) for c in subsets)


def knapsack_seeds(space: SearchSpace, table: np.ndarray, bytes_of: BytesFn, budget: int, k: int = 4,
                   memory=None) -> list[np.ndarray]:
    """The ``k`` best distinct encodings of the additive prediction ``table`` that fit ``budget``.

    Every returned encoding is checked with ``bytes_of`` (exact); one that does not fit (possible
    only through non-additive backend bytes) is dropped.
    """
    n, nr = space.n_units, len(space.ranks)
    costs, base = option_costs(space, bytes_of)
    shared0 = _shared_slack(memory, space) if memory is not None else 0
    res = k_best(table.reshape(n, -1), costs, budget - base - shared0, k=k)
    out = []
    for pick in res.choices:
        x = np.concatenate([pick // nr, pick % nr]).astype(np.int64)
        if bytes_of(x) <= budget:
            out.append(x)
    return out


def anchored_cost_seed(space: SearchSpace, table: np.ndarray, bytes_of: BytesFn, budget: int) -> np.ndarray:
    """Highest uniform bit-width that fits without adapters, then :func:`fill` by predicted gain per byte.

    Returns the ladder minimum when even that does not fit (repair then reports the budget).
    """
    n = space.n_units
    for b in reversed(range(len(space.bits))):
        x = space.uniform_encoded(b, 0)  # embedding / head units at 16 bits, as in a uniform reference
        if bytes_of(x) <= budget:
            return fill(x, np.asarray(space.upper, dtype=np.int64), table, bytes_of, budget)
    return np.zeros(2 * n, dtype=np.int64)
