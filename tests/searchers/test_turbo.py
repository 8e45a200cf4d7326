"""Tests of the Phase-II TuRBO searcher (trust region, candidates, EI stopping, resume).

Search mechanics are driven by ``sphere_test_function``, a synthetic objective with a known
optimum that exists only here.
"""

import json
import math

import numpy as np
import pytest

from autoqra.evaluators.base import EvalResult
from autoqra.memory.model import MemoryModel
from autoqra.problem import Problem
from autoqra.searchers.base import get_searcher
from autoqra.searchers.turbo import TurboSearcher, UtilityScale
from autoqra.space import SearchSpace


@pytest.fixture(scope="module")
def problem(tiny):
    """(space, memory, budget bytes, fast greedy repair) on 14 module units (d = 28)."""
    space = SearchSpace.from_model(tiny, granularity="module")
    mm = MemoryModel(tiny, space, "hqq")
    budget = mm.predict(space.uniform(4, 8)).model_bytes
    x0, base = space.encode(space.minimum()), mm.predict(space.minimum()).model_bytes
    cost = []  # model_bytes is additive over variables: cost[j][k] = extra bytes of variable j at index k
    for j in range(len(x0)):
        ys = [np.where(np.arange(len(x0)) == j, k, x0) for k in range(space.upper[j] + 1)]
        cost.append(np.array([mm.predict(space.decode(y)).model_bytes - base for y in ys]))

    def nbytes(x):
        return base + sum(int(cost[j][x[j]]) for j in range(len(x)))

    def repair(a):  # step down the variable saving the most bytes until the budget holds
        x = space.encode(a)
        while nbytes(x) > budget and x.any():
            j = int(np.argmax([cost[j][x[j]] - cost[j][x[j] - 1] if x[j] else -1 for j in range(len(x))]))
            x[j] -= 1
        return space.decode(x)

    rng = np.random.default_rng(0)
    for _ in range(5):
        a = space.sample(rng)
        assert nbytes(space.encode(a)) == mm.predict(a).model_bytes
    return space, mm, budget, repair


def make_ctx(problem, seed=0):
    space, mm, budget, repair = problem
    return Problem(space, mm, budget, repair=repair, seed=seed)


def sphere_test_function(space, target):
    """Test function: ``-‖ordinal(a) − target‖²`` (maximum 0 at ``target``)."""
    return lambda a: -float(np.sum((space.ordinal(a) - target) ** 2))


def warm(ctx, f, n=8, seed=1):
    rng = np.random.default_rng(seed)
    pts = list(dict.fromkeys(ctx.repair(ctx.space.sample(rng)) for _ in range(n)))
    return pts, [EvalResult(score=f(a)) for a in pts]


def searcher(ctx, **kw):
    s = TurboSearcher(**kw)
    s.bind(ctx)
    return s


def test_registered_and_validation(problem):
    ctx = make_ctx(problem)
    assert isinstance(get_searcher("turbo", ctx), TurboSearcher)
    with pytest.raises(ValueError, match="alpha"):
        TurboSearcher(alpha=1.5)
    assert searcher(ctx).failure_tolerance == 5  # min(5, max(4, 28) / 1)
    assert searcher(ctx, batch_size=8).failure_tolerance == 4  # ceil(28 / 8)


def test_trust_region_doubles_halves_and_collapses(problem):
    ctx = make_ctx(problem)
    space = ctx.space
    s = searcher(ctx, alpha=1.0, success_tolerance=2, failure_tolerance=3, length_init=0.4, length_min=0.15)
    lo = space.uniform(2, 0)
    s.tell([lo, space.uniform(3, 4)], [EvalResult(score=0.0), EvalResult(score=1.0)])  # warm start; utility = score
    assert s.length == 0.4 and s.iteration == 0
    s.tell([space.uniform(4, 8)], [EvalResult(score=2.0)])
    assert (s.n_success, s.length) == (1, 0.4)
    s.tell([space.uniform(3, 8)], [EvalResult(score=3.0)])
    assert (s.n_success, s.length) == (0, 0.8)
    s.tell([space.uniform(3, 0)], [EvalResult(score=3.0001)])  # < 1e-3 relative improvement: failure
    s.tell([space.uniform(2, 4)], [EvalResult(status="failed", error="oom")])  # failed: a failure
    assert (s.n_failure, s.length) == (2, 0.8)
    s.tell([space.uniform(2, 8)], [EvalResult(score=-5.0)])
    assert (s.n_failure, s.length, s.done) == (0, 0.4, False)
    for k in range(3):
        s.tell([space.uniform(2, 16 if k else 0)], [EvalResult(score=-1.0)])
    assert s.length == 0.2 and not s.done
    for _ in range(3):
        s.tell([space.uniform(2, 4)], [EvalResult(score=-1.0)])
    assert s.done and "collapsed" in s.stop_reason and s.ask(1) == []
    assert [sc for a, sc, _ in s.told if a == space.uniform(2, 4)][0] is None  # failed: kept out of the GP


def test_utility_normalised_over_first_pareto_front(problem):
    ctx = make_ctx(problem)
    space = ctx.space
    front = [space.uniform(2, 0), space.uniform(3, 8)]
    dominated = space.uniform(4, 8)  # more bytes and a worse score than uniform(3, 8)
    s = searcher(ctx, alpha=0.6)
    s.tell([*front, dominated], [EvalResult(score=1.0), EvalResult(score=3.0), EvalResult(score=-9.0)])
    b0, b1 = (ctx.bytes_of(a) for a in front)
    assert s.scale == UtilityScale(0.6, 1.0, 3.0, b0, b1)
    assert s.utility(3.0, b1) == pytest.approx(0.6 - 0.4) and s.utility(1.0, b0) == 0.0
    s.tell([space.uniform(8, 0)], [EvalResult(score=100.0)])  # later tells never move the ranges
    assert s.scale == UtilityScale(0.6, 1.0, 3.0, b0, b1)
    flat = UtilityScale.from_front([2.0], [5.0], 0.5)
    assert flat(3.0, 7.0) == pytest.approx(0.5 - 1.0)  # degenerate ranges count as 1


def test_asks_feasible_inside_box_and_unseen(problem):
    ctx = make_ctx(problem)
    f = sphere_test_function(ctx.space, np.full(2 * ctx.space.n_units, 0.6))
    s = searcher(ctx, n_candidates=64)
    pts, res = warm(ctx, f)
    s.tell(pts, res)
    asks = s.ask(3)
    assert len(asks) == 3 and len(set(asks)) == 3
    lo, hi = (np.array(v) for v in s.last_box)
    centre = ctx.space.encode(s.incumbent()[0])
    assert np.all(lo <= centre) and np.all(centre <= hi)
    for a in asks:
        x = ctx.space.encode(a)
        assert ctx.feasible(a) and a not in pts and np.all((lo <= x) & (x <= hi))
    h = s.history[-1]
    assert h["n_candidates"] >= 3 and h["max_ei"] == s.last_max_ei > 0 and h["L"] == 0.8
    assert not set(asks) & set(s.ask(2))  # pending asks are not proposed again


def test_ei_saturation_on_flat_objective(problem):
    ctx = make_ctx(problem)
    s = searcher(ctx, alpha=1.0, n_candidates=64)  # utility = normalised score only
    pts, res = warm(ctx, lambda a: 0.5, n=10)
    s.tell(pts, res)
    assert s.ask(1) == []
    assert s.done and "EI saturation" in s.stop_reason and s.last_max_ei < 1e-4


def test_improves_sphere_within_8_iterations(problem):
    ctx = make_ctx(problem)
    f = sphere_test_function(ctx.space, np.random.default_rng(1).random(2 * ctx.space.n_units))
    s = searcher(ctx, n_candidates=128, max_iterations=8)
    pts, res = warm(ctx, f, n=10)
    s.tell(pts, res)
    start = s.incumbent()[1]
    while not s.done:
        asks = s.ask(1)
        s.tell(asks, [EvalResult(score=f(a)) for a in asks])
    assert s.iteration == 8 and "max_iterations" in s.stop_reason
    assert s.incumbent()[1] > start + 0.05
    assert [h["iteration"] for h in s.history] == list(range(8))


def test_seeded_and_state_round_trip(problem):
    ctx = make_ctx(problem, seed=7)
    f = sphere_test_function(ctx.space, np.full(2 * ctx.space.n_units, 0.4))
    pts, res = warm(ctx, f)
    s1, s2 = searcher(ctx, n_candidates=64), searcher(ctx, n_candidates=64)
    s1.tell(pts, res)
    s2.tell(pts, res)
    first = s1.ask(2)
    assert first == s2.ask(2)  # same seed, same data -> same asks
    s1.tell(first, [EvalResult(score=f(first[0])), EvalResult(status="nan")])
    state = json.loads(json.dumps(s1.state_dict()))
    r = searcher(ctx, n_candidates=64)
    r.load_state_dict(state)
    assert r.state_dict() == s1.state_dict()
    assert r.ask(1) == s1.ask(1)


def test_random_design_without_warm_start(problem):
    ctx = make_ctx(problem)
    s = searcher(ctx)
    asks = s.ask(4)
    assert len(set(asks)) == 4 and all(ctx.feasible(a) for a in asks)
    s.tell(asks, [EvalResult(status="failed")] * 4)  # nothing ok yet: no ranges, no crash
    assert s.scale is None and s.incumbent() is None and math.isfinite(s.length)
