"""Tests of autoqra.store: round trips, keys, durability, refusal of foreign files, fingerprints."""

import json
import math
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autoqra.evaluators.base import EvalResult, Fidelity
from autoqra.memory.model import MemoryBreakdown
from autoqra.space import Assignment
from autoqra.store import APP_ID, TrialStore, model_fingerprint, trial_key
from autoqra.trial import Trial

REPO = Path(__file__).resolve().parents[1]
A = Assignment(("m.layers.0", "m.layers.1"), (4, 2), (8, 0))
F = Fidelity(50, "low")
EV = {"name": "finetune", "seed": 0, "lr": 1e-4}
BK = {"name": "hqq", "group_size": 64}
FP = "f" * 64
KEY_ARGS = (A, F, EV, BK, FP)


def _trial(key, phase="phase1", score=1.5, status="ok", fidelity=F, memory=None, **kw):
    res = EvalResult(score=score, metrics={"loss": 2.0}, status=status, seconds=3.0, memory={"peak_bytes": 7})
    return Trial(A, fidelity, phase, res, MemoryBreakdown() if memory is None else memory, key, **kw)


def _run(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_round_trip_every_field(tmp_path):
    pred = MemoryBreakdown(quant_weight_bytes=10, lora_bytes=3)
    with TrialStore(tmp_path / "sub" / "s.db") as st:
        st.put(_trial("k1", memory=pred, seed=7, extra={"gen": 2}, seconds=9.5))
        st.put(_trial("k2", phase="baseline", score=-math.inf, status="oom"))
        t = st.get("k1")
        assert isinstance(t, Trial) and t.assignment == A and t.fidelity == F and t.phase == "phase1"
        assert t.result == EvalResult(1.5, {"loss": 2.0}, "ok", "", 3.0, {"peak_bytes": 7})
        assert t.memory == pred and t.measured_memory == {"peak_bytes": 7}
        assert (t.score, t.status, t.seconds, t.seed, t.extra) == (1.5, "ok", 9.5, 7, {"gen": 2})
        assert t.created_at.endswith("+00:00") and t.seq == 1
        t2 = st.get("k2")
        assert t2.score == -math.inf and t2.result.score == -math.inf and t2.status == "oom"
        assert t2.seed is None and t2.memory == MemoryBreakdown() and t2.seconds == 3.0
        assert st.get("nope") is None and st.has("k1") and not st.has("nope")
        raw = st._exec("SELECT score FROM trials WHERE key='k2'")[0][0]
        assert raw is None  # -inf is stored as NULL
    with TrialStore(tmp_path / "sub" / "s.db") as st:  # reopen: still there
        assert [t.key for t in st.trials()] == ["k1", "k2"]
    with pytest.raises(TypeError, match="Trial"):
        TrialStore(None).put({"key": "x", "assignment": A, "fidelity": F, "phase": "p"})
    with pytest.raises(ValueError, match="no key"):
        TrialStore(None).put(_trial(""))


def test_order_filters_update_and_summary():
    st = TrialStore(None)
    for i, (ph, st_) in enumerate([("baseline", "ok"), ("phase1", "ok"), ("phase1", "failed"), ("final", "ok")]):
        st.put(_trial(f"k{i}", phase=ph, status=st_, score=float(i) if st_ == "ok" else -math.inf))
    assert [t.key for t in st.trials()] == ["k0", "k1", "k2", "k3"]
    assert [t.key for t in st.trials(phase="phase1")] == ["k1", "k2"]
    assert [t.key for t in st.trials(phase="phase1", status="ok")] == ["k1"]
    assert len(st.trials(fidelity_name="low")) == 4 and st.trials(fidelity_name="high") == [] and len(st) == 4
    created = st.get("k1").created_at
    st.put(_trial("k1", phase="phase2", score=9.0, fidelity=Fidelity(200, "high")))
    t = st.get("k1")
    assert (t.seq, t.created_at, t.phase, t.score) == (2, created, "phase2", 9.0)
    assert t.fidelity == Fidelity(200, "high") and t.updated_at >= created
    assert [t.key for t in st.trials()] == ["k0", "k1", "k2", "k3"] and len(st) == 4
    s = st.summary()
    assert s["total"] == 4 and s["seconds"] == 12.0
    assert s["by_phase"] == {"baseline": 1, "final": 1, "phase1": 1, "phase2": 1}
    assert s["by_fidelity"] == {"high": 1, "low": 3} and s["by_status"] == {"failed": 1, "ok": 3}


def test_trial_key_stable_across_processes_and_sensitive():
    k = trial_key(*KEY_ARGS)
    assert len(k) == 64 and k == trial_key(A, F, dict(reversed(EV.items())), BK, FP)
    assert k == trial_key(A, Fidelity(50, "relabelled"), EV, BK, FP)  # the name is only a label
    p = _run(f"""
        from autoqra.evaluators.base import Fidelity
        from autoqra.space import Assignment
        from autoqra.store import trial_key
        print(trial_key(Assignment({A.units!r}, {A.bits!r}, {A.ranks!r}), Fidelity(50, "low"),
                        {EV!r}, {BK!r}, {FP!r}))
    """, env={**os.environ, "PYTHONHASHSEED": "123"})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert out.strip() == k
    variants = [
        (Assignment(A.units, (4, 3), A.ranks), F, EV, BK, FP),
        (Assignment(A.units, A.bits, (8, 4)), F, EV, BK, FP),
        (A, Fidelity(51, "low"), EV, BK, FP),
        (A, F, {**EV, "seed": 1}, BK, FP),
        (A, F, EV, {**BK, "group_size": 128}, FP),
        (A, F, EV, BK, "e" * 64),
    ]
    keys = {trial_key(*v) for v in variants}
    assert len(keys) == len(variants) and k not in keys
    with pytest.raises(ValueError, match="JSON"):
        trial_key(A, F, {"lr": math.nan}, BK, FP)


def _put_then_sleep(db, n, ready):
    st = TrialStore(db)
    for i in range(n):
        st.put(_trial(f"k{i}", score=float(i)))
    ready.set()
    time.sleep(120)


def _writer(db, w, n):
    with TrialStore(db) as st:
        for i in range(n):
            st.put(_trial(f"{w}-{i}"))


def test_put_survives_sigkill(tmp_path):
    db = tmp_path / "s.db"
    ctx = multiprocessing.get_context("fork")  # fork: no second torch import, the test stays fast
    ready = ctx.Event()
    p = ctx.Process(target=_put_then_sleep, args=(db, 3, ready))
    p.start()
    try:
        assert ready.wait(60)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
    assert p.exitcode == -signal.SIGKILL
    with TrialStore(db) as st:
        assert [(t.key, t.score) for t in st.trials()] == [("k0", 0.0), ("k1", 1.0), ("k2", 2.0)]


def test_concurrent_writers(tmp_path):
    db = tmp_path / "s.db"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(db, w, 20)) for w in range(3)]
    for p in procs:
        p.start()
    _writer(db, "parent", 20)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with TrialStore(db) as st:
        assert len(st) == 80 and len({t.seq for t in st.trials()}) == 80


def _assert_refused(path: Path, match: str) -> None:
    before = path.read_bytes()
    with pytest.raises(ValueError, match=match) as ei:
        TrialStore(path)
    msg = str(ei.value)
    assert str(path) in msg and "NOT modified" in msg
    assert path.read_bytes() == before
    assert not Path(str(path) + "-wal").exists() and not Path(str(path) + "-journal").exists()


def test_refuses_foreign_garbage_and_truncated_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a database\n" * 10)
    _assert_refused(text, "not SQLite")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(4096))
    _assert_refused(garbage, "not SQLite")
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    con.commit()
    con.close()
    _assert_refused(foreign, "another application")
    empty_foreign = tmp_path / "empty_foreign.db"  # another app's header, no tables
    sqlite3.connect(empty_foreign).execute("PRAGMA user_version=3").close()
    _assert_refused(empty_foreign, "another application|application_id")

    good = tmp_path / "good.db"
    with TrialStore(good) as st:
        for i in range(40):
            st.put(_trial(f"k{i}", extra={"pad": "x" * 4000}))
    data = good.read_bytes()
    assert int.from_bytes(data[68:72], "big") == APP_ID
    tiny = tmp_path / "tiny.db"
    tiny.write_bytes(data[:50])
    _assert_refused(tiny, "truncated")
    half = tmp_path / "half.db"
    half.write_bytes(data[: len(data) // 2])
    _assert_refused(half, "not a readable")
    with pytest.raises(ValueError, match="directory"):
        TrialStore(tmp_path)


def test_meta_and_check_compatible():
    st = TrialStore(None)
    meta = {"model": "abc", "backend": {"name": "hqq", "group_size": 64}, "space": {"bits": [2, 4]}}
    st.check_compatible(meta)  # records on a fresh store
    assert st.meta()["backend"] == {"group_size": 64, "name": "hqq"} and "nope" not in st.meta()
    st.check_compatible(meta)
    st.check_compatible({"model": "abc"})
    st.set_meta("config", {"budget": 3.0})
    assert st.meta()["config"] == {"budget": 3.0}
    with pytest.raises(ValueError) as ei:
        st.check_compatible({"model": "xyz", "backend": {"name": "hqq", "group_size": 128}, "space": meta["space"]})
    msg = str(ei.value)
    assert "model" in msg and "backend.group_size" in msg and "64" in msg and "128" in msg and "space" not in msg
    st.check_compatible({"evaluator": {"name": "finetune"}}, record=False)
    assert "evaluator" not in st.meta()


def test_blobs(tmp_path):
    with TrialStore(tmp_path / "s.db") as st:
        assert st.get_blob("priors") is None
        st.put_blob("priors", {"I_q": [0.1, 0.2], "I_r": [1, 2]})
        st.put_blob("priors", {"I_q": [0.3]})
        st.put_blob("searcher", [1, "a", None])
    with TrialStore(tmp_path / "s.db") as st:
        assert st.get_blob("priors") == {"I_q": [0.3]} and st.get_blob("searcher") == [1, "a", None]
        with pytest.raises(TypeError):
            st.put_blob("bad", object())


def test_model_fingerprint(tiny):
    import torch

    from autoqra.models import from_config, tiny_llama

    m0, m0b, m1 = tiny, tiny_llama(seed=0), tiny_llama(seed=1)
    f0 = model_fingerprint(m0)
    assert len(f0) == 64 and f0 == model_fingerprint(m0b) and f0 != model_fingerprint(m1)
    with torch.no_grad():  # a single changed weight in a middle parameter is seen (via the bit sum)
        next(iter(m0b.model.layers[1].mlp.parameters())).view(-1)[100] += 1e-3
    assert model_fingerprint(m0b) != f0
    assert model_fingerprint(tiny_llama(seed=0, dtype=torch.bfloat16)) != f0
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
    meta = from_config(cfg)
    fm = model_fingerprint(meta)
    assert fm == model_fingerprint(from_config(cfg)) and fm != f0
    assert fm != model_fingerprint(from_config({**cfg, "num_hidden_layers": 3}))
    assert model_fingerprint(torch.nn.Linear(3, 4)) != model_fingerprint(torch.nn.Linear(4, 3))
    assert json.dumps(f0)  # plain str
