"""Tests of the greedy budget repair (paper Eqs. 4-5)."""

import attrs
import numpy as np
import pytest

from autoqra.guidance.repair import low_bit_cap, make_repair
from autoqra.memory.model import MemoryModel
from autoqra.space import SearchSpace


def repair(a, mm, budget, iq, ir):
    """One-shot repair of ``a`` to ``budget`` bytes."""
    return make_repair(mm, budget, iq, ir)(a)


@pytest.fixture(scope="module")
def setup(tiny):
    space = SearchSpace.from_model(tiny, bits=(2, 3, 4, 8), ranks=(0, 4, 8, 16), granularity="module")
    mm = MemoryModel(tiny, space, "hqq")
    rng = np.random.default_rng(0)
    return space, mm, rng.random(space.n_units), rng.random(space.n_units)


def _reference_repair(space, mm, budget, iq, ir, a, target="model", eps=1e-8):
    """Slow textbook greedy: recompute every move's exact saving at every step."""
    imp = np.concatenate([iq, ir]) + eps
    x = space.encode(a)

    def nbytes(y):
        bd = mm.predict(space.decode(y))
        return bd.model_bytes if target == "model" else bd.train_bytes

    while nbytes(x) > budget:
        cur, best = nbytes(x), None
        for j in range(len(x)):
            if x[j] == 0:
                continue
            y = x.copy()
            y[j] -= 1
            saved = cur - nbytes(y)
            if saved > 0 and (best is None or imp[j] / saved < best[0]):
                best = (imp[j] / saved, j)
        x[best[1]] -= 1
    return space.decode(x)


def test_random_inputs_become_feasible_by_downward_moves(setup):
    space, mm, iq, ir = setup
    budget = mm.predict(space.uniform(3, 4)).model_bytes
    rep = make_repair(mm, budget, iq, ir)
    rng = np.random.default_rng(1)
    n_over = 0
    for _ in range(60):
        a = space.sample(rng)
        n_over += mm.predict(a).model_bytes > budget
        b = rep(a)
        assert mm.predict(b).model_bytes <= budget
        assert np.all(space.encode(b) <= space.encode(a))
    assert n_over > 30


def test_matches_the_reference_greedy(setup):
    space, mm, iq, ir = setup
    budget = mm.predict(space.uniform(3, 8)).model_bytes
    rep = make_repair(mm, budget, iq, ir)
    rng = np.random.default_rng(2)
    for _ in range(15):
        a = space.sample(rng)
        assert rep(a) == _reference_repair(space, mm, budget, iq, ir, a)


def test_feasible_input_is_returned_unchanged(setup):
    space, mm, iq, ir = setup
    a = space.uniform(4, 8)
    assert repair(a, mm, mm.predict(a).model_bytes, iq, ir) is a


def test_picks_least_importance_per_byte(setup):
    space, mm, _, _ = setup
    n = space.n_units
    a = space.maximum()
    budget = mm.predict(a).model_bytes - 1  # one step is enough
    # Uniform importance: the single move saving the most bytes wins.
    out = repair(a, mm, budget, np.ones(n), np.ones(n))
    savings = {}
    for b in space.neighbours(a):
        savings[b] = mm.predict(a).model_bytes - mm.predict(b).model_bytes
    assert out == max(savings, key=savings.get)
    # A zero-importance unit's bits are given up first, even if another move saves more bytes.
    iq = np.ones(n)
    iq[5] = 0.0
    out = repair(a, mm, budget, iq, np.ones(n))
    assert out.bits[5] == 4 and out.bits[:5] + out.bits[6:] == a.bits[:5] + a.bits[6:] and out.ranks == a.ranks
    # Rank moves are scored with I_r.
    ir = np.ones(n)
    ir[7] = 0.0
    out = repair(a, mm, budget, np.ones(n), ir)
    assert out.ranks[7] == 8 and out.bits == a.bits


def test_deterministic_tie_break_prefers_lowest_index(setup):
    space, mm, _, _ = setup
    n = space.n_units
    a = space.maximum()
    out = repair(a, mm, mm.predict(a).model_bytes - 1, np.zeros(n), np.zeros(n))
    again = repair(a, mm, mm.predict(a).model_bytes - 1, np.zeros(n), np.zeros(n))
    assert out == again


def test_infeasible_budget_names_minimum_bytes(setup):
    space, mm, iq, ir = setup
    min_bytes = mm.predict(space.minimum()).model_bytes
    with pytest.raises(ValueError, match=str(min_bytes)):
        repair(space.maximum(), mm, min_bytes - 1, iq, ir)
    assert repair(space.maximum(), mm, min_bytes, iq, ir) == space.minimum()


def test_train_target(setup):
    space, mm, iq, ir = setup
    budget = mm.predict(space.uniform(4, 4)).train_bytes
    rep = make_repair(mm, budget, iq, ir, target="train")
    rng = np.random.default_rng(3)
    for _ in range(5):
        a = space.sample(rng)
        b = rep(a)
        assert mm.predict(b).train_bytes <= budget
        assert b == _reference_repair(space, mm, budget, iq, ir, a, target="train")


def test_bad_arguments(setup):
    space, mm, iq, ir = setup
    with pytest.raises(ValueError, match="target"):
        make_repair(mm, 10**9, iq, ir, target="gpu")
    with pytest.raises(ValueError, match="importance_q"):
        make_repair(mm, 10**9, iq[:3], ir)


def test_low_bit_cap_promotes_most_important_first(setup):
    space, _, _, _ = setup
    n = space.n_units
    a = space.uniform(2, 4)
    imp = np.arange(n, dtype=float)  # the last units are the most important
    out = low_bit_cap(a, space, 0.5, imp)
    assert sum(b == 2 for b in out.bits) == n // 2
    assert all(b == 3 for b in out.bits[n - n // 2 :]) and all(b == 2 for b in out.bits[: n // 2])
    assert low_bit_cap(space.uniform(4, 4), space, 0.0, imp) == space.uniform(4, 4)


def test_repair_with_low_bit_cap(setup):
    space, mm, iq, ir = setup
    budget = mm.predict(space.uniform(3, 0)).model_bytes
    rep = make_repair(mm, budget, iq, ir, max_lowbit_fraction=0.25)
    rng = np.random.default_rng(4)
    for _ in range(10):
        b = rep(space.sample(rng))
        assert mm.predict(b).model_bytes <= budget
        assert sum(x == 2 for x in b.bits) <= int(0.25 * space.n_units)


class _SharedBytesMemory:
    """Test double: the hqq memory model plus 40 kB of shared bytes per distinct bit-width used."""

    def __init__(self, mm):
        self.mm, self.space = mm, mm.space
        self.backend = self

    def shared_bytes(self, bits_used):
        return 40_000 * len(set(bits_used))

    def _extra(self, bd, bit_idx):
        return attrs.evolve(bd, quant_meta_bytes=bd.quant_meta_bytes + self.shared_bytes(bit_idx))

    def predict(self, a):
        return self._extra(self.mm.predict(a), a.bits)

    def predict_encoded(self, x):
        return self._extra(self.mm.predict_encoded(x), np.asarray(x)[: self.space.n_units].tolist())

    def model_bytes_encoded(self, X):
        return np.array([self.predict_encoded(x).model_bytes for x in np.atleast_2d(X)])


def test_non_additive_shared_bytes_match_the_reference(setup):
    space, mm, iq, ir = setup
    shared = _SharedBytesMemory(mm)
    budget = shared.predict(space.uniform(3, 4)).model_bytes
    rep = make_repair(shared, budget, iq, ir)
    assert not rep._additive and make_repair(mm, budget)._additive
    rng = np.random.default_rng(5)
    for _ in range(8):
        a = space.sample(rng)
        b = rep(a)
        assert shared.predict(b).model_bytes <= budget
        assert b == _reference_repair(space, shared, budget, iq, ir, a)
