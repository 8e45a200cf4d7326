"""How much of the B4 gap is the 4-bit grid's group size? (A probe for the next lever, not a search.)

SmolLM2 ships as Q4_1 GGUF: its weights were stored at 4 bits in groups of 32 with a scale and a minimum each
(``shared/research``). Re-quantizing them with HQQ at 4 bits in groups of 64 (the library's default) cannot
reproduce that grid; groups of 32 with a min/max start can come close. This probe trains uniform 4-bit r8 with
the embedding / head at 8 bits (the search's choice there) under HQQ group sizes 32, 64 and 128, with the
library's final recipe (60 steps, final seeds 0 / 1, test loss on 64 test blocks), and prices each with the memory
model beside B4. If groups of 32 close most of the gap at a few MB over B4, a group-size dimension of the space is
the next lever on this model; and that lever would come from the model's provenance (weights that were 4-bit
with groups of 32 already), which a model shipped in bf16 does not have.

With ``--search-seeds 0 1``: also the demo search at B4 bytes with 4-bit layers in groups of 32 (the other
bit-widths at 64; ``backend_options={"group_size": {4: 32}}``, everything else the default), and its chosen point's
final trainings: what a user of such a model gets by setting the option.

Searches and final trainings are in the benchmarks' shared caches (``results/searches.cache.json``,
``results/finals.cache.json``; keys tagged with the backend options where they are not the default), so the study
resumes.

Run alone: .venv/bin/python benchmarks/studies/group_size.py [--groups 32 64 128] [--search-seeds 0 1]
→ benchmarks/studies/results/group_size.json / .md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared _common
from _common import FINAL_SEEDS, RESULTS, budgets, cpu_name, demo_search, final_scores, load

from autoqra.bench.rows import fixed_assignment
from autoqra.config import OptimizeConfig
from autoqra.preparation import prepare
from autoqra.quant_backends.hqq import HQQBackend
from autoqra.space import Assignment

OUT = Path(__file__).resolve().parent / "results"
DEFAULT_GROUP = HQQBackend().group_size
#: the searches' per-bit group sizes: 4-bit on this model's own grid, the rest at the default
SEARCH_GROUPS = {4: 32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", nargs="+", type=int, default=[32, 64, 128])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--search-seeds", nargs="*", type=int, default=[],
                   help="also run the demo search at B4 bytes with 4-bit layers in groups of 32 "
                        "(backend_options={'group_size': {4: 32}}) for these search seeds, and its final trainings")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load()
    b4 = budgets(model, tok)["B4"]
    eb = json.loads((RESULTS / "every_byte.json").read_text())
    lo, hi = statistics.fmean(eb["uniform4_r8_test"]), statistics.fmean(eb["lora16_r8_test"])
    rows = []
    for g in args.groups:
        # the default group size is the default backend (the same finals as every_byte's "embedding/head 8-bit")
        cfg = OptimizeConfig(preset="demo", **({} if g == DEFAULT_GROUP else {"backend_options": {"group_size": g}}))
        su = prepare(model, cfg, tokenizer=tok)
        a = fixed_assignment(su.space, 4, 8, emb_bits=8)
        model_bytes = int(su.memory.predict(a).model_bytes)
        test = [final_scores(model, tok, cfg, a, s)["test"] for s in FINAL_SEEDS]
        m = statistics.fmean(test)
        emb = [b for u, b in zip(su.space.units, a.bits) if not u.has_rank]
        rows.append({"group_size": g, "embedding_bits": emb[0] if emb else 16, "model_bytes": model_bytes,
                     "over_b4": model_bytes - b4, "test": test,
                     "mean": m, "gap_closed": (lo - m) / (lo - hi)})
        print(rows[-1], flush=True)
    searches = []
    for seed in args.search_seeds:
        opts = {"group_size": SEARCH_GROUPS}
        run = demo_search(model, tok, "B4", b4, seed, backend_options=opts)
        a = Assignment.from_dict({k: run["chosen"][k] for k in ("units", "bits", "ranks")})
        cfg = OptimizeConfig(preset="demo", backend_options=opts)
        test = [final_scores(model, tok, cfg, a, s)["test"] for s in FINAL_SEEDS]
        m = statistics.fmean(test)
        searches.append({"search_seed": seed, "backend_options": {"group_size": {str(k): v for k, v in SEARCH_GROUPS.items()}},
                         "search_wall_seconds": run.get("search_wall_seconds"), "chosen": run["chosen"],
                         "eight_bit_units": sum(b == 8 for b in a.bits), "test": test, "mean": m,
                         "gap_closed": (lo - m) / (lo - hi)})
        print(searches[-1]["test"], m, flush=True)
    doc = {"cpu": cpu_name(), "budget_b4": b4, "uniform4_r8_g64_emb16": lo, "lora16_r8": hi, "rows": rows,
           "searches": searches}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "group_size.json").write_text(json.dumps(doc, indent=1))
    lines = ["# Uniform 4-bit r8 by HQQ group size, embedding / head at 8 bits where hqq can (`benchmarks/studies/group_size.py`)", "",
             f"CPU: {doc['cpu']}; final recipe 60 steps, test loss on 64 test blocks, final seeds 0 / 1; gap from "
             f"uniform 4-bit r8 g64 with a 16-bit embedding ({lo:.4f}, = B4) to 16-bit LoRA r8 ({hi:.4f}).", "",
             "| group size | embedding / head | model bytes | vs B4 | test (seed 0 / 1) | mean | gap closed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['group_size']} | {r['embedding_bits']}-bit | {r['model_bytes'] / 1e6:.2f} MB | "
                     f"{r['over_b4'] / 1e6:+.2f} MB | "
                     f"{r['test'][0]:.4f} / {r['test'][1]:.4f} | {r['mean']:.4f} | {r['gap_closed'] * 100:.0f} % |")
    lines += ["", "The embedding / head stays 16-bit where hqq cannot quantize its rows at that group size (576 "
              "columns are not a multiple of 128): the space then has no embedding unit."]
    if searches:
        lines += ["", f"The demo search at B4 bytes ({b4}) with 4-bit layers in groups of 32 (the rest 64), "
                  "everything else the default:", "",
                  "| search seed | model bytes | units at 8 bits | test (seed 0 / 1) | mean | gap closed | search |",
                  "|---|---|---|---|---|---|---|"]
        for r in searches:
            wall = f"{r['search_wall_seconds'] / 60:.1f} min" if r["search_wall_seconds"] else "–"
            lines.append(f"| {r['search_seed']} | {r['chosen']['model_bytes'] / 1e6:.2f} MB | {r['eight_bit_units']} | "
                         f"{r['test'][0]:.4f} / {r['test'][1]:.4f} | {r['mean']:.4f} | {r['gap_closed'] * 100:.0f} % | "
                         f"{wall} |")
    (OUT / "group_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
