"""The horizon-aware rank table: non-negative and non-decreasing in rank on noisy probes, shrunk by the
measured noise, scaled by the measured growth with the horizon."""

import numpy as np
import pytest

from autoqra.guidance.rankmodel import horizon_factor, rank_table, shrink

RANKS = (0, 4, 8, 16)


def noisy_probes(n=30, noise=0.004, signal=0.002, seed=0):
    rng = np.random.default_rng(seed)
    true = 0.003 + signal * rng.standard_normal(n)
    return true, {4: true + noise * rng.standard_normal(n), 16: true + 0.0005 + noise * rng.standard_normal(n)}


@pytest.mark.parametrize("seed", range(5))
def test_table_is_monotone_and_non_negative_on_noisy_probes(seed):
    _, loo = noisy_probes(seed=seed)
    assert (loo[4] < 0).any()  # the raw leave-one-out values do go negative
    table, info = rank_table(loo, RANKS, {10: 0.02, 30: 0.05}, t2=30, final_steps=60)
    assert table.shape == (30, 4)
    assert (table[:, 0] == 0).all() and (table >= 0).all()
    assert (np.diff(table, axis=1) >= -1e-15).all()
    assert info["raw_negative_units"] > 0 and info["horizon_factor"] > 1


def test_shrinkage_follows_the_noise():
    true, loo = noisy_probes(noise=0.004, signal=0.0005)
    table, info = rank_table(loo, RANKS)
    assert info["shrink"]["4"] < 0.3  # mostly noise: pulled to the mean
    quiet_true, quiet = noisy_probes(noise=0.0002, signal=0.003)
    table_q, info_q = rank_table(quiet, RANKS)
    assert info_q["shrink"]["4"] > 0.9  # mostly signal: kept
    err_raw = np.abs(loo[4] - true).mean()
    err_shrunk = np.abs(table[:, 1] - true).mean()
    assert err_shrunk < err_raw  # closer to the truth than the raw values
    v, lam = shrink(np.array([1.0, 2.0, 3.0]), None)
    assert lam == 1.0 and v.tolist() == [1.0, 2.0, 3.0]


def test_horizon_growth():
    f, beta = horizon_factor({10: 0.03, 40: 0.12}, t2=40, final_steps=80)  # linear growth: beta 1
    assert beta == pytest.approx(1.0) and f == pytest.approx(2.0)
    f, beta = horizon_factor({10: 0.03, 40: 0.06}, t2=40, final_steps=160)  # square-root growth
    assert beta == pytest.approx(0.5) and f == pytest.approx(2.0)
    assert horizon_factor({10: 0.05, 40: 0.02}, t2=40, final_steps=80) == (1.0, 0.0)  # shrinking: no extrapolation
    assert horizon_factor({40: 0.05}, t2=40, final_steps=80) == (1.0, 0.0)  # one horizon: unknown
    assert horizon_factor({10: 0.01, 40: 1.0}, t2=40, final_steps=80)[1] == 1.0  # clipped


def test_interpolation_between_probed_ranks():
    loo = {4: np.full(5, 0.01), 16: np.full(5, 0.03)}
    table, _ = rank_table(loo, (0, 4, 8, 16, 32))
    assert table[0].tolist() == pytest.approx([0, 0.01, 0.02, 0.03, 0.03])
    table1, info = rank_table({4: np.full(5, 0.01)}, (0, 4, 8))  # one probe: every positive rank alike
    assert table1[0].tolist() == pytest.approx([0, 0.01, 0.01]) and info["noise_sd"] is None
