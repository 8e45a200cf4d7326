"""Does the search's answer beat uniform QLoRA after the library's own final training? (issue: no regret)

SmolLM2 + the embedded task, HQQ, ``precision="auto"`` (bf16 where the CPU computes it natively), the compare
harness's budgets B4 and Bmid, search seeds 0, 1, 2 at each: one ``autoqra.optimize`` at the demo preset
(with its final rung, its own trial store), then the library's final recipe (``TrainSpec``, 60 steps, cosine,
test loss on 64 test blocks, final seeds 0 and 1) for the chosen point, for every uniform baseline that fits
the budget, for uniform 4-bit r8 and for 16-bit LoRA r8. Per run it also reports the Spearman of the cost
model's predictions against the final rung's validation scores, with today's rank table (``new``) and the
previous one (``old``: the smallest rank's raw leave-one-out gains for every rank).

Run: .venv/bin/python benchmarks/no_regret.py [--budgets B4 Bmid] [--seeds 0 1 2] [--report-only]
-> benchmarks/results/no_regret.json / .md, rewritten after each finished run. Resumable across sessions: every
finished search is kept in benchmarks/results/searches.cache.json and every final training in
benchmarks/results/finals.cache.json (both committed, shared with every_byte.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import attrs
import numpy as np
import torch
from _common import (
    EMBEDDING_UNITS,
    FINAL_SEEDS,
    FINALS,
    RESULTS,
    SEARCHES,
    Cache,
    budgets,
    cpu_name,
    demo_search,
    final_key,
    final_scores,
    load,
    parse_final_key,
    search_key,
)

from autoqra.config import OptimizeConfig
from autoqra.guidance.costmodel import CostModel
from autoqra.guidance.importance import spearman
from autoqra.preparation import prepare
from autoqra.space import Assignment

log = logging.getLogger("no_regret")
EMB = EMBEDDING_UNITS


def search(model, tok, name: str, budget: int, seed: int) -> tuple[dict, dict]:
    """The shared demo search (``_common.demo_search``) plus the rank tables' Spearman on its final rung; returns
    the run (without its cost model, kept out of the report) and the cost model's dict."""
    run = dict(demo_search(model, tok, name, budget, seed, formats="fixed"))
    cm = run.pop("cost_model", {}) or {}
    run["rank_spearman"] = rank_spearman(cm, run["final_rung"])
    return run, cm


def rank_models(cm: dict) -> dict[str, CostModel] | None:
    """The run's cost model with today's rank table (``new``) and the previous one (``old``: the smallest rank's
    raw leave-one-out gains for every rank); None when the run did not keep the previous table."""
    if not cm or cm.get("rank_gain_probe") is None:
        return None
    keys = ("bits", "ranks", "quant", "rank_gain", "steps", "ref_bits", "seconds", "quant_scale", "rank_gain_probe",
            "rank_info")
    base = {k: cm[k] for k in keys if k in cm}
    return {"old": CostModel.from_dict({**base, "rank_gain": cm["rank_gain_probe"]}), "new": CostModel.from_dict(base)}


def _spearmans(models: dict[str, CostModel], pts: list[tuple[Assignment, float]]) -> dict[str, float]:
    y = np.array([s for _, s in pts])
    return {name: float(spearman(np.array([m.predict(a) for a, _ in pts]), y)) for name, m in models.items()}


def rank_spearman(cm: dict, final_rung: list[dict]) -> dict:
    """Spearman of the cost model's additive prediction (new rank table vs the previous one) with the final
    rung's validation scores, over its entrants."""
    models = rank_models(cm)
    if models is None or len(final_rung) < 3:
        return {"old": None, "new": None}
    return _spearmans(models, [(Assignment.from_dict(e["assignment"]), e["val_score"]) for e in final_rung
                               if e["val_score"] is not None])


def pooled_rank_spearman(model, tok, run: dict, cm: dict, finals: Cache) -> dict:
    """Spearman of the run's cost model (new rank table vs the previous one) against the final recipe's mean test
    loss, over every assignment with both final trainings in the shared finals cache that fits the run's budget
    (search choices, uniform rows, fidelity_vs_final's candidates): the final rung alone has 1-3 entrants."""
    models = rank_models(cm)
    if models is None:
        return {"old": None, "new": None, "n": 0}
    su = prepare(model, OptimizeConfig(budget=run["budget_bytes"], preset="demo"), tokenizer=tok)
    wide = attrs.evolve(su.space.with_unquantized(), ranks=tuple(sorted({0, *su.space.ranks})))  # rank 0: old points
    mem = su.memory.with_space(wide)
    units = list(su.space.unit_names)
    pts = []
    for k, v in finals.data.items():
        parsed = parse_final_key(k)
        if parsed is None or parsed[1:] != (0, 60):
            continue
        a0 = parsed[0]
        other = finals.get(final_key(a0, 1))
        if other is None or not set(a0.units) <= set(units):
            continue
        bits, ranks = dict(zip(a0.units, a0.bits)), dict(zip(a0.units, a0.ranks))
        a = Assignment(units, [bits.get(u, 16) for u in units], [ranks.get(u, 0) for u in units])
        if (any(b not in models["new"].bits for b in a.bits) or any(r not in models["new"].ranks for r in a.ranks)
                or mem.predict(a).model_bytes > run["budget_bytes"]):
            continue
        pts.append((a, -(v["test"] + other["test"]) / 2))
    if len(pts) < 3:
        return {"old": None, "new": None, "n": len(pts)}
    return {**_spearmans(models, pts), "n": len(pts)}


class NotTrained(Exception):
    """A final training that ``--report-only`` would have to run."""


def tests_of(model, tok, budget: int, a: dict, train: bool = True) -> list[float]:
    cfg = OptimizeConfig(budget=budget, preset="demo")
    asg = Assignment(a["units"], a["bits"], a["ranks"])
    if not train and any(Cache(FINALS).get(final_key(asg, s)) is None for s in FINAL_SEEDS):
        raise NotTrained(asg)
    return [final_scores(model, tok, cfg, asg, s)["test"] for s in FINAL_SEEDS]


def complete(model, tok, run: dict, cm: dict, train: bool = True) -> dict:
    """The run's final trainings (chosen point, fitting uniform baselines, uniform 4-bit r8); ``train=False``:
    only from the shared finals cache (the run is returned as it is when one is missing)."""
    try:
        return _complete(model, tok, run, cm, train)
    except NotTrained:
        return run


def _complete(model, tok, run: dict, cm: dict, train: bool) -> dict:
    tests_of_ = lambda b, a: tests_of(model, tok, b, a, train)  # noqa: E731
    b = run["budget_bytes"]
    out = dict(run)
    out["chosen_test"] = tests_of_(b, run["chosen"])
    fitting = {n: a for n, a in run["baselines"].items() if a["model_bytes"] <= b and not n.startswith("16bit")}
    tests = {n: tests_of_(b, a) for n, a in fitting.items()}
    best = min(tests, key=lambda n: np.mean(tests[n]))
    out["best_uniform_fitting"] = {"name": best, "test": tests[best]}
    out["uniform_fitting_tests"] = tests
    units = run["chosen"]["units"]
    out["uniform4_r8_test"] = tests_of_(b, {"units": units, "bits": [16 if u in EMB else 4 for u in units],
                                            "ranks": [0 if u in EMB else 8 for u in units]})
    out["chosen_minus_best_uniform"] = float(np.mean(out["chosen_test"]) - np.mean(tests[best]))
    out["rank_spearman_pooled"] = pooled_rank_spearman(model, tok, run, cm, Cache(FINALS))
    return out


def verdict(runs: list[dict]) -> dict:
    ok = [r for r in runs if "chosen_test" in r]
    by = {b: [r for r in ok if r["budget"] == b] for b in ("B4", "Bmid")}
    v = {"runs_complete": len(ok),
         "never_worse": sum(r["chosen_minus_best_uniform"] <= 0.002 for r in ok)}
    if by["B4"]:
        v["B4_mean_gain_over_uniform4_r8"] = float(np.mean([np.mean(r["uniform4_r8_test"]) - np.mean(r["chosen_test"])
                                                            for r in by["B4"]]))
    if by["Bmid"]:
        v["Bmid_mean_gain_over_best_uniform"] = float(np.mean([-r["chosen_minus_best_uniform"] for r in by["Bmid"]]))
    return v


def write_md(doc: dict, path: Path) -> None:
    lines = ["# No regret: the chosen point vs uniform QLoRA after the final recipe (`benchmarks/no_regret.py`)", "",
             f"CPU: {doc['cpu']}; precision {doc['precision']}; final recipe 60 steps, test loss on 64 test blocks, "
             f"final seeds 0/1. 16-bit LoRA r8: {fmt(doc.get('lora16_r8_test'))}.", "",
             "| budget | search seed | chosen (final rung) | chosen test | best fitting uniform | its test | "
             "uniform 4-bit r8 | chosen − best uniform | rank Spearman old → new (final rung; pooled finals) | search |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        if "chosen_test" not in r:
            continue
        rs, pool = r["rank_spearman"], r.get("rank_spearman_pooled") or {}
        lines.append(
            f"| {r['budget']} | {r['search_seed']} | {r.get('chosen_label')} | {fmt(r['chosen_test'])} | "
            f"{r['best_uniform_fitting']['name']} | {fmt(r['best_uniform_fitting']['test'])} | "
            f"{fmt(r['uniform4_r8_test'])} | {r['chosen_minus_best_uniform']:+.4f} | "
            f"{_f(rs.get('old'))} → {_f(rs.get('new'))}; {_f(pool.get('old'))} → {_f(pool.get('new'))} "
            f"(n={pool.get('n', 0)}) | {r['search_wall_seconds'] / 60:.1f} min |")
    lines += ["", "Verdict: " + json.dumps(doc["verdict"])]
    path.write_text("\n".join(lines) + "\n")


def _f(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def fmt(t) -> str:
    return "–" if not t else f"{np.mean(t):.4f} ({' / '.join(f'{x:.4f}' for x in t)})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", nargs="+", default=["B4", "Bmid"], choices=["B4", "Bmid"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    searches = Cache(SEARCHES)
    model, tok = load()
    bud = budgets(model, tok)
    runs = []
    for seed in args.seeds:  # seeds outer: seeds 0 and 1 at both budgets are also every_byte.py's searches
        for name in args.budgets:
            key = search_key(name, seed, OptimizeConfig(budget=bud[name], preset="demo", seed=seed, formats="fixed"))
            if args.report_only and searches.get(key) is None:
                continue
            run, cm = search(model, tok, name, bud[name], seed)
            runs.append(complete(model, tok, run, cm, train=not args.report_only))
            write(runs, bud, model, tok, args)
    write(runs, bud, model, tok, args)
    return 0


def write(runs, bud, model, tok, args) -> None:
    u16 = None
    if runs:
        a = runs[0]["baselines"]
        ref = next(v for n, v in a.items() if n.startswith("16bit"))
        with contextlib.suppress(NotTrained):
            u16 = tests_of(model, tok, bud["B4"], {**ref, "bits": [16] * len(ref["bits"]),
                                                   "ranks": [0 if u in EMB else 8 for u in ref["units"]]},
                           train=not args.report_only)
    doc = {"cpu": cpu_name(), "precision": runs[0]["precision"] if runs else None, "budgets": bud, "runs": runs,
           "lora16_r8_test": u16, "verdict": verdict(runs)}
    (RESULTS / "no_regret.json").write_text(json.dumps(doc, indent=1))
    write_md(doc, RESULTS / "no_regret.md")


if __name__ == "__main__":
    sys.exit(main())
