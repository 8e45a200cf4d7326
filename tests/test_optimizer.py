"""End-to-end optimize() on the tiny model with real (short) fine-tunes: budget, phases, resume, determinism."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import autoqra
from autoqra.bench.harness import copy_store
from autoqra.config import TrainSpec
from autoqra.store import TrialStore

FAST = dict(
    preset="tiny", bits=(2, 4, 8), ranks=(0, 4, 8), train=TrainSpec(batch_size=2, seq_len=32, lr=2e-3),
    eval_blocks=4, importance_blocks=4, progress=False,
)


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("opt") / "trials.db"
    t0 = time.perf_counter()
    res = autoqra.optimize(tiny, "4bit", store=path, seed=0, **FAST)
    return res, path, time.perf_counter() - t0


def test_end_to_end_within_budget_and_both_phases(tiny, run):
    res, _, _ = run
    assert res.info["n_run"] == len(res.history) <= res.info["n_evals"]  # counted work, not wall-clock
    phases = {t.phase for t in res.history}
    assert {"baseline", "phase1", "phase2"} <= phases
    assert {t.fidelity.name for t in res.history if t.phase == "phase1"} == {"low", "mid", "high"}
    assert res.best is not None and res.pareto
    for t in [res.best, *res.pareto]:
        assert t.memory.model_bytes <= res.budget_bytes  # by the memory model
        assert t.result.memory["model_bytes"] == t.memory.model_bytes  # by measurement of the live model
        assert t.fidelity.name == "high" and t.result.ok
    assert any(name.startswith("uniform-4bit") for name in res.baselines)
    assert any(name.startswith("16bit") for name in res.baselines)
    pm = autoqra.apply_assignment(tiny, res.best.assignment, "hqq", space=res.space)
    assert autoqra.measure_memory(pm).model_bytes <= res.budget_bytes
    assert res.info["stop_reasons"]["phase1"] and res.info["hv_history"]


def test_sublayer_search_end_to_end(tiny):
    res = autoqra.optimize(tiny, "4bit", seed=0, granularity="sublayer", phase2=None, max_trials=10, **FAST)
    names = [u.name for u in res.space.units if u.has_rank]
    assert names and all(n.endswith((".self_attn", ".mlp")) for n in names) and len(names) == 2 * 2
    assert res.best is not None and res.best.memory.model_bytes <= res.budget_bytes
    assert res.best.result.memory["model_bytes"] == res.best.memory.model_bytes  # predicted = live tensors
    # without space= the space is inferred from the unit names: the same model as with the search's space
    inferred = autoqra.measure_memory(autoqra.apply_assignment(tiny, res.best.assignment, "hqq"))
    explicit = autoqra.measure_memory(autoqra.apply_assignment(tiny, res.best.assignment, "hqq", space=res.space))
    assert inferred.model_bytes == explicit.model_bytes


def test_resume_reads_finished_trials_back(tiny, run):
    res, path, _ = run
    again = autoqra.optimize(tiny, "4bit", store=path, seed=0, **FAST)
    assert again.info["n_run"] == 0  # nothing re-run
    assert [t.key for t in again.history] == [t.key for t in res.history]
    assert again.best.key == res.best.key


def test_history_phases_are_this_runs_own(tiny, run, tmp_path):
    """A trial read back from a shared store keeps the phase this run asked for it in, not the stored one."""
    res, path, _ = run
    shared = tmp_path / "shared.db"
    assert copy_store(path, shared)  # WAL-safe copy
    with TrialStore(shared) as st:
        st._exec("UPDATE trials SET phase = 'another-search'")  # as if another search had stored them all
        assert len(st.trials(phase="another-search")) == len(res.history)
    again = autoqra.optimize(tiny, "4bit", store=shared, seed=0, **FAST)
    assert again.info["n_run"] == 0
    assert [(t.key, t.phase) for t in again.history] == [(t.key, t.phase) for t in res.history]


def test_same_seed_same_history(tiny, run):
    res, _, _ = run
    other = autoqra.optimize(tiny, "4bit", store=None, seed=0, **FAST)
    assert [(t.key, t.score) for t in other.history] == [(t.key, t.score) for t in res.history]


def test_result_save_load_roundtrip(run, tmp_path):
    res, _, _ = run
    res.save(tmp_path)
    back = autoqra.load_result(tmp_path)
    assert back.best.assignment == res.best.assignment and back.budget_bytes == res.budget_bytes
    assert [t.key for t in back.pareto] == [t.key for t in res.pareto]
    assert set(back.baselines) == set(res.baselines)
    cfg = back.to_peft_config()
    assert cfg.rank_pattern or cfg.exclude_modules
    (tmp_path / "result.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an autoqra result"):
        autoqra.load_result(tmp_path)


def test_foreign_store_is_refused(tmp_path, tiny):
    bad = tmp_path / "x.db"
    bad.write_bytes(b"not a database at all" * 10)
    with pytest.raises(ValueError, match="NOT modified"):
        autoqra.optimize(tiny, "4bit", store=bad, **FAST)
    assert bad.read_bytes() == b"not a database at all" * 10


def test_bad_options_fail_before_work(tiny):
    with pytest.raises(ValueError, match="alpha"):
        autoqra.optimize(tiny, "4bit", alpha=3, **FAST)
    with pytest.raises(ValueError, match="below the smallest feasible"):
        autoqra.optimize(tiny, 10, **FAST)
    with pytest.raises(ValueError, match="unknown optimize option"):
        autoqra.optimize(tiny, "4bit", nonsense=1, **FAST)
    with pytest.raises(ValueError, match="warm_start"):
        autoqra.optimize(tiny, "4bit", warm_start="eq7", **FAST)


def test_killed_search_loses_at_most_the_trial_in_flight(tmp_path):
    store = tmp_path / "trials.db"
    script = textwrap.dedent(f"""
        import autoqra
        from autoqra.config import TrainSpec
        m = autoqra.models.tiny_llama()
        autoqra.optimize(m, "4bit", store={str(store)!r}, seed=0, preset="tiny", bits=(2, 4, 8), ranks=(0, 4, 8),
                         train=TrainSpec(batch_size=2, seq_len=32, lr=2e-3), eval_blocks=4, importance_blocks=4,
                         progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    finished = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if store.exists():
            try:
                with TrialStore(store) as st:
                    finished = len(st)
            except ValueError:
                continue
            if finished >= 5:
                break
    assert proc.poll() is None, "search finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with TrialStore(store) as st:
        before = {t.key for t in st.trials()}
    assert len(before) >= 5
    m = autoqra.models.tiny_llama()
    res = autoqra.optimize(m, "4bit", store=store, seed=0, **FAST)
    keys = [t.key for t in res.history]
    assert before <= set(keys)
    assert res.info["n_run"] == len(keys) - len(before)  # finished trials were not re-run


def test_without_surrogate_every_ok_offspring_is_promoted(tiny, run):
    """Ablation switch: use_surrogate=False promotes every successful low-fidelity offspring."""
    res, path, _ = run
    abl = autoqra.optimize(tiny, "4bit", store=path, seed=0, phase2=None, use_surrogate=False, **FAST)
    p1 = [t for t in abl.history if t.phase == "phase1"]
    assert abl.info["stop_reasons"]["phase2"] == "skipped" and not [t for t in abl.history if t.phase == "phase2"]
    lows = {t.assignment for t in p1 if t.fidelity.name == "low" and t.result.ok}
    highs = {t.assignment for t in p1 if t.fidelity.name == "high"}
    assert lows and lows <= highs | {t.assignment for t in abl.history if t.phase == "baseline"}
    with_sur = {t.assignment for t in res.history if t.phase == "phase1" and t.fidelity.name == "high"}
    assert len(highs) > len(with_sur)  # promote_k=2 per generation with the surrogate


def test_anchored_warm_start_reaches_phase1(tiny, run):
    """warm_start="anchored" (the default): Phase I's first candidate is the budget-anchored seed (filled
    by the cost model by default, by the priors with guidance="priors"), not Eq. 6's."""
    import numpy as np

    from autoqra.guidance.costmodel import CostModel
    from autoqra.guidance.repair import make_repair
    from autoqra.guidance.seeds import anchored_cost_seed
    from autoqra.memory.model import MemoryModel
    from autoqra.quant_backends import backend_from_spec
    from autoqra.searchers.nsga2_seeds import anchored_seeds

    res, path, _ = run
    assert res.config["warm_start"] == "anchored" and res.config["guidance"] == "cost"
    space, budget = res.space, res.budget_bytes
    mm = MemoryModel(tiny, space, backend_from_spec(res.info["backend_spec"]), train=FAST["train"])
    bytes_of = make_repair(mm, budget).bytes_encoded
    table = CostModel.from_dict({k: res.info["cost_model"][k] for k in
                                 ("bits", "ranks", "quant", "rank_gain", "steps", "ref_bits", "seconds")}).table(space)
    first = next(t for t in res.history if t.phase == "phase1")
    assert first.assignment == space.decode(anchored_cost_seed(space, table, bytes_of, budget))
    assert res.info["seed_key"] == [t for t in res.history if t.assignment == first.assignment
                                    and t.fidelity.name == "high"][0].key  # the seed reached high fidelity
    other = path.with_name("priors.db")  # another recipe (cosine schedule): the store refuses to mix them
    # the paper's operators in the paper's space (embedding 16-bit, outside the space): Eq. 6 sends a block to
    # 2 bits where the anchored seed does not
    pri = autoqra.optimize(tiny, "4bit", store=other, seed=0, phase2=None, guidance="priors", max_trials=6,
                           embeddings="keep", **FAST)
    eq6_run = autoqra.optimize(tiny, "4bit", store=other, seed=0, phase2=None, warm_start="eq6", guidance="priors",
                               max_trials=6, embeddings="keep", **FAST)
    first = next(t for t in pri.history if t.phase == "phase1")
    imp = pri.info["importance"]
    iq, ir = np.asarray(imp["q"], float), np.asarray(imp["r"], float)
    space = pri.space
    assert pri.budget_bytes == budget  # the "4bit" reference keeps the embedding 16-bit in both spaces
    bytes_of = make_repair(MemoryModel(tiny, space, backend_from_spec(res.info["backend_spec"]), train=FAST["train"]),
                           budget).bytes_encoded
    want = space.decode(anchored_seeds(space, iq, ir, bytes_of, budget)[0])
    assert first.assignment == want
    eq6 = next(t for t in eq6_run.history if t.phase == "phase1")
    assert eq6.assignment != want and min(want.bits) >= 4 and min(eq6.assignment.bits) == 2
