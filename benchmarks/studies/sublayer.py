"""Does splitting each block into its attention and its MLP (``granularity="sublayer"``) buy a better point?

Issue 23 asks the B4 search to close >= 65 % of the gap from uniform 4-bit r8 to 16-bit LoRA r8; with block units
today's default closes 61.4 % (search seeds 0 and 1, ``benchmarks/results/every_byte.json``). A block's attention
is a quarter of its weights on SmolLM2, so with sublayer units the bytes of one 8-bit MLP buy 8-bit attention in
three blocks: the search has finer steps to spend the budget with (llama.cpp's Q4_K_M raises ``attn_v`` and
``ffn_down`` rather than whole blocks). The price is a cost model over twice the units (a longer search).

For each budget and search seed: the demo search of ``benchmarks/_common.demo_search`` with
``granularity="sublayer"`` (everything else the default), its chosen point trained with the library's final recipe
(60 steps, final seeds 0 / 1, test loss on 64 test blocks), beside the block search of the same budget and seed
(read from the shared searches cache; the same paired final trainings) and the gap from uniform 4-bit r8 to 16-bit
LoRA r8 (``every_byte.json``'s rows). Searches keep their trial stores in ``benchmarks/runs/searches/`` and their
results in the shared ``results/searches.cache.json``; finals in ``results/finals.cache.json`` (resumable).

Run alone on the machine (search wall time is reported):
    .venv/bin/python benchmarks/studies/sublayer.py [--budgets B4 Bmid] [--seeds 0 1] [--threads 2]
→ benchmarks/studies/results/sublayer.json / .md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared _common
from _common import (
    FINAL_SEEDS,
    RESULTS,
    Cache,
    budgets,
    cpu_name,
    demo_search,
    final_scores,
    load,
    search_key,
)
from _common import SEARCHES as SEARCHES_CACHE

from autoqra.config import OptimizeConfig
from autoqra.space import Assignment

log = logging.getLogger("sublayer")
OUT = Path(__file__).resolve().parent / "results"


def chosen(run: dict) -> Assignment:
    return Assignment.from_dict({k: run["chosen"][k] for k in ("units", "bits", "ranks")})


def tests(model, tok, a: Assignment, granularity: str) -> list[float]:
    cfg = OptimizeConfig(preset="demo", granularity=granularity)
    return [final_scores(model, tok, cfg, a, s)["test"] for s in FINAL_SEEDS]


def block_run(name: str, budget: int, seed: int) -> dict | None:
    """Today's default demo search (block units) of the same budget and seed from the shared cache (None when
    not run)."""
    cfg = OptimizeConfig(budget=budget, preset="demo", seed=seed, granularity="block")
    return Cache(SEARCHES_CACHE).get(search_key(name, seed, cfg))


def summary(run: dict, a: Assignment, test: list[float]) -> dict:
    att = [b for u, b in zip(a.units, a.bits) if u.endswith(("self_attn", ".attn"))]
    mlp = [b for u, b in zip(a.units, a.bits) if u.endswith(".mlp")]
    return {"search_wall_seconds": run.get("search_wall_seconds"), "model_bytes": run["chosen"]["model_bytes"],
            "embedding_bits": run.get("embedding_bits"), "test": test, "mean": sum(test) / len(test),
            "attention_8bit": sum(b == 8 for b in att), "mlp_8bit": sum(b == 8 for b in mlp),
            "chosen": run["chosen"], "chosen_label": run.get("chosen_label")}


def write(doc: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sublayer.json").write_text(json.dumps(doc, indent=1))
    lo, hi = doc.get("uniform4_r8"), doc.get("lora16_r8")

    def closed(x):
        return f"{(lo - x) / (lo - hi) * 100:.1f} %" if lo is not None and hi is not None and x is not None else "–"

    lines = ["# Sublayer units vs block units (`benchmarks/studies/sublayer.py`)", "",
             f"CPU: {doc['cpu']}; final recipe 60 steps, test loss on 64 test blocks, final seeds 0 / 1; gap from "
             f"uniform 4-bit r8 ({lo}) to 16-bit LoRA r8 ({hi}).", "",
             "| budget | search seed | units | test (seed 0 / 1) | mean | gap closed | 8-bit attention / MLP units | "
             "search |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        for kind in ("block", "sublayer"):
            s = r.get(kind)
            if not s:
                continue
            wall = s.get("search_wall_seconds")
            wall_s = f"{wall / 60:.1f} min" if wall else "–"
            att = f"{s['attention_8bit']} / {s['mlp_8bit']}" if kind == "sublayer" else "–"
            lines.append(f"| {r['budget']} | {r['seed']} | {kind} | {s['test'][0]:.4f} / {s['test'][1]:.4f} | "
                         f"{s['mean']:.4f} | {closed(s['mean'])} | {att} | {wall_s} |")
    (OUT / "sublayer.md").write_text("\n".join(lines) + "\n")


def time_cost_model(model, tok, budget: int) -> int:
    """The demo search's cost model on the sublayer space at ``budget`` (the search's own code path, a throwaway
    store), timed alone; compare with the block space's, which the searches' progress lines time."""
    import time

    from autoqra.preparation import cost_model_for, prepare
    from autoqra.progress import Progress
    from autoqra.store import TrialStore

    cfg = OptimizeConfig(preset="demo", budget=budget, granularity="sublayer")
    su = prepare(model, cfg, tokenizer=tok)
    t0 = time.perf_counter()
    with Progress(enabled=True) as prog:
        cm = cost_model_for(su.space, su.backend, su.evaluator, cfg, TrialStore(None), prog)
    out = {"cpu": cpu_name(), "precision": su.precision, "units": su.space.n_units,
           "seconds": time.perf_counter() - t0, "cost_model_seconds": getattr(cm, "seconds", None)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sublayer_cost_model.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", nargs="+", default=["B4"], choices=["B4", "Bmid"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the spaces and the block runs found; run nothing")
    p.add_argument("--cost-model-only", action="store_true",
                   help="time the sublayer space's cost model alone (what the search's preparation costs) "
                        "→ results/sublayer_cost_model.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    model, tok = load()
    bud = budgets(model, tok)
    eb = json.loads((RESULTS / "every_byte.json").read_text()) if (RESULTS / "every_byte.json").is_file() else {}
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    if args.dry_run:
        from autoqra.preparation import prepare

        for g in ("block", "sublayer"):
            su = prepare(model, OptimizeConfig(preset="demo", budget=bud["B4"], granularity=g), tokenizer=tok)
            print(g, su.space.n_units, "units:", list(su.space.unit_names[:3]), "...")
        for name in args.budgets:
            for seed in args.seeds:
                blk = block_run(name, bud[name], seed)
                print(name, seed, "block run:", blk and blk.get("key"), blk and chosen(blk).bits[:4])
        return 0
    if args.cost_model_only:
        return time_cost_model(model, tok, bud["B4"])
    doc: dict = {"cpu": cpu_name(), "uniform4_r8": mean(eb.get("uniform4_r8_test")),
                 "lora16_r8": mean(eb.get("lora16_r8_test")), "runs": []}
    for name in args.budgets:
        for seed in args.seeds:
            row: dict = {"budget": name, "seed": seed, "budget_bytes": bud[name]}
            blk = block_run(name, bud[name], seed)
            if blk is not None:
                a = chosen(blk)
                row["block"] = summary(blk, a, tests(model, tok, a, "block"))
            run = demo_search(model, tok, name, bud[name], seed, granularity="sublayer")
            a = chosen(run)
            row["sublayer"] = summary(run, a, tests(model, tok, a, "sublayer"))
            doc["runs"].append(row)
            write(doc)
            log.info("%s seed %d: %s", name, seed, {k: row[k]["mean"] for k in ("block", "sublayer") if k in row})
    write(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
