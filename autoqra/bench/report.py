r"""Benchmark report assembly: per-row aggregation, the recipe that makes reports comparable, merging rows
carried over from an earlier report (see :mod:`autoqra.bench.harness`; findings and markdown: :mod:`autoqra.bench.table`)."""

from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autoqra.bench.rows import ROWS
from autoqra.bench.table import FORMAT, findings
from autoqra.result import _jsonable


def _agg(row: dict[str, Any], budgets: dict[str, int]) -> dict[str, Any]:
    ok = [f for f in row["finals"] if f["status"] == "ok"]
    losses = [float(f["metrics"]["loss"]) for f in ok]
    mem = ok[0]["memory"] if ok else {}
    pred = row["memory_predicted"] or {}
    meas_train = (mem.get("model_bytes", 0) + mem.get("optimizer_bytes", 0) + mem.get("peak_bytes", 0)) if mem else None
    return {
        "loss_mean": statistics.fmean(losses) if losses else None,
        "loss_sd": statistics.stdev(losses) if len(losses) >= 2 else None,
        "n_seeds": len(losses), "losses": losses,
        "model_bytes_predicted": pred.get("model_bytes"), "model_bytes_measured": mem.get("model_bytes"),
        "train_bytes_predicted": pred.get("train_bytes"), "train_bytes_measured": meas_train,
        "fits": [b for b, v in budgets.items() if pred.get("model_bytes") is not None and pred["model_bytes"] <= v],
        "shared_with": next((f["shared_with"] for f in row["finals"] if f["shared_with"]), None),
        "final_seconds": sum(f["seconds"] for f in row["finals"]),
    }


def recipe(bench: Any) -> dict[str, Any]:
    """What makes two reports' rows comparable: model, data, search and final-training recipe, budgets."""
    p, data = bench.p, bench.data
    return {
        "preset": p.name, "model": p.model, "model_fingerprint": bench.fp,
        "data": {"name": "pydoc", "train_blocks": int(data.train.shape[0]), "test_blocks": int(data.test.shape[0]),
                 "validation_blocks": int(data.validation.shape[0])},
        "train": p.train.to_dict(), "bits": list(p.bits), "ranks": list(p.ranks), "search_preset": p.search_preset,
        "search_seed": p.search_seed, "search_options": p.search_options, "final_steps": p.final_steps,
        "final_eval_blocks": p.final_eval_blocks, "seeds": list(p.seeds), "torch_threads": p.threads,
        "budgets": bench.budgets,
    }


def carry_rows(bench: Any, path: Path, running: set[str]) -> dict[str, Any]:
    """Rows of the report at ``path`` that are not in ``running`` (for ``merge``); ``{}`` without a report.

    Raises ``ValueError`` when that report is not an ``autoqra.bench.harness`` report or was made with another
    recipe (:func:`recipe`: a different model, data, budgets, seeds, threads or final training), since
    its rows could not be compared with the ones run now. Rows whose id is no longer a benchmark row
    are dropped; the others take the current row spec's label, parent and repeat flag.
    """
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot merge with {path}: not a readable JSON report ({e})") from e
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise ValueError(f"cannot merge with {path}: format {old.get('format') if isinstance(old, dict) else None!r}"
                         f" is not {FORMAT!r}")
    want = _jsonable(recipe(bench))
    diff = sorted(k for k, v in want.items() if old.get(k) != v)
    if diff:
        raise ValueError(f"cannot merge with {path}: it was made with another recipe ({', '.join(diff)} differ: "
                         + "; ".join(f"{k} {old.get(k)!r} there, {want[k]!r} now" for k in diff) + ")")
    specs = {r.id: r for r in ROWS}
    rows = {r["id"]: {**r, "label": specs[r["id"]].label, "parent": specs[r["id"]].parent,
                      "repeat": specs[r["id"]].repeat, "carried": True}
            for r in old.get("rows", []) if r.get("id") in specs and r["id"] not in running}
    # compute per work folder: the stores only grow, so this invocation's own folder replaces its old entry
    by_work = dict(old.get("compute_by_work") or {"earlier invocations": float(old.get("compute_seconds") or 0.0)})
    return {"rows": rows, "path": path.name, "finished": old.get("finished"), "compute_by_work": by_work}


def build_report(bench: Any, rows: dict[str, dict[str, Any]], started: str, wall: float, partial: bool,
                 carried: dict[str, Any] | None = None) -> dict:
    """The JSON-able benchmark report of the rows finished so far (plus ``carried`` rows, see :func:`carry_rows`)."""
    carried = carried or {}
    both = {**carried.get("rows", {}), **rows}
    out_rows = [{**both[s.id], **_agg(both[s.id], bench.budgets)} for s in ROWS if s.id in both]
    priors = max([r["search"]["priors_seconds"] for r in out_rows if r["search"] and not r.get("carried")] or [0.0])
    compute = sum(st.summary()["seconds"] for st in bench.stores()) + priors
    rep = {
        "format": FORMAT, "name": bench.name, "partial": partial, "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_seconds": wall,
        "compute_seconds": compute, "n_run": bench.n_run, **recipe(bench), "rows": out_rows,
        "compute_by_work": {**carried.get("compute_by_work", {}), str(bench.work): compute},
    }
    if carried.get("rows"):
        others = {k: v for k, v in rep["compute_by_work"].items() if k != str(bench.work)}
        rep["carried"] = {"from": carried["path"], "finished": carried["finished"],
                          "compute_seconds": sum(others.values()), "rows": sorted(carried["rows"])}
    rep["findings"] = findings(rep)
    return rep
