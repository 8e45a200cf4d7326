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
finished search and final training is kept in benchmarks/results/no_regret.cache.json (committed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import FINAL_SEEDS, RESULTS, ROOT, Cache, budgets, cpu_name, final_scores, load

import autoqra
from autoqra.config import OptimizeConfig
from autoqra.guidance.costmodel import CostModel
from autoqra.guidance.importance import spearman
from autoqra.space import Assignment

log = logging.getLogger("no_regret")
WORK = ROOT / "runs" / "no_regret"


def search(model, tok, name: str, budget: int, seed: int, cache: Cache) -> dict:
    cfg = OptimizeConfig(budget=budget, preset="demo", seed=seed)
    key = search_key(name, seed, cfg)
    if cache.get(key) is not None:
        return cache.get(key)
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = autoqra.optimize(model, tokenizer=tok, config=cfg, store=WORK / f"{key.replace(':', '-')}.db", progress=True)
    wall = time.perf_counter() - t0
    cm = res.info.get("cost_model") or {}
    fr = res.info.get("final_rung") or []
    out = {"budget": name, "budget_bytes": budget, "search_seed": seed, "cpu": cpu_name(),
           "precision": res.info.get("precision"), "search_wall_seconds": wall,
           "final_rung_seconds": res.info.get("final_rung_seconds"),
           "chosen": {**res.best.assignment.to_dict(), "model_bytes": res.best.memory.model_bytes},
           "chosen_label": next((e["label"] for e in fr if e["assignment"] == res.best.assignment.to_dict()), None),
           "baselines": {n: {**t.assignment.to_dict(), "model_bytes": t.memory.model_bytes}
                         for n, t in res.baselines.items()},
           "final_rung": [{"label": e["label"], "assignment": e["assignment"], "val_score": e["val_score"],
                           "top_rung_score": e["top_rung_score"]} for e in fr],
           "rank_spearman": rank_spearman(cm, fr), "stop_reasons": res.info.get("stop_reasons"),
           "evaluations": len(res.history)}
    cache.put(key, out)
    return out


def search_key(name: str, seed: int, cfg: OptimizeConfig) -> str:
    """Cache key of one search: budget, seed and the rank ladder (the default ladder changed once)."""
    return f"search:{name}:{seed}:r{'-'.join(map(str, cfg.ranks))}"


def rank_spearman(cm: dict, final_rung: list[dict]) -> dict:
    """Spearman of the cost model's additive prediction (new rank table vs the previous one) with the final
    rung's validation scores, over its entrants."""
    keys = ("bits", "ranks", "quant", "rank_gain", "steps", "ref_bits", "seconds", "quant_scale", "rank_gain_probe",
            "rank_info")
    if not cm or cm.get("rank_gain_probe") is None or len(final_rung) < 3:
        return {"old": None, "new": None}
    new = CostModel.from_dict({k: cm[k] for k in keys if k in cm})
    old = CostModel.from_dict({**{k: cm[k] for k in keys if k in cm}, "rank_gain": cm["rank_gain_probe"]})
    pts = [(Assignment.from_dict(e["assignment"]), e["val_score"]) for e in final_rung if e["val_score"] is not None]
    y = np.array([s for _, s in pts])
    return {name: float(spearman(np.array([m.predict(a) for a, _ in pts]), y)) for name, m in (("old", old), ("new", new))}


def tests_of(model, tok, budget: int, a: dict, cache: Cache) -> list[float]:
    cfg = OptimizeConfig(budget=budget, preset="demo")
    asg = Assignment(a["units"], a["bits"], a["ranks"])
    return [final_scores(model, tok, cfg, asg, s, cache)["test"] for s in FINAL_SEEDS]


def complete(model, tok, run: dict, cache: Cache) -> dict:
    """The run's final trainings (chosen point, fitting uniform baselines, uniform 4-bit r8)."""
    b = run["budget_bytes"]
    out = dict(run)
    out["chosen_test"] = tests_of(model, tok, b, run["chosen"], cache)
    fitting = {n: a for n, a in run["baselines"].items() if a["model_bytes"] <= b and not n.startswith("16bit")}
    tests = {n: tests_of(model, tok, b, a, cache) for n, a in fitting.items()}
    best = min(tests, key=lambda n: np.mean(tests[n]))
    out["best_uniform_fitting"] = {"name": best, "test": tests[best]}
    out["uniform_fitting_tests"] = tests
    u4 = next(a for n, a in run["baselines"].items() if n.startswith("uniform-4bit"))
    out["uniform4_r8_test"] = tests_of(model, tok, b, {**u4, "ranks": [8] * len(u4["ranks"])}, cache)
    out["chosen_minus_best_uniform"] = float(np.mean(out["chosen_test"]) - np.mean(tests[best]))
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
             "uniform 4-bit r8 | chosen − best uniform | rank Spearman old → new | search |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        if "chosen_test" not in r:
            continue
        rs = r["rank_spearman"]
        lines.append(
            f"| {r['budget']} | {r['search_seed']} | {r.get('chosen_label')} | {fmt(r['chosen_test'])} | "
            f"{r['best_uniform_fitting']['name']} | {fmt(r['best_uniform_fitting']['test'])} | "
            f"{fmt(r['uniform4_r8_test'])} | {r['chosen_minus_best_uniform']:+.4f} | "
            f"{_f(rs.get('old'))} → {_f(rs.get('new'))} | {r['search_wall_seconds'] / 60:.1f} min |")
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
    cache = Cache(RESULTS / "no_regret.cache.json")
    model, tok = load()
    bud = budgets(model, tok)
    runs = []
    for name in args.budgets:
        for seed in args.seeds:
            key = search_key(name, seed, OptimizeConfig(preset="demo"))
            if args.report_only and cache.get(key) is None:
                continue
            run = search(model, tok, name, bud[name], seed, cache)
            runs.append(run if args.report_only else complete(model, tok, run, cache))
            write(runs, bud, model, tok, cache, args)
    write(runs, bud, model, tok, cache, args)
    return 0


def write(runs, bud, model, tok, cache, args) -> None:
    u16 = None
    if runs and not args.report_only:
        a = runs[0]["baselines"]
        ref = next(v for n, v in a.items() if n.startswith("16bit"))
        u16 = tests_of(model, tok, bud["B4"], {**ref, "ranks": [8] * len(ref["ranks"])}, cache)
    doc = {"cpu": cpu_name(), "precision": runs[0]["precision"] if runs else None, "budgets": bud, "runs": runs,
           "lora16_r8_test": u16, "verdict": verdict(runs)}
    (RESULTS / "no_regret.json").write_text(json.dumps(doc, indent=1))
    write_md(doc, RESULTS / "no_regret.md")


if __name__ == "__main__":
    sys.exit(main())
