"""Tests of the Pareto mask, the exact 2-D hypervolume and the HV stagnation rule."""


import numpy as np
import pytest
from pymoo.indicators.hv import HV

from autoqra.pareto import HVStagnation, hypervolume_2d, pareto_mask


def test_pareto_mask_hand_case():
    scores = [1.0, 2.0, 2.0, 0.5, 3.0, 3.0, np.nan]
    mems = [10, 20, 15, 10, 30, 30, 1]
    # (2, 20) is dominated by (2, 15); (0.5, 10) by (1, 10); the two (3, 30) copies are both kept.
    assert pareto_mask(scores, mems).tolist() == [True, False, True, False, True, True, False]


def test_pareto_mask_matches_brute_force():
    rng = np.random.default_rng(0)
    s, m = rng.integers(0, 8, 200).astype(float), rng.integers(0, 8, 200).astype(float)
    dom = [
        any((s[j] >= s[i]) and (m[j] <= m[i]) and (s[j] > s[i] or m[j] < m[i]) for j in range(200))
        for i in range(200)
    ]
    assert pareto_mask(s, m).tolist() == [not d for d in dom]


def test_pareto_mask_edge_cases():
    assert pareto_mask([], []).tolist() == []
    with pytest.raises(ValueError, match="same length"):
        pareto_mask([1.0], [1, 2])


def test_hypervolume_hand_cases():
    # Points (score 1, mem 1) and (2, 2) against ref (0, 3): 1*(2-1) + 2*(3-2) = 3.
    assert hypervolume_2d([1, 2], [1, 2], 0, 3) == pytest.approx(3.0)
    # A dominated point and points outside the reference box add nothing.
    assert hypervolume_2d([1, 2, 1.5, -1, 5], [1, 2, 2.5, 0.5, 4], 0, 3) == pytest.approx(3.0)
    assert hypervolume_2d([1], [1], 0, 3) == pytest.approx(2.0)
    assert hypervolume_2d([], [], 0, 3) == 0.0
    assert hypervolume_2d([-1], [5], 0, 3) == 0.0


def test_hypervolume_matches_pymoo():
    rng = np.random.default_rng(1)
    s, m = rng.random(50), rng.random(50)
    ref_s, ref_m = -0.1, 1.1
    expected = HV(ref_point=np.array([-ref_s, ref_m]))(np.stack([-s, m], axis=1))
    assert hypervolume_2d(s, m, ref_s, ref_m) == pytest.approx(expected, rel=1e-12)


def test_stagnation_rule():
    st = HVStagnation(window=3, rel_eps=1e-3)
    # Fewer than window + 1 entries never stop, even with zero gain.
    assert [st.update(v) for v in (1.0, 1.0, 1.0)] == [False, False, False]
    assert st.update(1.0) is True  # 4th entry: gain 0 < 1e-3
    st = HVStagnation(window=3, rel_eps=1e-3)
    assert not any(st.update(v) for v in (1.0, 1.5, 2.0, 2.5))
    assert st.update(2.5 + 2.0 * 0.9e-3) is False  # compares with hv[t-3] = 1.5: a large gain
    st = HVStagnation(window=2, rel_eps=0.01)
    seq = [1.0, 1.1, 1.105, 1.109]
    assert [st.update(v) for v in seq] == [False, False, False, True]  # 1.109 / 1.1 - 1 < 1 %
    st = HVStagnation(window=1, rel_eps=0.5)
    assert st.update(0.0) is False and st.update(0.0) is False  # hv(t - window) must be > 0
    st = HVStagnation(window=1, rel_eps=0.5)
    assert st.update(2.0) is False and st.update(1.0) is False  # decreasing HV never stops

    with pytest.raises(ValueError, match="window"):
        HVStagnation(window=0)
