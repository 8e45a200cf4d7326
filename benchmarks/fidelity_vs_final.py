"""Do the search's rungs predict the final training? SmolLM2 + the embedded task, HQQ, budget B4.

A fixed, diverse set of >= 12 feasible candidates at B4 (uniform variants, the chosen points of earlier
searches, rank-0-heavy and adapter-everywhere points, random byte-neutral edits of uniform 4-bit r8) is
scored

* at every rung of the demo preset's ladder and the previous one (0 = the screen, 10, 24 = today's top rung, 30
  = the previous top rung, in optimizer steps; one evaluator, seed 0,
  16 validation blocks, common LoRA init and data order), once with the rung schedule of the search before
  this change (``constant``: a constant learning rate, rungs continue each other) and once after it
  (``wsd``: rungs share the constant-rate stable phase and each ends with a short linear decay, so a rung's
  score is that of a finished training);
* with the library's final recipe (``TrainSpec``: 60 steps, cosine, lr 3e-3, α 16, batch 4x128): test loss on
  64 test blocks and loss on the whole validation split, final seeds 0 and 1.

It reports the Spearman rank correlation of each rung's score with the final test loss (mean over the final
seeds), before and after, and of the final recipe's validation score (what the final rung chooses on).

Run: .venv/bin/python benchmarks/fidelity_vs_final.py [--modes constant wsd] [--threads 2]
-> benchmarks/results/fidelity_vs_final.json / .md. Resumable: every finished rung measurement is kept in
benchmarks/results/fidelity_vs_final.cache.json and every final training in the benchmarks' shared
results/finals.cache.json (both committed; no_regret.py and every_byte.py use the same finals), read back, never
re-run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from _common import (
    FINAL_SEEDS,
    FINAL_TEST_BLOCKS,
    FINALS,
    RESULTS,
    Cache,
    cpu_name,
    final_key,
    final_scores,
    load,
)

from autoqra.config import PRESETS, OptimizeConfig
from autoqra.evaluators.base import Fidelity
from autoqra.evaluators.finetune import FinetuneEvaluator
from autoqra.guidance.importance import spearman
from autoqra.guidance.moves import random_edit
from autoqra.guidance.repair import make_repair
from autoqra.preparation import prepare
from autoqra.space import Assignment

log = logging.getLogger("fidelity_vs_final")
RUNGS = (0, 10, 24, 30)
TOP_RUNG = PRESETS["demo"]["high_steps"]


def _fill(space, memory, budget: int, bits: list[int], ranks: list[int], order: list[int], up_bits: int) -> Assignment:
    """Raise the units of ``order`` to ``up_bits`` while the assignment fits ``budget``."""
    for u in order:
        b2 = list(bits)
        b2[u] = up_bits
        if memory.predict(Assignment(space.unit_names, b2, ranks)).model_bytes <= budget:
            bits = b2
    return Assignment(space.unit_names, bits, ranks)


def candidates(su, budget: int) -> dict[str, Assignment]:
    """The candidate set (deterministic), every one feasible at ``budget``."""
    sp, mem, n = su.space, su.memory, su.space.n_units
    out: dict[str, Assignment] = {
        "uniform4-r8": sp.uniform(4, 8), "uniform4-r4": sp.uniform(4, 4), "uniform4-r16-3bit-pay": None,
        "uniform3-r16": sp.uniform(3, 16), "uniform4-r0-8bit-fill": None,
    }
    # earlier searches' chosen points at B4 (benchmarks/results/current/compare_full.json)
    cmp = json.loads((RESULTS / "current" / "compare_full.json").read_text())
    for row in cmp["rows"]:
        if row["id"] in ("guided", "guided-s1", "guided-adapted"):
            a = row["assignment"]
            out[f"search-{row['id']}"] = Assignment(a["units"], a["bits"], a["ranks"])
    # llama.cpp-style favoured blocks (first and last eighth, then every third) at 8 bits
    favoured = list(range(n // 8)) + list(range(n - n // 8, n)) + list(range(n // 8, n - n // 8, 3))
    out["rule-8bit-r4"] = _fill(sp, mem, budget, [4] * n, [4] * n, favoured, 8)
    out["uniform4-r0-8bit-fill"] = _fill(sp, mem, budget, [4] * n, [0] * n, favoured, 8)
    # rank-0-heavy: adapters on the first half only, 8-bit blocks bought with the rest
    half = [8 if u < n // 2 else 0 for u in range(n)]
    out["half-r8-8bit-fill"] = _fill(sp, mem, budget, [4] * n, half, list(reversed(favoured)), 8)
    # r16 everywhere paid for by 3-bit blocks (from the last block down)
    bits = [4] * n
    for u in reversed(range(n)):
        if mem.predict(Assignment(sp.unit_names, bits, [16] * n)).model_bytes <= budget:
            break
        bits[u] = 3
    out["uniform4-r16-3bit-pay"] = Assignment(sp.unit_names, bits, [16] * n)
    # random byte-neutral edits of uniform 4-bit r8
    rep = make_repair(mem, budget)
    rng = np.random.default_rng(0)
    x0 = sp.encode(sp.uniform(4, 8))
    for i in range(4):
        y = x0
        for _ in range(3):  # three random byte-neutral edits in a row
            y = random_edit(y, np.asarray(sp.upper), rep.bytes_encoded, budget, rng)
        out[f"random-edit-{i}"] = sp.decode(y)
    for name, a in out.items():
        b = mem.predict(a).model_bytes
        if b > budget:
            raise RuntimeError(f"candidate {name} needs {b} bytes > budget {budget}")
    return out


def rung_scores(model, tok, cfg, a: Assignment, mode: str) -> dict[str, float]:
    """Scores at every rung with one evaluator (seed 0): ``mode`` is the rung schedule."""
    su = prepare(model, cfg, tokenizer=tok)
    ev = FinetuneEvaluator(model, su.space.with_unquantized(), su.backend, data=su.evaluator.data, tokenizer=tok,
                           train=cfg.train, eval_blocks=cfg.resolved("eval_blocks"), seed=0, track_peak=False,
                           precision=su.precision, rungs=True, rung_schedule=mode)
    out = {}
    for steps in sorted(RUNGS):
        r = ev.evaluate(a, Fidelity(steps, f"r{steps}"))
        out[str(steps)] = r.score if r.ok else float("nan")
    return out


def _sp(x: list[float], y: list[float]) -> float:
    ok = [(a, b) for a, b in zip(x, y) if np.isfinite(a) and np.isfinite(b)]
    if len(ok) < 3:
        return float("nan")
    return float(spearman(np.array([p[0] for p in ok]), np.array([p[1] for p in ok])))


def report(cands: dict[str, Assignment], su, cache: Cache, finals: Cache, modes=("constant", "wsd")) -> dict:
    rows = []
    for name, a in cands.items():
        key = a.to_json()
        fin = [finals.get(final_key(a, s)) for s in FINAL_SEEDS]
        rows.append({"name": name, "assignment": a.to_dict(), "model_bytes": su.memory.predict(a).model_bytes,
                     "rungs": {m: cache.get(f"rungs:{m}:{key}") for m in modes},
                     "final_test": [f["test"] if f else None for f in fin],
                     "final_val": [f["val"] if f else None for f in fin]})
    done = [r for r in rows if all(v is not None for v in r["final_test"])]
    test = [float(np.mean(r["final_test"])) for r in done]
    neg_test = [-t for t in test]
    sp: dict[str, dict[str, float]] = {}
    for steps in RUNGS:
        s = {}
        for m, label in (("constant", "before"), ("wsd", "after")):
            pts = [(r["rungs"][m][str(steps)], nt) for r, nt in zip(done, neg_test)
                   if str(steps) in (r["rungs"].get(m) or {})]
            s[label] = _sp([p[0] for p in pts], [p[1] for p in pts])
        sp[str(steps)] = s
    with_val = [(r, nt) for r, nt in zip(done, neg_test) if all(v is not None for v in r["final_val"])]
    val_sp = _sp([-float(np.mean(r["final_val"])) for r, _ in with_val], [nt for _, nt in with_val])
    return {"cpu": cpu_name(), "precision": su.precision, "budget_bytes": su.budget_bytes,
            "final_steps": 60, "final_seeds": list(FINAL_SEEDS), "final_test_blocks": FINAL_TEST_BLOCKS,
            "rung_eval_blocks": 16, "top_rung": TOP_RUNG, "n_complete": len(done), "candidates": rows,
            "spearman": sp, "spearman_final_val": val_sp, "n_final_val": len(with_val)}


def write_md(doc: dict, path: Path) -> None:
    lines = ["# Do the rungs predict the final training? (`benchmarks/fidelity_vs_final.py`)", "",
             f"CPU: {doc['cpu']}; precision {doc['precision']}; budget B4 = {doc['budget_bytes']:,} bytes; "
             f"{doc['n_complete']} candidates with both final trainings.", "",
             "Spearman of each rung's score with the final test loss (60-step cosine recipe, mean of final seeds 0/1, "
             "64 test blocks); `before` = constant-rate rungs, `after` = warmup-stable-decay rungs:", "",
             "| rung (steps) | before | after |", "|---|---|---|"]
    for k, v in doc["spearman"].items():
        top = " (top rung)" if int(k) == doc["top_rung"] else ""
        lines.append(f"| {k}{top} | {v['before']:.3f} | {v['after']:.3f} |")
    lines += ["", f"The final recipe's validation loss (what the final rung chooses on) vs its test loss: "
              f"Spearman {doc['spearman_final_val']:.3f} ({doc['n_final_val']} candidates; finals read from "
              "`compare_full.json` have no validation loss).", "",
              f"| candidate | model bytes | rungs before ({'/'.join(map(str, RUNGS))}) | rungs after "
              f"({'/'.join(map(str, RUNGS))}) | final test (s0/s1) | mean |",
              "|---|---|---|---|---|---|"]

    def fmt(r):
        return " / ".join(f"{-r[str(s)]:.4f}" if str(s) in r else "–" for s in RUNGS) if r else "–"

    for r in doc["candidates"]:
        ft = r["final_test"]
        mean = f"{np.mean(ft):.4f}" if all(v is not None for v in ft) else "–"
        lines.append(f"| {r['name']} | {r['model_bytes'] / 1e6:.2f} MB | {fmt(r['rungs'].get('constant'))} | "
                     f"{fmt(r['rungs'].get('wsd'))} | {' / '.join(f'{v:.4f}' if v is not None else '–' for v in ft)} "
                     f"| {mean} |")
    lines += ["", "Losses are shown (lower is better); rung scores are -loss on 16 validation blocks."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["constant", "wsd"], choices=["constant", "wsd"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-finals", action="store_true", help="rungs only (finals later)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cache = Cache(RESULTS / "fidelity_vs_final.cache.json")
    # final trainings live in the benchmarks' shared cache (no_regret / every_byte read and write the same recipe);
    # the ones this study ran before it used that cache move there
    finals = Cache(FINALS)
    for k in [k for k in cache.data if k.startswith("final:")]:
        if finals.get(k) is None:
            finals.put(k, cache.get(k))
    model, tok = load()
    cfg0 = OptimizeConfig(preset="demo", embeddings="keep", ranks=(0, 4, 8, 16))  # the space of the earlier runs
    su = prepare(model, cfg0, tokenizer=tok)
    budget = su.memory.predict(su.space.uniform(4, 8)).model_bytes
    cfg = OptimizeConfig(preset="demo", budget=budget, embeddings="keep", ranks=(0, 4, 8, 16))
    su = prepare(model, cfg, tokenizer=tok)
    cands = candidates(su, budget)
    log.info("%d candidates at B4 = %d bytes (%s, %s)", len(cands), budget, cpu_name(), su.precision)
    if not args.report_only:
        for name, a in cands.items():  # every candidate's rungs first (minutes), then the final trainings
            key = a.to_json()
            for m in args.modes:
                have = cache.get(f"rungs:{m}:{key}") or {}
                if any(str(s) not in have for s in RUNGS):  # a rung added since: the same run, one more stop
                    cache.put(f"rungs:{m}:{key}", {**have, **rung_scores(model, tok, cfg, a, m)})
                log.info("%s rungs %s: %s", name, m, cache.get(f"rungs:{m}:{key}"))
        for name, a in ([] if args.skip_finals else cands.items()):
            for s in FINAL_SEEDS:
                log.info("%s final seed %d: %s", name, s, final_scores(model, tok, cfg, a, s, finals))
            doc = report(cands, su, cache, finals)
            (RESULTS / "fidelity_vs_final.json").write_text(json.dumps(doc, indent=1))
            write_md(doc, RESULTS / "fidelity_vs_final.md")
    doc = report(cands, su, cache, finals)
    (RESULTS / "fidelity_vs_final.json").write_text(json.dumps(doc, indent=1))
    write_md(doc, RESULTS / "fidelity_vs_final.md")
    print(json.dumps(doc["spearman"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
