"""The Ray executor on a local Ray (2 CPUs, 2 workers) with the tiny model: same trials as the local
executor, real concurrency, results stored as they finish, killed workers, Ctrl-C and resume."""

import os
import signal
import sys
import time

import attrs
import pytest
import torch

import autoqra
from autoqra.config import TrainSpec
from autoqra.evaluators.base import EvalResult, Evaluator, Fidelity
from autoqra.evaluators.finetune import FinetuneEvaluator
from autoqra.guidance.importance import Importance
from autoqra.memory.model import MemoryModel
from autoqra.optimizer import AutoQRA, SearchSettings
from autoqra.problem import Problem
from autoqra.space import SearchSpace
from autoqra.store import TrialStore

ray = pytest.importorskip("ray")

TRAIN = TrainSpec(batch_size=2, seq_len=32, lr=2e-3)
SMALL = dict(preset="tiny", bits=(2, 4, 8), ranks=(0, 4, 8), train=TRAIN, low_steps=1, high_steps=2, pop_size=4,
             promote_k=2, max_generations=1, phase2_iterations=2, eval_blocks=2, importance_blocks=2, progress=False)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (starting Ray costs seconds); shut down afterwards."""
    if ray.is_initialized():
        ray.shutdown()
    # test-only classes below are shipped by value: the workers cannot import this test module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(local_ray):
    """Two CPU workers shared by the tests (a worker process costs seconds to start: it imports torch)."""
    from autoqra.executors.ray import RayExecutor

    ex = RayExecutor(None, workers=2, resources={"num_cpus": 1})
    yield ex
    ex.close()
    assert ray.is_initialized()  # the executor did not start Ray, so it leaves it running


class KillingEvaluator(FinetuneEvaluator):
    """Fine-tunes, but its worker kills itself (SIGKILL) the first ``kills[b]`` times it sees a uniform
    ``b``-bit assignment; marker files in ``marker_dir`` count the deaths across worker processes."""

    def __init__(self, *args, kills, marker_dir, **kw):
        super().__init__(*args, **kw)
        self.kills, self.marker_dir = kills, str(marker_dir)

    def evaluate(self, assignment, fidelity):
        bits = set(assignment.bits)
        if len(bits) == 1 and (b := bits.pop()) in self.kills:
            marker = os.path.join(self.marker_dir, f"died-{b}bit")
            n = int(open(marker).read()) if os.path.exists(marker) else 0
            if n < self.kills[b]:
                with open(marker, "w") as f:
                    f.write(str(n + 1))
                os.kill(os.getpid(), signal.SIGKILL)
        return super().evaluate(assignment, fidelity)


class SleepEvaluator(Evaluator):
    """Sleeps ``seconds``; with ``wait_for_rows`` it first waits (≤ 30 s) until the store file holds that
    many trials and reports how many it saw, which proves results reach the store while it runs."""

    name = "sleep"

    def __init__(self, space, seconds=0.0, store_path=None, slow_bits=None, wait_for_rows=0):
        self.space, self.seconds, self.store_path = space, seconds, store_path
        self.slow_bits, self.wait_for_rows = slow_bits, wait_for_rows

    def spec(self):
        return {"name": self.name}

    def evaluate(self, a, fidelity):
        t0, seen = time.perf_counter(), -1
        if self.slow_bits is not None and a.bits[0] == self.slow_bits:
            while time.perf_counter() - t0 < 30:
                with TrialStore(self.store_path) as st:
                    seen = len(st)
                if seen >= self.wait_for_rows:
                    break
                time.sleep(0.1)
        time.sleep(self.seconds)
        return EvalResult(score=float(sum(a.bits)), metrics={"pid": float(os.getpid()), "rows_seen": float(seen)},
                          seconds=time.perf_counter() - t0)


@pytest.fixture(scope="module")
def ray_run(pool, tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ray") / "trials.db"
    res = autoqra.optimize(tiny, "4bit", store=path, seed=0, executor=pool, **SMALL)
    return res, path


def test_ray_and_local_run_the_same_trials(tiny, ray_run):
    res, path = ray_run
    assert res.info["executor"]["name"] == "ray" and res.info["executor"]["workers"] == 2
    assert res.info["phase2_batch"] == 2 and {"baseline", "phase1", "phase2"} <= {t.phase for t in res.history}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: float reductions depend on the thread count
    try:
        local = autoqra.optimize(tiny, "4bit", seed=0, phase2_batch=2, **SMALL)  # same batch size, one at a time
    finally:
        torch.set_num_threads(threads)
    assert local.info["executor"]["name"] == "local"
    assert {t.key: t.score for t in res.history} == {t.key: t.score for t in local.history}
    assert [t.key for t in res.history] == [t.key for t in local.history]  # kept in candidate order
    assert res.best.key == local.best.key and len(res.history) >= 10
    with TrialStore(path) as st:  # search trials ran on both workers; the final rung's in this process
        workers = {t.extra["worker"]["pid"] for t in st.trials() if t.phase != "final"}
        final = {t.extra["worker"]["pid"] for t in st.trials() if t.phase == "final"}
    assert len(workers) == 2 and os.getpid() not in workers
    assert final == {os.getpid()}
    assert 0 <= res.info["overhead_fraction"] < 1 and res.info["eval_seconds"] <= res.info["wall_seconds"]


def test_batch_runs_concurrently_and_is_stored_as_it_finishes(pool, tiny, tmp_path):
    space = SearchSpace.from_model(tiny, bits=(2, 4, 8), ranks=(0, 4, 8))
    mm = MemoryModel(tiny, space, "hqq")
    path = tmp_path / "trials.db"
    # the 2-bit trial waits until the store holds 1 trial: the 4-bit one, finished on the other worker
    ev = SleepEvaluator(attrs.evolve(space, bits=(2, 4, 8, 16)), seconds=1.0, store_path=str(path), slow_bits=2,
                        wait_for_rows=1)
    st = TrialStore(path)
    problem = Problem.build(space, mm, mm.predict(space.uniform(8, 8)).model_bytes,
                            importance=Importance.uniform(space.n_units), seed=0)
    settings = SearchSettings(low=Fidelity(1, "low"), high=Fidelity(2, "high"), phase1="nsga2", phase2=None, pop_size=4,
                              promote_k=2, max_generations=1, phase2_iterations=1)
    run = AutoQRA(problem, ev, st, settings, fingerprint="fp", executor=pool)
    pool.bind(ev)
    pool.workers_info()  # workers up before timing
    t0 = time.perf_counter()
    res = run.runner.evaluate_many([space.uniform(2, 4), space.uniform(4, 4), space.uniform(8, 0), space.uniform(4, 0)],
                            Fidelity(1, "low"), "phase1")
    wall = time.perf_counter() - t0
    assert [r.score for r in res] == [4.0, 8.0, 16.0, 8.0]  # candidate order (2 blocks)
    assert res[0].metrics["rows_seen"] >= 1  # another result was stored while this trial ran
    assert len({r.metrics["pid"] for r in res}) == 2
    assert wall < 3.6  # 4 trials of >= 1 s on 2 workers; one at a time would take >= 4 s
    assert len(st) == 4 and [t.key for t in run.trials()] == run.runner.run_keys


def test_killed_worker_is_retried_then_recorded_failed(pool, tiny, tmp_path):
    space = SearchSpace.from_model(tiny, bits=(2, 4, 8, 16), ranks=(0, 4, 8))
    ev = KillingEvaluator(tiny, space, "hqq", train=TRAIN, eval_blocks=2, seed=0, kills={4: 1, 2: 2},
                          marker_dir=tmp_path)
    pids = {w["pid"] for w in pool.workers_info()}
    res = autoqra.optimize(tiny, "4bit", evaluator=ev, seed=0, executor=pool, embeddings="keep",  # ev's space
                           **{**SMALL, "phase2": None})
    base = {name.split("-")[1]: t for name, t in res.baselines.items()}
    assert base["4bit"].result.ok  # died once, retried on a restarted worker
    assert base["2bit"].result.status == "failed" and "worker died 2 times" in base["2bit"].result.error
    assert (tmp_path / "died-4bit").read_text() == "1" and (tmp_path / "died-2bit").read_text() == "2"
    p1 = [t for t in res.history if t.phase == "phase1"]
    assert p1 and all(t.result.ok for t in p1) and res.best is not None  # the search went on
    assert not pids & {w["pid"] for w in pool.workers_info()}  # both workers were replaced


def test_ctrl_c_mid_batch_and_the_store_resumes(pool, tiny, ray_run, tmp_path, monkeypatch):
    from autoqra.progress import Progress

    real_trial, calls = Progress.trial, []

    def trial(self, phase, result, cached, **kw):
        calls.append(cached)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_trial(self, phase, result, cached, **kw)

    monkeypatch.setattr(Progress, "trial", trial)
    path = tmp_path / "trials.db"
    with pytest.raises(KeyboardInterrupt):
        autoqra.optimize(tiny, "4bit", store=path, seed=0, executor=pool, **SMALL)
    monkeypatch.setattr(Progress, "trial", real_trial)
    with TrialStore(path) as st:
        before = {t.key for t in st.trials()}
    assert len(before) == 5  # stored before the interrupt reached the progress line
    res = autoqra.optimize(tiny, "4bit", store=path, seed=0, executor=pool, **SMALL)
    assert res.info["n_run"] == len(res.history) - len(before)  # nothing finished was re-run
    assert [t.key for t in res.history] == [t.key for t in ray_run[0].history]


@pytest.mark.parametrize("gpu_ids", [[], [0]])
def test_worker_moves_to_gpu_only_when_ray_assigned_one(monkeypatch, gpu_ids):
    """A zero-GPU worker stays on the CPU even where CUDA is visible (never crowds onto cuda:0)."""
    import ray
    import torch

    from autoqra.executors.ray import _to_worker_device

    moved = []

    class Model:
        def to(self, dev):
            moved.append(dev)
            return self

    class Ev:
        model, device = Model(), torch.device("cpu")

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: gpu_ids)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    ev = _to_worker_device(Ev())
    assert moved == (["cuda"] if gpu_ids else [])
    assert ev.device.type == ("cuda" if gpu_ids else "cpu")
