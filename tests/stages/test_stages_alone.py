"""Each search stage read and tested alone: the trial runner, the fidelity ladder, the guidance strategies, the
front (instant synthetic evaluators; no training)."""

import math

import attrs
import numpy as np
import pytest
from _helpers import ScoreEvaluator

from autoqra.evaluators.base import EvalResult, Fidelity
from autoqra.guidance.costmodel import CostModel
from autoqra.guidance.importance import Importance
from autoqra.guidance.strategy import CostGuidance, PriorGuidance
from autoqra.memory.model import MemoryModel
from autoqra.problem import Problem
from autoqra.searchers.surrogate import PairRecord
from autoqra.space import SearchSpace
from autoqra.stages.baselines import uniform_baselines
from autoqra.stages.front import Front
from autoqra.stages.ladder import FidelityLadder
from autoqra.stages.runner import LimitReached, Limits, TrialRunner
from autoqra.store import TrialStore

LOW, MID, HIGH = Fidelity(0, "low"), Fidelity(1, "mid"), Fidelity(2, "high")


@pytest.fixture(scope="module")
def world(tiny):
    space = SearchSpace.from_model(tiny, bits=(2, 4, 8), ranks=(0, 4, 8))
    mm = MemoryModel(tiny, space, "hqq")
    problem = Problem.build(space, mm, mm.predict(space.uniform(4, 8)).model_bytes,
                            importance=Importance.uniform(space.n_units))
    return space, problem


def runner_for(problem, ev, **limits):
    return TrialRunner(TrialStore(None), ev, problem.footprint, problem.bytes_of, problem.budget_bytes,
                       backend_spec=problem.memory.backend.spec(), fingerprint="fp", limits=Limits(**limits))


def test_runner_reads_back_counts_repeats_and_stops_at_the_limit(world):
    space, problem = world
    ev = ScoreEvaluator(space.with_unquantized())
    r = runner_for(problem, ev, max_trials=5)
    a, b = space.uniform(4, 4), space.uniform(2, 8)
    first = r.evaluate_many([a, b, a], LOW, "phase1")
    assert [x.score for x in first] == [first[0].score, first[1].score, first[0].score] and len(ev.calls) == 2
    t, ran = r.trial(a, LOW, "phase1")
    assert not ran and t.score == first[0].score and r.n_evals == 4 and r.n_run == 2
    with pytest.raises(LimitReached, match="trial limit 5") as e:
        r.evaluate_many([space.uniform(8, 0), space.uniform(8, 4)], LOW, "phase1")
    assert e.value.results[0] is not None and e.value.results[1] is None and len(ev.calls) == 3
    assert [x.phase for x in r.trials()] == ["phase1"] * 3 and t.memory == problem.footprint(a)


def test_runner_without_a_budget_calls_nothing_over_budget(world, caplog):
    space, problem = world
    r = TrialRunner(TrialStore(None), ScoreEvaluator(space.with_unquantized()), problem.footprint, problem.bytes_of,
                    None, backend_spec=problem.memory.backend.spec(), fingerprint="fp")
    big = space.uniform(8, 8)
    assert problem.bytes_of(big) > problem.budget_bytes
    with caplog.at_level("INFO", logger="autoqra.progress"):
        r.trial(big, LOW, "final")
    assert "MB" in caplog.text and "over budget" not in caplog.text
    with caplog.at_level("INFO", logger="autoqra.progress"):
        runner_for(problem, ScoreEvaluator(space.with_unquantized())).trial(big, LOW, "final")
    assert "over budget" in caplog.text


def test_ladder_promotes_climbs_and_keeps_the_seed(world):
    space, problem = world
    ev = ScoreEvaluator(space.with_unquantized())
    r = runner_for(problem, ev)
    ladder = FidelityLadder(LOW, HIGH, MID, promote_k=1)
    cands = [space.uniform(2, 0), space.uniform(4, 8), space.uniform(8, 0), space.uniform(4, 4)]
    assert ladder.promote([3, 1, 2, 0]) == [3, 1]  # promote_k × 2 with a mid rung
    assert FidelityLadder(LOW, HIGH, None, promote_k=1, use_surrogate=False).promote([3, 1, 2]) == [3, 1, 2]
    assert ladder.generation_plan(4, first=True) == (4, 3, 3) and ladder.generation_plan(4, first=False) == (4, 2, 1)
    best = [EvalResult(score=-9.0)] * 4
    up = ladder.climb(r, cands, [3, 1], best)
    assert up == [1] and {c[1] for c in ev.calls} == {MID.steps}  # the better half by mid score goes on
    assert best[1].score > best[3].score > -9
    assert ladder.climb(r, cands, [3, 1], best, must=[0]) == [0, 1]  # the seed always reaches the top rung


def test_guidances_rank_screens_and_calibrate_into_a_new_problem(world):
    space, problem = world
    n = space.n_units
    quant = np.zeros((n, 4))
    quant[:, 0] = 1.0  # 2 bits: a nat of 0-step damage per unit
    gain = np.tile([0.0, 0.01, 0.02], (n, 1))
    cm = CostModel((2, 4, 8, 16), (0, 4, 8), quant, gain, quant_scale=0.5)
    g = CostGuidance(cm)
    p0 = g.prepare(problem)
    assert p0 is not problem and problem.cost_table is None and p0.cost_table.shape == (n, 3, 3)
    cands = [space.uniform(4, 0), space.uniform(4, 8), space.uniform(8, 0)]
    lows = [EvalResult(score=-3.0), EvalResult(score=-3.0), EvalResult(status="failed")]
    assert g.rank_screens(cands, lows, []) == [1, 0]  # equal screens: the adapter's predicted gain decides
    trials = []  # calibration on no trials keeps the scale, still returns a new problem with hedged seed tables
    p1 = g.calibrate(p0, trials)
    assert p1 is not p0 and len(p1.seed_tables) == 2
    assert g.phase1_options["objectives"] == "score" and callable(g.phase1_options["mutation"])
    pg = PriorGuidance(problem)
    recs = [PairRecord(a, r.score if r.ok else -1e9, problem.bytes_of(a)) for a, r in zip(cands, lows)]
    order = pg.rank_screens(cands, lows, recs)
    assert sorted(order) == [0, 1] and pg.calibrate(problem, trials) is problem
    assert pg.phase1_options["objectives"] == "pareto" and "surrogate" in pg.report([], 0, 2, n)


def test_front_choice_and_baselines(world):
    space, problem = world
    ev = ScoreEvaluator(space.with_unquantized())
    r = runner_for(problem, ev)
    named = uniform_baselines(problem)
    assert [n for n, _ in named][:3] == ["uniform-2bit-r8", "uniform-4bit-r8", "16bit-r8 (over budget, reference)"]
    r.evaluate_many([a for _, a in named] + [space.uniform(8, 8)], HIGH, "baseline")
    f = Front(r, problem, HIGH.steps)
    assert {t.assignment for t in f.feasible()} == {space.uniform(2, 8), space.uniform(4, 8)}
    assert f.choose(1.0).assignment == space.uniform(4, 8) and f.choose(0.0).assignment == space.uniform(2, 8)
    hv = f.hypervolume()
    assert hv > 0 and math.isfinite(hv) and f.best_score() == f.choose(1.0).score
    assert attrs.evolve(problem, budget_bytes=0).feasible(space.uniform(2, 0)) is False
