"""The benchmark harness (`autoqra bench --preset quick`): every row present and complete, budgets held, resumable."""

import json
import math
import time

import pytest

from autoqra.bench.harness import BENCH_PRESETS, ROWS, run_bench
from autoqra.bench.table import curve, findings


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("bench-out"), tmp_path_factory.mktemp("bench-work")
    t0 = time.perf_counter()
    rep = run_bench("quick", out=out, work=work)
    return rep, out, work, time.perf_counter() - t0


def test_every_row_is_complete(quick):
    rep, _, _, _ = quick
    assert not rep["partial"]
    assert [r["id"] for r in rep["rows"]] == [r.id for r in ROWS]
    seeds = BENCH_PRESETS["quick"].seeds
    for r in rep["rows"]:
        assert r["assignment"] is not None, r["id"]
        assert r["n_seeds"] == len(seeds) >= 2, r["id"]
        assert all(math.isfinite(x) for x in r["losses"]) and r["loss_sd"] is not None
        assert r["model_bytes_predicted"] == r["model_bytes_measured"] > 0  # exact memory model
        assert r["train_bytes_predicted"] > 0 and r["train_bytes_measured"] > 0
        if r["kind"] in ("uniform", "rule"):  # fixed points (the rule row: issue 23's llama.cpp-style rule)
            assert r["search"] is None
            continue
        s = r["search"]
        assert s["evals"].get("high", 0) > 0 and math.isfinite(s["overhead_fraction"])
        assert 0 <= s["overhead_fraction"] < 1 and s["search_seconds"] > 0
        if r["kind"] == "search":
            assert s["evals"].get("low", 0) > 0


def test_budgets_held_and_counts_matched(quick):
    rep, _, _, _ = quick
    rows = {r["id"]: r for r in rep["rows"]}
    b = rep["budgets"]
    assert b["mid"] < b["4bit"]
    assert rows["hqq4-r8"]["model_bytes_predicted"] == b["4bit"]
    for rid, key in (("autoqra", "4bit"), ("autoqra-mid", "mid"), ("random", "4bit"), ("no-priors", "4bit"),
                     ("no-surrogate", "4bit"), ("no-phase2", "4bit"), ("nsga2", "4bit"),
                     ("autoqra-anchored", "4bit"), ("autoqra-mid-anchored", "mid"), ("anchored-no-priors", "4bit"),
                     ("anchored-no-surrogate", "4bit"), ("anchored-no-phase2", "4bit"),
                     ("autoqra-anchored-s1", "4bit"), ("autoqra-mid-anchored-s1", "mid"), ("guided", "4bit"),
                     ("guided-mid", "mid"), ("guided-s1", "4bit"), ("guided-mid-s1", "mid")):
        assert rows[rid]["model_bytes_measured"] <= b[key], rid
        assert rows[rid]["search"]["budget_bytes"] == b[key]
    auto = rows["autoqra"]["search"]
    n_auto = sum(auto["evals"].values())
    assert sum(rows["no-surrogate"]["search"]["evals"].values()) <= n_auto
    assert sum(rows["nsga2"]["search"]["evals"].values()) <= n_auto
    anc, guided = rows["autoqra-anchored"]["search"], rows["guided"]["search"]
    searched_high = sum(t["fidelity"] == "high" and t["phase"] in ("phase1", "phase2") for t in guided["records"])
    assert rows["random"]["search"]["evals"] == {"high": searched_high}
    assert guided["evals"].get("mid", 0) > 0 and rows["guided"]["options"] == {}  # the default search
    assert "phase2" not in {t["phase"] for t in rows["no-phase2"]["search"]["records"]}
    assert "phase2" in {t["phase"] for t in auto["records"]}
    assert sum(rows["anchored-no-surrogate"]["search"]["evals"].values()) <= sum(anc["evals"].values())
    assert "phase2" not in {t["phase"] for t in rows["anchored-no-phase2"]["search"]["records"]}
    for rid, parent in (("anchored-no-priors", "autoqra-anchored"), ("autoqra-anchored-s1", "autoqra-anchored"),
                        ("no-surrogate", "autoqra"), ("random", "guided"), ("guided-s1", "guided")):
        assert rows[rid]["parent"] == parent, rid
    # another search seed: its own baselines (other LoRA init and data order), so other scores
    s1 = rows["autoqra-anchored-s1"]
    assert s1["options"]["seed"] == 1 and s1["repeat"]
    base = [[t["score"] for t in rows[r]["search"]["records"] if t["phase"] == "baseline"]
            for r in ("autoqra-anchored", "autoqra-anchored-s1")]
    assert len(base[0]) == len(base[1]) > 0 and base[0] != base[1]
    for rid, paper in (("autoqra-anchored", "autoqra"), ("autoqra-mid-anchored", "autoqra-mid")):
        assert rows[rid]["options"] == {"warm_start": "anchored", "guidance": "priors", "phase2": "turbo"}
        first = [next(t for t in rows[r]["search"]["records"] if t["phase"] == "phase1") for r in (rid, paper)]
        assert first[0]["assignment"] != first[1]["assignment"]  # another first generation than Eq. 6


def test_row_filter(quick, tmp_path):
    _, _, work, _ = quick
    with pytest.raises(ValueError, match="unknown row ids"):
        run_bench("quick", out=tmp_path, work=work, rows=["hqq4-r8", "nope"])
    rep = run_bench("quick", out=tmp_path, work=work, rows=["hqq4-r8", "autoqra-anchored"])
    assert [r["id"] for r in rep["rows"]] == ["hqq4-r8", "autoqra-anchored"] and rep["n_run"] == 0


def test_merge_adds_rows_to_an_existing_table(quick, tmp_path):
    rep, out, work, _ = quick
    (tmp_path / "compare_quick.json").write_text((out / "compare_quick.json").read_text())
    again = run_bench("quick", out=tmp_path, work=work, rows=["hqq4-r8", "autoqra-anchored"], merge=True)
    assert again["n_run"] == 0
    assert [r["id"] for r in again["rows"]] == [r.id for r in ROWS]  # carried rows keep the benchmark's order
    carried = {r["id"] for r in again["rows"] if r.get("carried")}
    assert carried == {r.id for r in ROWS} - {"hqq4-r8", "autoqra-anchored"}
    assert again["carried"]["rows"] == sorted(carried)
    # the same work folder's stores are counted once, not once per merge
    assert again["compute_by_work"] == {str(work): again["compute_seconds"]} and again["carried"]["compute_seconds"] == 0
    assert [r["losses"] for r in again["rows"]] == [r["losses"] for r in rep["rows"]]
    md = (tmp_path / "compare_quick.md").read_text()
    assert md.count("carried over") == len(carried) + 1  # each carried row + the header line
    # a report from before compute_by_work existed counts as other work
    old = json.loads((out / "compare_quick.json").read_text())
    del old["compute_by_work"]
    (tmp_path / "compare_quick.json").write_text(json.dumps(old))
    twice = run_bench("quick", out=tmp_path, work=work, rows=["hqq4-r8"], merge=True)
    assert twice["compute_by_work"] == {"earlier invocations": old["compute_seconds"], str(work): twice["compute_seconds"]}
    assert twice["carried"]["compute_seconds"] == old["compute_seconds"] > 0
    # without merge only the rows run are written; a report of another recipe is refused
    assert len(run_bench("quick", out=tmp_path, work=work, rows=["hqq4-r8"])["rows"]) == 1
    other = {**rep, "seeds": [0], "rows": rep["rows"]}
    (tmp_path / "compare_quick.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"another recipe \(seeds differ"):
        run_bench("quick", out=tmp_path, work=work, rows=["hqq4-r8"], merge=True)
    (tmp_path / "compare_quick.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="format 'something else'"):
        run_bench("quick", out=tmp_path, work=work, rows=["hqq4-r8"], merge=True)


def test_outputs_written(quick):
    rep, out, _, _ = quick
    md = (out / "compare_quick.md").read_text()
    for r in ROWS:
        assert f"| {r.label} |" in md
    assert "## Findings" in md and all(f in md for f in rep["findings"])
    back = json.loads((out / "compare_quick.json").read_text())
    assert back["format"] == "autoqra.bench/1" and len(back["rows"]) == len(ROWS)
    png = (out / "compare_quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_rerun_reads_everything_back(quick):
    rep, out, work, _ = quick
    again = run_bench("quick", out=out, work=work)
    assert again["n_run"] == 0
    assert [r["losses"] for r in again["rows"]] == [r["losses"] for r in rep["rows"]]


def test_curve_and_findings_follow_the_numbers():
    recs = [{"fidelity": "high", "ok": True, "score": -3.0, "model_bytes": 10, "steps": 10},
            {"fidelity": "low", "ok": True, "score": -1.0, "model_bytes": 10, "steps": 3},
            {"fidelity": "high", "ok": True, "score": -2.0, "model_bytes": 99, "steps": 10},
            {"fidelity": "high", "ok": True, "score": -2.5, "model_bytes": 10, "steps": 10}]
    assert curve(recs, 50) == ([1, 2, 3, 4], [10, 13, 23, 33], [-3.0, -3.0, -3.0, -2.5])
    a = {"bits": [4, 4], "ranks": [8, 8]}
    row = dict(kind="uniform", backend="hqq", search=None, assignment=a, loss_sd=0.01, model_bytes_predicted=100)
    rep = {"budgets": {"4bit": 100, "mid": 90}, "rows": [
        {**row, "id": "hqq4-r8", "label": "u4", "loss_mean": 3.0},
        {**row, "id": "autoqra", "label": "AQ", "kind": "search", "loss_mean": 2.5,
         "assignment": {"bits": [8, 2], "ranks": [8, 8]}}]}
    text = " ".join(findings(rep))
    assert "AQ (2.5000) beats it by 0.5000 nats (more than the seed spread" in text
    rep["rows"][1]["loss_mean"] = 3.2
    assert "did not beat uniform" in " ".join(findings(rep))
    rep["rows"][1]["assignment"] = a
    assert "chose exactly that assignment" in " ".join(findings(rep))
    # an ablation is compared with its parent search, not with uniform; a repeat with both
    rep["rows"][1]["assignment"] = {"bits": [8, 2], "ranks": [8, 8]}
    rep["rows"] += [{**row, "id": "abl", "label": "AB (≤ B4)", "kind": "search", "parent": "autoqra", "loss_mean": 3.4,
                     "assignment": {"bits": [2, 8], "ranks": [8, 8]}},
                    {**row, "id": "rep", "label": "AQ seed 1 (≤ B4)", "kind": "search", "parent": "autoqra",
                     "repeat": True, "loss_mean": 2.9, "assignment": {"bits": [4, 8], "ranks": [8, 8]}}]
    text = " ".join(findings(rep))
    assert "AB (≤ B4) (3.4000) is worse than AQ (3.2000) by 0.2000 nats" in text
    assert "AB did not beat" not in text and "; AB (3.4000)" not in text
    assert "AQ seed 1 (3.0000)" not in text and "; AQ seed 1 (2.9000) beats it by 0.1000 nats" in text
    assert "AQ seed 1 (≤ B4) (2.9000) is better than AQ (3.2000) by 0.3000 nats" in text
    assert "first Phase I candidate" not in text  # no search records here
    rec = dict(fidelity="high", ok=True, model_bytes=100, steps=10)
    rep["rows"][1]["search"] = {"budget_bytes": 100, "records": [
        {**rec, "phase": "baseline", "score": -3.0, "assignment": "u"},
        {**rec, "phase": "phase1", "fidelity": "low", "score": -4.0, "assignment": "s"},
        {**rec, "phase": "phase1", "score": -2.0, "assignment": "s"},
        {**rec, "phase": "phase2", "score": -2.5, "assignment": "t"}]}
    assert "first Phase I candidate (its warm-start seed; no later trial scored higher at search fidelity) for: AQ." \
        in " ".join(findings(rep))
    rep["rows"][1]["search"]["records"][3]["score"] = -1.0  # Phase II found better
    assert "first Phase I candidate" not in " ".join(findings(rep))
