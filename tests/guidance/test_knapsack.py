"""The multiple-choice knapsack: exact k best against brute force, feasibility under rounding."""

import itertools

import numpy as np
import pytest

from autoqra.guidance.knapsack import k_best


def brute(values, costs, cap):
    n, m = values.shape
    sols = []
    for pick in itertools.product(range(m), repeat=n):
        c = sum(costs[u, o] for u, o in enumerate(pick))
        if c <= cap:
            sols.append((sum(values[u, o] for u, o in enumerate(pick)), pick))
    sols.sort(key=lambda t: -t[0])
    return sols


@pytest.mark.parametrize("seed", range(6))
def test_k_best_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, m = 5, 4
    values = rng.normal(size=(n, m))
    costs = rng.integers(1, 40, size=(n, m)) * 256 + 1000  # a common offset and a GCD of 256
    cap = int(np.sort(costs, axis=1)[:, 1].sum())
    res = k_best(values, costs, cap, k=6)
    ref = brute(values, costs, cap)
    assert res.exact and res.grain >= 256
    np.testing.assert_allclose(res.values, [v for v, _ in ref[:6]])
    assert len({tuple(c) for c in res.choices}) == len(res.choices)  # distinct
    for c, v, t in zip(res.choices, res.values, res.costs):
        assert t <= cap and t == costs[np.arange(n), c].sum()
        assert v == pytest.approx(values[np.arange(n), c].sum())


def test_coarse_grain_stays_feasible():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(6, 5))
    costs = rng.integers(10_000, 2_000_000, size=(6, 5))  # GCD ~1: far too many cells
    cap = int(costs.mean(axis=1).sum())
    res = k_best(values, costs, cap, k=3, max_cells=5_000)
    assert not res.exact and res.grain > 1
    best = brute(values, costs, cap)[0][0]
    assert all(t <= cap for t in res.costs)
    assert res.values[0] <= best + 1e-12 and res.values[0] > best - 1.0  # near-optimal, never infeasible


def test_nothing_fits_is_an_error():
    with pytest.raises(ValueError, match="no choice fits"):
        k_best(np.zeros((2, 2)), np.full((2, 2), 10), 5)
