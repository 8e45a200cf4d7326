"""Tests of the promotion surrogate (paper Eq. 7) on a synthetic low/high relation."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from autoqra.memory.model import MemoryModel
from autoqra.searchers.surrogate import PairRecord, Surrogate
from autoqra.space import SearchSpace


@pytest.fixture(scope="module")
def setup(tiny):
    space = SearchSpace.from_model(tiny, bits=(2, 3, 4, 8), ranks=(0, 4, 8, 16), granularity="module")
    return space, MemoryModel(tiny, space, "hqq")


def _synthetic_pairs(space, mm, n, seed):
    """Synthetic test relation: high = 0.3 * low + 2 * mean bit position (a bits interaction) + noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = space.sample(rng)
        low = rng.normal()
        high = 0.3 * low + 2.0 * space.ordinal(a)[: space.n_units].mean() + 0.05 * rng.normal()
        out.append(PairRecord(a, low, mm.predict(a).model_bytes, high))
    return out


def test_falls_back_to_low_fidelity_ranking(setup):
    space, mm = setup
    pairs = _synthetic_pairs(space, mm, 5, 0)
    sur = Surrogate(space, min_pairs=6).fit(pairs)
    assert not sur.is_fitted and sur.report()["n_pairs"] == 5
    cands = [(r.assignment, r.low, r.bytes) for r in pairs]
    assert np.array_equal(sur.predict_records(cands), [r.low for r in pairs])
    assert sur.rank(cands).tolist() == np.argsort([-r.low for r in pairs], kind="stable").tolist()


def test_beats_low_fidelity_ranking_and_is_deterministic(setup):
    space, mm = setup
    train, test = _synthetic_pairs(space, mm, 40, 1), _synthetic_pairs(space, mm, 60, 2)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    sur = Surrogate(space, seed=0).fit(train)
    assert torch.equal(torch.rand(3), expected_next)  # the global torch RNG is untouched
    high = [r.high for r in test]
    pred = sur.predict_records(test)
    rho_sur = spearmanr(pred, high).statistic
    rho_low = spearmanr([r.low for r in test], high).statistic
    assert rho_sur > rho_low + 0.05 and rho_sur > 0.85
    assert sur.last_spearman is not None and sur.last_spearman_low is not None
    assert np.array_equal(Surrogate(space, seed=0).fit(train).predict_records(test), pred)
    order = sur.rank(test)
    top = set(order[:10].tolist())
    assert np.mean([high[i] for i in top]) > np.mean(high)


def test_records_as_tuples_and_missing_high(setup):
    space, mm = setup
    pairs = _synthetic_pairs(space, mm, 8, 3)
    tuples = [(r.assignment, r.low, r.bytes, r.high) for r in pairs] + [(pairs[0].assignment, 0.0, 1, None)]
    sur = Surrogate(space, seed=1, max_epochs=50).fit(tuples)
    assert sur.is_fitted and sur.n_pairs == 8
    assert sur.feature_matrix(tuples).shape == (9, sur.n_features)
    assert np.all(np.isfinite(sur.predict(sur.feature_matrix(tuples))))
    with pytest.raises(ValueError, match="min_pairs"):
        Surrogate(space, min_pairs=1)
