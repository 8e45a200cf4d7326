"""Executors without a Ray cluster: the local executor, batch evaluation in the optimizer (order,
limits, store), TuRBO batch asks, executor options in config/CLI, and Ray's optional import."""

import sys
import types

import attrs
import numpy as np
import pytest
from _helpers import ScoreEvaluator

import autoqra
from autoqra.config import OptimizeConfig
from autoqra.evaluators.base import EvalResult, Fidelity
from autoqra.executors import Done, Executor, LocalExecutor, make_executor
from autoqra.guidance.importance import Importance
from autoqra.guidance.repair import make_repair
from autoqra.memory.model import MemoryModel
from autoqra.optimizer import AutoQRA, LimitReached, SearchSettings
from autoqra.problem import Problem
from autoqra.searchers.turbo import TurboSearcher
from autoqra.space import SearchSpace
from autoqra.store import TrialStore

LOW, HIGH = Fidelity(1, "low"), Fidelity(2, "high")


class ReversedExecutor(Executor):
    """Runs the whole batch, then yields the outcomes last-first (completion order ≠ candidate order)."""

    name = "reversed"

    def __init__(self, evaluator, n_workers=2):
        self.evaluator, self.n_workers, self.started = evaluator, n_workers, []

    def bind(self, evaluator):
        self.evaluator = evaluator

    def submit_batch(self, items, may_start=None):
        done = []
        for i, (a, f) in enumerate(items):
            if may_start is not None and not may_start(i):
                break
            self.started.append(i)
            done.append(Done(i, self.evaluator.evaluate(a, f), {"executor": "reversed"}))
        yield from reversed(done)


@pytest.fixture(scope="module")
def parts(tiny):
    space = SearchSpace.from_model(tiny, bits=(2, 4, 8), ranks=(0, 4, 8))
    mm = MemoryModel(tiny, space, "hqq")
    eval_space = attrs.evolve(space, bits=(2, 4, 8, 16))
    return space, mm, eval_space


def make_run(parts, evaluator, executor=None, store=None, **kw):
    space, mm, _ = parts
    budget = mm.predict(space.uniform(4, 8)).model_bytes
    problem = Problem.build(space, mm, budget, importance=Importance.uniform(space.n_units), seed=0)
    settings = SearchSettings(**{**dict(low=LOW, high=HIGH, phase1="nsga2", phase2="turbo", pop_size=4, promote_k=2,
                                        max_generations=1, phase2_iterations=2, alpha=0.6, choose_alpha=1.0), **kw})
    return AutoQRA(problem, evaluator, TrialStore(None) if store is None else store, settings, fingerprint="fp",
                   executor=executor)


def cands(parts):
    space = parts[0]
    return [space.uniform(2, 0), space.uniform(4, 4), space.uniform(2, 8), space.uniform(4, 0)]


def test_local_executor_runs_in_order_and_stops_when_asked(parts):
    ev = ScoreEvaluator(parts[2])
    ex = LocalExecutor(ev)
    items = [(a, LOW) for a in cands(parts)]
    out = list(ex.submit_batch(items))
    assert [d.index for d in out] == [0, 1, 2, 3] and ex.n_workers == 1
    assert [d.result.score for d in out] == [ev.evaluate(a, LOW).score for a, _ in items]
    assert all(d.worker["executor"] == "local" and d.worker["pid"] > 0 for d in out)
    ev.calls.clear()
    out = list(ex.submit_batch(items, may_start=lambda i: i < 2))
    assert [d.index for d in out] == [0, 1] and len(ev.calls) == 2


def test_batch_results_in_candidate_order_and_stored_as_they_finish(parts):
    ev = ScoreEvaluator(parts[2])
    ex = ReversedExecutor(ev)
    st = TrialStore(None)
    puts = []
    put = st.put
    st.put = lambda t: (puts.append(t.key), put(t))
    run = make_run(parts, ev, ex, store=st)
    cs = cands(parts)
    res = run.runner.evaluate_many(cs, LOW, "phase1")
    assert [r.score for r in res] == [ScoreEvaluator(None).evaluate(a, LOW).score for a in cs]
    keys = [run.runner.key_of(a, LOW) for a in cs]
    assert puts == keys[::-1]  # stored in completion order ...
    assert run.runner.run_keys == keys  # ... recorded in candidate order
    assert [t.key for t in run.trials()] == keys and len(st) == 4
    assert all(t.extra["worker"] == {"executor": "reversed"} for t in st.trials())
    assert run.runner.eval_seconds > 0 and run.runner.trial_seconds == pytest.approx(0.04)
    # stored trials are read back, repeats within a batch run once
    ev.calls.clear()
    again = run.runner.evaluate_many([cs[1], cs[1], parts[0].uniform(8, 8)], LOW, "phase1")
    assert len(ev.calls) == 1 and again[0].score == again[1].score == res[1].score
    assert run.runner.n_evals == 7 and run.runner.n_run == 5 and run.runner.evaluate(cs[0], LOW, "phase1").score == res[0].score


def test_trial_limit_mid_batch_evaluates_only_what_fits(parts):
    ev = ScoreEvaluator(parts[2])
    cs = cands(parts)
    run = make_run(parts, ev, ReversedExecutor(ev), max_trials=3)
    run.runner.evaluate_many(cs[:1], LOW, "phase1")
    with pytest.raises(LimitReached, match="trial limit 3") as e:
        run.runner.evaluate_many(cs, HIGH, "phase1")
    assert len(ev.calls) == 3 and run.runner.n_evals == 3  # 1 + the 2 that fit
    assert [r is not None for r in e.value.results] == [True, True, False, False]
    assert len(run.runner.store) == 3 and len(run.trials()) == 3


def test_stored_trials_count_against_the_trial_limit(parts):
    """A run over a store that already holds its trials makes exactly as many trials as a fresh one."""
    ev = ScoreEvaluator(parts[2])
    cs = cands(parts)
    full = make_run(parts, ev, ReversedExecutor(ev))
    full.runner.evaluate_many(cs, HIGH, "phase1")  # every candidate is in the store now
    limited = make_run(parts, ev, ReversedExecutor(ev), store=full.store, max_trials=2)
    ev.calls.clear()
    with pytest.raises(LimitReached, match="trial limit 2") as e:
        limited.runner.evaluate_many([cs[0], cs[0], *cs[1:]], HIGH, "phase1")  # a repeat counts, too
    assert ev.calls == [] and limited.runner.n_evals == 2 and len(limited.trials()) == 1
    assert [r is not None for r in e.value.results] == [True, True] + [False] * (len(cs) - 1)


def test_time_limit_stops_new_starts(parts):
    ev = ScoreEvaluator(parts[2])
    run = make_run(parts, ev, LocalExecutor(ev), time_limit=1e-9)
    with pytest.raises(LimitReached, match="time limit"):
        run.runner.evaluate_many(cands(parts), LOW, "phase1")
    assert ev.calls == [] and len(run.runner.store) == 0


def test_full_search_same_keys_with_any_completion_order(parts):
    """A batch executor that finishes in reverse order makes the same decisions as the local one."""
    ev1, ev2 = ScoreEvaluator(parts[2]), ScoreEvaluator(parts[2])
    a = make_run(parts, ev1, LocalExecutor(ev1), phase2_batch=2).run()
    b = make_run(parts, ev2, ReversedExecutor(ev2)).run()
    assert b.phase2_history and b.executor == {"name": "reversed", "workers": 2}
    assert a.run_keys == b.run_keys and len(a.run_keys) > 8
    assert a.best.key == b.best.key


def test_baselines_cut_by_the_limit_keep_the_finished_ones(parts):
    ev = ScoreEvaluator(parts[2])
    run = make_run(parts, ev, ReversedExecutor(ev), max_trials=1)
    out = run.run()
    assert out.stopped == "trial limit 1 reached" and len(out.baselines) == 1
    assert list(out.baselines.values()) == out.run_keys


def test_turbo_batch_ask_returns_q_distinct_feasible_points(parts):
    space, mm, _ = parts
    budget = mm.predict(space.uniform(4, 8)).model_bytes
    imp = Importance.uniform(space.n_units)
    ctx = Problem(space, mm, budget, repair=make_repair(mm, budget, imp.q, imp.r, "model"), seed=0)
    s = TurboSearcher(batch_size=4, n_candidates=128)
    s.bind(ctx)
    rng = np.random.default_rng(1)
    warm = list(dict.fromkeys(ctx.repair(space.sample(rng)) for _ in range(10)))
    s.tell(warm, [EvalResult(score=-float(np.sum((space.ordinal(a) - 0.6) ** 2))) for a in warm])
    asks = s.ask(4)
    assert len(asks) == 4 and len(set(asks)) == 4
    assert all(ctx.feasible(a) and a not in warm for a in asks)
    assert not set(asks) & set(s.ask(4))  # pending points are not proposed again


def test_executor_options_are_validated():
    with pytest.raises(ValueError, match=r"executor='dask' is not a registered executor; registered executors: \['local', 'ray'\]"):
        OptimizeConfig(executor="dask")
    with pytest.raises(ValueError, match="workers=2 is not allowed with executor='local'"):
        OptimizeConfig(workers=2)
    with pytest.raises(ValueError, match="ray_address"):
        OptimizeConfig(ray_address="auto")
    with pytest.raises(ValueError, match="worker_resources key 'gpus'"):
        OptimizeConfig(executor="ray", worker_resources={"gpus": 1})
    with pytest.raises(ValueError, match=r"worker_resources\['num_gpus'\]=-1"):
        OptimizeConfig(executor="ray", worker_resources={"num_gpus": -1})
    with pytest.raises(ValueError, match="workers=0"):
        OptimizeConfig(executor="ray", workers=0)
    cfg = OptimizeConfig.from_dict({"executor": "ray", "ray_address": "auto", "workers": 8,
                                    "worker_resources": {"num_gpus": 1}, "phase2_batch": 4})
    assert OptimizeConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="executor='dask'"):
        make_executor("dask", ScoreEvaluator(None))


def test_cli_executor_flags():
    from autoqra.cli.main import build_parser
    from autoqra.cli.optimize import _executor_options

    p = build_parser()
    args = p.parse_args(["optimize", "--executor", "ray", "--ray-address", "auto", "--workers", "8",
                         "--worker-gpus", "1", "--phase2-batch", "4"])
    opts = _executor_options(args)
    assert opts == {"executor": "ray", "ray_address": "auto", "workers": 8, "phase2_batch": 4,
                    "worker_resources": {"num_gpus": 1.0}}
    OptimizeConfig.from_dict(opts)  # valid as config
    assert _executor_options(p.parse_args(["optimize"])) == {}
    with pytest.raises(ValueError, match="executor='dask' is not a registered executor"):  # the config checks names
        OptimizeConfig.from_dict(_executor_options(p.parse_args(["optimize", "--executor", "dask"])))


def test_missing_ray_is_a_clear_import_error(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'autoqra\[ray\]'"):
        make_executor("ray", ScoreEvaluator(None))
    with pytest.raises(ImportError, match=r"autoqra\[ray\]"):
        autoqra.optimize(tiny, "4bit", executor="ray", progress=False)


class _FakeRay(types.ModuleType):
    """Just enough of Ray for RayExecutor's start/stop logic."""

    def __init__(self, initialised):
        super().__init__("ray")
        self.initialised, self.calls, self.killed = initialised, [], []

    def is_initialized(self):
        return self.initialised

    def init(self, **kw):
        self.calls.append(("init", kw))
        self.initialised = True

    def shutdown(self):
        self.calls.append(("shutdown", {}))
        self.initialised = False

    def cluster_resources(self):
        return {"CPU": 3.0, "memory": 1e9}

    def put(self, obj):
        return ("ref", obj)

    def kill(self, actor, no_restart=True):
        self.killed.append(actor)

    def remote(self, cls):
        fake = self

        class Handle:
            def options(self, **res):
                fake.calls.append(("options", res))
                return self

            def remote(self, ref, threads):
                return ("actor", threads)

        return Handle()


@pytest.mark.parametrize("initialised", [False, True])
def test_ray_is_shut_down_only_if_the_executor_started_it(monkeypatch, initialised):
    from autoqra.executors.ray import RayExecutor

    fake = _FakeRay(initialised)
    monkeypatch.setitem(sys.modules, "ray", fake)
    ex = RayExecutor(ScoreEvaluator(None), workers=5)
    assert ex.n_workers == 3  # capped to what the cluster holds with the default {"num_cpus": 1}
    assert ("options", {"num_cpus": 1}) in fake.calls
    assert [c for c, _ in fake.calls].count("init") == (0 if initialised else 1)
    ex.close()
    ex.close()
    assert len(fake.killed) == 3
    assert [c for c, _ in fake.calls].count("shutdown") == (0 if initialised else 1)
    assert fake.initialised == initialised
    with pytest.raises(ValueError, match="cannot hold one worker"):
        RayExecutor(ScoreEvaluator(None), resources={"num_gpus": 1})


def test_optimize_closes_only_its_own_executor_even_on_ctrl_c(tiny, parts, monkeypatch):
    from autoqra.progress import Progress

    closed = []
    monkeypatch.setattr(LocalExecutor, "close", lambda self: closed.append(self))

    def interrupt(self, phase, result, cached, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "trial", interrupt)
    ev = ScoreEvaluator(parts[2])
    opts = dict(evaluator=ev, bits=(2, 4, 8), ranks=(0, 4, 8), preset="tiny", progress=False,
                embeddings="keep")  # the evaluator was built on the space without the embedding unit
    with pytest.raises(KeyboardInterrupt):
        autoqra.optimize(tiny, "4bit", **opts)
    assert len(closed) == 1 and closed[0].evaluator is ev
    mine = LocalExecutor()
    with pytest.raises(KeyboardInterrupt):
        autoqra.optimize(tiny, "4bit", executor=mine, **opts)
    assert len(closed) == 1 and mine.evaluator is ev and len(ev.calls) == 2  # bound, used, left open
