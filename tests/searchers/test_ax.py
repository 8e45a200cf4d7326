"""Tests of the Ax (``ax.api.Client``) searcher: feasibility, trial bookkeeping, failures, resume.

Most tests use Ax's ``random_search`` method (fast) on 14 module units; one test drives the
default BO strategy on a 2-unit block space. Scores come from ``sphere_test_function``, a
synthetic objective that exists only here.
"""

import json

import numpy as np
import pytest

from autoqra.evaluators.base import EvalResult
from autoqra.memory.model import MemoryModel
from autoqra.problem import Problem
from autoqra.searchers.ax import AxSearcher
from autoqra.searchers.base import get_searcher
from autoqra.space import SearchSpace


def greedy_repair(space, mm, budget):
    """Test repair: step down the variable saving the most bytes until the budget holds."""

    def nbytes(x):
        return mm.predict(space.decode(x)).model_bytes

    def repair(a):
        x = space.encode(a)
        while (cur := nbytes(x)) > budget and x.any():
            steps = [x - (np.arange(len(x)) == j) for j in range(len(x))]
            x = steps[int(np.argmax([cur - nbytes(y) if y.min() >= 0 else -1 for y in steps]))]
        return space.decode(x)

    return repair


@pytest.fixture(scope="module")
def ctx(tiny):
    space = SearchSpace.from_model(tiny, granularity="module")
    mm = MemoryModel(tiny, space, "hqq")
    budget = mm.predict(space.uniform(3, 8)).model_bytes
    return Problem(space, mm, budget, repair=greedy_repair(space, mm, budget), seed=0)


def sphere_test_function(space, target=0.6):
    """Test function: ``-‖ordinal(a) − target‖²``."""
    return lambda a: -float(np.sum((space.ordinal(a) - target) ** 2))


def statuses(s):
    return s.client.summarize()["trial_status"].value_counts().to_dict()


def warm(ctx, n=4, seed=1):
    rng = np.random.default_rng(seed)
    pts = list(dict.fromkeys(ctx.repair(ctx.space.sample(rng)) for _ in range(n)))
    f = sphere_test_function(ctx.space)
    return pts, [EvalResult(score=f(a)) for a in pts]


def test_registered_and_validation(ctx):
    assert isinstance(get_searcher("ax", ctx), AxSearcher)
    with pytest.raises(ValueError, match="objective"):
        AxSearcher(objective="loss")
    with pytest.raises(ValueError, match="method"):
        AxSearcher(method="turbo")


def test_asks_feasible_completes_trials_and_failures(ctx):
    f = sphere_test_function(ctx.space)
    s = get_searcher("ax", ctx, method="random_search", max_trials=9)
    pts, res = warm(ctx)
    s.tell(pts, res)  # warm start: attached as completed trials, sets the utility ranges
    assert s.scale is not None and statuses(s) == {"COMPLETED": len(pts)}
    asked = []
    while not s.done:
        batch = s.ask(3)
        assert batch and all(ctx.feasible(a) for a in batch)
        results = [EvalResult(score=f(a)) for a in batch]
        results[0] = EvalResult(status="oom", error="CUDA out of memory")
        s.tell(batch, results)
        asked += batch
    assert len(asked) == 9 and len(set(asked) | set(pts)) == 9 + len(pts) and s.ask(2) == []
    st = statuses(s)
    assert st["COMPLETED"] == len(pts) + 6 and st["FAILED"] == 3
    assert st.get("ABANDONED", 0) >= len(s.repairs) > 0  # budget-repaired proposals were substituted
    for r in s.repairs:
        assert not ctx.feasible(ctx.space.make(r["proposed"]["bits"], r["proposed"]["ranks"]))
    best_a, best_u = s.best
    assert best_u == max(s.scale(sc, ctx.bytes_of(a)) for a, sc, _ in s.told if sc is not None)


def test_state_round_trip_resumes(ctx):
    s = get_searcher("ax", ctx, method="random_search", objective="score")
    pts, res = warm(ctx)
    res[1] = EvalResult(status="nan")
    s.tell(pts, res)
    batch = s.ask(2)
    s.tell(batch, [EvalResult(score=-1.0), EvalResult(score=-2.0)])
    state = json.loads(json.dumps(s.state_dict()))
    r = AxSearcher(method="random_search", objective="score")
    r.bind(ctx)
    r.load_state_dict(state)
    assert r.told == s.told and r.best == s.best and r.n_asked == s.n_asked
    assert statuses(r) == {"COMPLETED": len(pts) + 1, "FAILED": 1}
    nxt = r.ask(2)
    assert len(nxt) == 2 and all(ctx.feasible(a) for a in nxt) and not set(nxt) & {a for a, _, _ in s.told}


def test_default_bo_strategy_on_block_space(tiny):
    space = SearchSpace.from_model(tiny, granularity="block")  # 2 units: 4 Ax parameters
    mm = MemoryModel(tiny, space, "hqq")
    budget = mm.predict(space.uniform(4, 8)).model_bytes
    ctx = Problem(space, mm, budget, repair=greedy_repair(space, mm, budget), seed=0)
    f = sphere_test_function(space, 0.5)
    s = get_searcher("ax", ctx, objective="score", initialization_budget=3)
    got = []
    for _ in range(5):
        batch = s.ask(1)
        s.tell(batch, [EvalResult(score=f(a)) for a in batch])
        got += batch
    assert len(got) >= 4 and all(ctx.feasible(a) for a in got)
    methods = set(s.client.summarize()["generation_node"])
    assert any("MBM" in str(m) or "BoTorch" in str(m) for m in methods), methods


def test_same_seed_same_asks(ctx):
    asks = [get_searcher("ax", ctx, method="random_search").ask(3) for _ in range(2)]
    assert asks[0] == asks[1] and len(asks[0]) == 3
