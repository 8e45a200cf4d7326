r"""Exact multiple-choice knapsack over byte-exact option costs, with the k best distinct solutions.

Each unit ``u`` picks exactly one option ``o`` (a (bits, rank) pair) with an integer cost ``c[u, o]``
(bytes) and a value ``v[u, o]`` (predicted score, nats); the total cost must not exceed the capacity.
Dynamic programming over the cost axis is exact when costs are expressed in units of their greatest
common divisor ``g`` (measured: 256 bytes for SmolLM2 with HQQ and ranks 0/4/8/16, 141,840 cells for
the uniform-4-bit budget): every reachable byte total is a multiple of ``g`` above the per-unit
minima. When the number of cells would exceed ``max_cells``, costs are rounded *up* to a coarser
grain (solutions stay feasible; at most ``n_units · grain`` bytes of the capacity can go unused) and
``KnapsackResult.exact`` is False.

The k best: each DP cell keeps its ``k`` best partial values (with back-pointers), so the ``k`` best
*distinct* assignments under the capacity come out of one pass, best first.
"""

from __future__ import annotations

import math
from functools import reduce

import attrs
import numpy as np


@attrs.frozen
class KnapsackResult:
    """The k best solutions: ``choices[i]`` is one option index per unit, ``values[i]`` its total value.

    Attributes:
        grain: bytes per DP cell (the GCD of the costs, or a coarser rounding-up grain).
        exact: whether the grain is the GCD (no rounding).
    """

    choices: list[np.ndarray]
    values: list[float]
    costs: list[int]
    grain: int
    exact: bool


def k_best(values: np.ndarray, costs: np.ndarray, capacity: int, k: int = 1,
           max_cells: int = 400_000) -> KnapsackResult:
    """The ``k`` best distinct choices (one option per unit) with total cost ``<= capacity``.

    Args:
        values: ``(n_units, n_options)`` values to maximise (``-inf`` marks an option not allowed).
        costs: ``(n_units, n_options)`` integer costs (bytes).
        capacity: the budget for the summed costs (bytes).
        k: how many solutions (fewer come back when fewer feasible distinct ones exist).
        max_cells: DP width above which costs are rounded up to a coarser grain.

    Raises:
        ValueError: shapes differ, or no choice fits ``capacity``.
    """
    values = np.asarray(values, dtype=float)
    costs = np.asarray(costs, dtype=np.int64)
    if values.shape != costs.shape or values.ndim != 2:
        raise ValueError(f"values {values.shape} and costs {costs.shape} must be the same (n_units, n_options)")
    n, m = values.shape
    base = costs.min(axis=1)
    rel = costs - base[:, None]
    slack = int(capacity) - int(base.sum())
    if slack < 0:
        raise ValueError(f"no choice fits: the cheapest options need {int(base.sum())} > capacity {int(capacity)}")
    g = reduce(math.gcd, (int(x) for x in rel.ravel() if x), 0) or 1
    exact = True
    if slack // g + 1 > max_cells:
        g = max(g, math.ceil((slack + 1) / max_cells))
        exact = False
    w = -(-rel // g)  # ceil: rounding up keeps every DP solution feasible
    cells = slack // g + 1
    NEG = -np.inf
    # dp[c, j]: j-th best value with exactly c cells used so far (descending in j)
    dp = np.full((cells, k), NEG)
    dp[0, 0] = 0.0
    back_opt = np.zeros((n, cells, k), dtype=np.int16)
    back_rank = np.zeros((n, cells, k), dtype=np.int16)
    for u in range(n):
        cand = np.full((cells, m * k), NEG)
        for o in range(m):
            if not np.isfinite(values[u, o]):
                continue
            s = int(w[u, o])
            if s >= cells:
                continue
            cand[s:, o * k:(o + 1) * k] = dp[: cells - s] + values[u, o]
        if k == 1:
            idx = np.argmax(cand, axis=1)[:, None]
        else:
            part = np.argpartition(-cand, k - 1, axis=1)[:, :k] if m * k > k else np.tile(np.arange(k), (cells, 1))
            order = np.argsort(-np.take_along_axis(cand, part, axis=1), axis=1, kind="stable")
            idx = np.take_along_axis(part, order, axis=1)
        dp = np.take_along_axis(cand, idx, axis=1)
        back_opt[u] = idx // k
        back_rank[u] = idx % k
    # best k over all cells (distinct paths: each (cell, rank) is one path)
    flat = np.argsort(-dp.ravel(), kind="stable")[:k]
    choices, vals, tot = [], [], []
    for f in flat:
        c, j = divmod(int(f), k)
        v = float(dp[c, j])
        if not np.isfinite(v):
            break
        pick = np.zeros(n, dtype=np.int64)
        for u in range(n - 1, -1, -1):
            o, jj = int(back_opt[u, c, j]), int(back_rank[u, c, j])
            pick[u] = o
            c -= int(w[u, o])
            j = jj
        choices.append(pick)
        vals.append(v)
        tot.append(int(costs[np.arange(n), pick].sum()))
    if not choices:
        raise ValueError("no choice fits the capacity")
    return KnapsackResult(choices, vals, tot, g, exact)
