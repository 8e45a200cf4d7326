"""Tests of the budget-feasible random-search baseline."""

import json

import pytest

from autoqra.evaluators.base import EvalResult
from autoqra.guidance.repair import make_repair
from autoqra.memory.model import MemoryModel
from autoqra.problem import Problem
from autoqra.searchers.base import get_searcher
from autoqra.searchers.random import RandomSearcher
from autoqra.space import SearchSpace


@pytest.fixture(scope="module")
def ctx(tiny):
    space = SearchSpace.from_model(tiny, bits=(2, 3, 4, 8), ranks=(0, 4, 8, 16), granularity="module")
    mm = MemoryModel(tiny, space, "hqq")
    b = mm.predict(space.uniform(3, 8)).model_bytes
    return Problem(space, mm, b, repair=make_repair(mm, b), seed=3)


def test_asks_are_feasible_unique_and_seeded(ctx):
    s = get_searcher("random", ctx)
    asks = s.ask(40) + s.ask(20)
    assert len(asks) == 60 and len(set(asks)) == 60
    assert all(ctx.feasible(a) for a in asks)
    assert get_searcher("random", ctx).ask(60) == asks


def test_pure_repair_mode_and_tiny_space(tiny):
    space = SearchSpace.from_model(tiny, bits=(2, 4), ranks=(0, 8), granularity="block")  # 16 points
    mm = MemoryModel(tiny, space, "hqq")
    b = mm.predict(space.uniform(4, 0)).model_bytes
    s = get_searcher("random", Problem.build(space, mm, b, seed=0), max_rejections=0)
    asks = s.ask(30)
    assert all(mm.predict(a).model_bytes <= b for a in asks)
    assert len(set(asks)) < 30  # fewer feasible points than asks: repeats are allowed, not endless loops


def test_state_round_trip_and_max_trials(ctx):
    s = get_searcher("random", ctx, max_trials=25)
    first = s.ask(10)
    s.tell(first, [EvalResult(score=float(i)) for i in range(10)])
    state = json.loads(json.dumps(s.state_dict()))
    r = RandomSearcher(max_trials=25)
    r.bind(ctx)
    r.load_state_dict(state)
    assert r.best == s.best and r.best[1] == 9.0
    later = r.ask(100)
    assert later == s.ask(100) and len(later) == 15
    assert not set(first) & set(later)  # resumed searcher remembers what was asked
    assert s.done and r.done and s.ask(5) == []
