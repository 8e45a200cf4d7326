"""Spend every byte (issue 23): the token embedding and the output head as search units, against fixed rows.

SmolLM2 + the embedded task, HQQ (g64, axis 1), ``precision="auto"`` (bf16 where the CPU computes it natively),
the compare harness's budgets (B4 = uniform 4-bit HQQ r8 with the embedding 16-bit; Bmid = half-way to uniform
3-bit r8), the library's final recipe (``TrainSpec``, 60 steps), test loss on 64 test blocks, final seeds 0 and 1.

Rows (no search): uniform 4-bit r8 (= B4), the same with the embedding / head at 8 and at 4 bits, the rule row
(embedding 8-bit, 8 bits on the blocks llama.cpp's ``use_more_bits`` favours, 4 elsewhere, r8) and 16-bit LoRA
r8. Runs: the default search (``embeddings="search"``, whatever final choice is current) at B4 and Bmid with
search seeds 0 and 1, each chosen point trained with the final recipe at final seeds 0 and 1.

Resumable: every final training is written to the benchmarks' shared ``results/finals.cache.json`` at once and
every search to ``results/searches.cache.json`` (the same searches as ``no_regret.py``; commit both); a search
keeps its trial store in ``runs/searches/``. ``--dry-run`` builds every row and prints its bytes.

    python benchmarks/every_byte.py [--dry-run] [--budgets B4 Bmid] [--search-seeds 0 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from _common import FINAL_SEEDS, RESULTS, budgets, cpu_name, demo_search, final_scores, load

from autoqra.bench.rows import fixed_assignment
from autoqra.config import OptimizeConfig
from autoqra.memory.model import MemoryModel
from autoqra.preparation import prepare
from autoqra.space import Assignment

log = logging.getLogger("every_byte")
CONFIG = dict(preset="demo")  # the compare harness's search preset; embeddings="search" is the default


def rows(model, tok) -> tuple[dict[str, Assignment], MemoryModel]:
    """The fixed rows as assignments of the search's space (with the embedding unit), and their memory model."""
    su = prepare(model, OptimizeConfig(**CONFIG), tokenizer=tok)
    space = su.space.with_unquantized()
    mm = su.memory.with_space(space)
    out = {
        "uniform4_r8": space.uniform(4, 8),
        "uniform4_r8_emb8": fixed_assignment(space, 4, 8, emb_bits=8),
        "uniform4_r8_emb4": fixed_assignment(space, 4, 8, emb_bits=4),
        "rule_row": fixed_assignment(space, 4, 8, emb_bits=8, rule_bits=8),
        "lora16_r8": space.uniform(16, 8),
    }
    return out, mm


def spend(space, a: Assignment, mm: MemoryModel) -> dict:
    """What ``a`` spends on the embedding / head units: their bits and bytes (and the whole model's)."""
    emb = {u.name: b for u, b in zip(space.units, a.bits) if not u.has_rank}
    return {"model_bytes": int(mm.predict(a).model_bytes), "embedding_bits": emb}


def tests(model, tok, a: Assignment, backend_options: dict | None = None) -> list[float]:
    """Final-recipe test losses of ``a`` at the final seeds, in hqq's default formats or ``backend_options``'s (a
    search's chosen formats)."""
    cfg = OptimizeConfig(**CONFIG, **({"backend_options": backend_options} if backend_options else {}))
    return [final_scores(model, tok, cfg, a, s)["test"] for s in FINAL_SEEDS]


def gap_closed(x: float, lo: float, hi: float) -> float:
    """Share of the gap from ``lo`` (uniform 4-bit r8's test loss) to ``hi`` (16-bit LoRA r8's) that ``x`` closes."""
    return (lo - x) / (lo - hi) if lo != hi else float("nan")


def write(doc: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "every_byte.json").write_text(json.dumps(doc, indent=1))
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    u4, l16 = mean(doc.get("uniform4_r8_test") or []), mean(doc.get("lora16_r8_test") or [])
    lines = [f"CPU: {doc['cpu']}; precision {doc['precision']}; final recipe 60 steps, test loss on 64 test blocks, "
             "final seeds 0/1.", "", "| configuration | model bytes | test loss (seed 0 / 1) | mean | gap closed |",
             "|---|---|---|---|---|"]
    for k, label in (("uniform4_r8", "uniform 4-bit r8, embedding 16-bit (= B4)"),
                     ("uniform4_r8_emb8", "uniform 4-bit r8, embedding/head 8-bit"),
                     ("uniform4_r8_emb4", "uniform 4-bit r8, embedding/head 4-bit"),
                     ("rule_row", "rule: embedding 8-bit, llama.cpp's blocks at 8 bits, r8"),
                     ("lora16_r8", "16-bit LoRA r8")):
        t = doc.get(f"{k}_test") or []
        lines.append(f"| {label} | {doc['bytes'][k]:,} | {' / '.join(f'{x:.4f}' for x in t) or '–'} | "
                     f"{mean(t):.4f} | {100 * gap_closed(mean(t), u4, l16):.0f} % |" if t else
                     f"| {label} | {doc['bytes'][k]:,} | – | – | – |")
    for r in doc["runs"]:
        t = r.get("chosen_test") or []
        lines.append(f"| search {r['budget']} seed {r['search_seed']} (embedding {r.get('embedding_bits')}) | "
                     f"{r['chosen']['model_bytes']:,} | {' / '.join(f'{x:.4f}' for x in t) or '–'} | "
                     + (f"{mean(t):.4f} | {100 * gap_closed(mean(t), u4, l16):.0f} % |" if t else "– | – |"))
    rule = mean(doc.get("rule_row_test") or [])
    for b in ("B4", "Bmid"):
        ts = [mean(r["chosen_test"]) for r in doc["runs"] if r["budget"] == b and r.get("chosen_test")]
        if ts:
            m = mean(ts)
            lines.append(f"\n{b}: mean over search seeds {[r['search_seed'] for r in doc['runs'] if r['budget'] == b]} "
                         f"**{m:.4f}** = {100 * gap_closed(m, u4, l16):.1f} % of the gap from uniform 4-bit r8 to 16-bit "
                         f"LoRA r8; {'below' if m < rule else 'not below'} the rule row ({rule:.4f}).")
    (RESULTS / "every_byte.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", nargs="+", default=["B4", "Bmid"], choices=["B4", "Bmid"])
    p.add_argument("--search-seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="build the rows and print their bytes; train nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    model, tok = load()
    bud = budgets(model, tok)
    fixed, mm = rows(model, tok)
    space = mm.space
    info = {k: spend(space, a, mm) for k, a in fixed.items()}
    if args.dry_run:
        print(json.dumps({"budgets": bud, "units": space.n_units, "embedding_units":
                          {u.name: list(space.unit_bits(i)) for i, u in enumerate(space.units) if not u.has_rank},
                          "rows": info}, indent=1))
        return 0
    doc: dict = {"cpu": cpu_name(), "precision": None, "budgets": bud,
                 "bytes": {k: v["model_bytes"] for k, v in info.items()}, "runs": []}
    for k, a in fixed.items():
        doc[f"{k}_test"] = tests(model, tok, a)
        write(doc)
    for name in args.budgets:
        for seed in args.search_seeds:
            run = {k: v for k, v in demo_search(model, tok, name, bud[name], seed).items()
                   if k not in ("cost_model", "baselines")}
            doc["precision"] = doc["precision"] or run.get("precision")
            a = Assignment.from_dict({k: run["chosen"][k] for k in ("units", "bits", "ranks")})
            doc["runs"].append({**run, "chosen_test": tests(model, tok, a, run.get("backend_options"))})
            write(doc)
    write(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
