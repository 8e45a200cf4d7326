"""Is the seed's unused budget worth spending on adapters? A paired re-test on run B4 / search seed 1.

search_vs_seed's run B4/1 left 1.2 MB of its budget unused (the cost model's rank table is flat in rank and
negative for 10 blocks, so the knapsack bought no adapter there), and the best of 8 random byte-neutral edits
beat the seed by 0.020 inside that run. Here, with evaluator seeds 0-4 (LoRA init and data order), paired:

* seed: the run's warm start;
* seed+fill: the seed with rank-4 adapters added to its adapter-less blocks (best cost-model gain first) while
  the bytes fit the budget;
* best_random: the run's best random byte-neutral edit (a max of 8: is its +0.020 real?);
* chosen: the search's chosen point (+0.0057 inside the run).

A one-off study on ``benchmarks/search_vs_seed.py``'s run B4/1 (its cache entry and its trial store
``benchmarks/runs/search_vs_seed/B4-s1.db``). The cost model's rank table is measured again with the run's
settings (``autoqra.guidance.measure_cost_model``: the same seed, so the run's table) and kept in the output.

Run: .venv/bin/python benchmarks/studies/rank_slack.py → benchmarks/studies/results/rank_slack.json / .md
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import attrs
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared _common
from _common import RESULTS, Cache, load
from _common import ROOT as BENCHMARKS

from autoqra.config import OptimizeConfig
from autoqra.evaluators.base import Fidelity
from autoqra.guidance import CostModel, measure_cost_model
from autoqra.precision import cpu_name
from autoqra.preparation import prepare
from autoqra.space import Assignment
from autoqra.store import TrialStore

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("rank_slack")


def cost_model(su, cfg: OptimizeConfig, doc: dict) -> CostModel:
    """The run's cost model, measured with the search's settings (``importance_blocks`` calibration blocks, the
    high / mid / final horizons) or read back from ``doc["cost_model"]``."""
    if doc.get("cost_model"):
        return CostModel.from_dict(doc["cost_model"])
    steps = cfg.resolved("high_steps")
    cm = measure_cost_model(su.evaluator, su.space, su.evaluator.data.train[:cfg.resolved("importance_blocks")], steps,
                            final_steps=cfg.resolved("final_steps"), t1=cfg.resolved("mid_steps") or max(1, steps // 3))
    doc["cost_model"] = json.loads(json.dumps(cm.to_dict(), default=lambda o: o.tolist()))  # numpy scalars
    return cm


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    run = Cache(RESULTS / "search_vs_seed.cache.json").get("search:B4:1")
    db = BENCHMARKS / "runs" / "search_vs_seed" / "B4-s1.db"
    if not db.exists():
        raise SystemExit(f"{db} is missing: run `python benchmarks/search_vs_seed.py --seeds 0 1 --budgets B4` first")
    model, tok = load()
    cfg0 = OptimizeConfig(budget=run["budget_bytes"], preset="demo", seed=1)
    su0 = prepare(model, cfg0, tokenizer=tok)
    with TrialStore(db) as store:
        best_random = max(store.trials(phase="local-random"), key=lambda t: t.score).assignment
    out = ROOT / "results" / "rank_slack.json"
    doc = json.loads(out.read_text()) if out.exists() else {"scores": {}}
    cm = cost_model(su0, cfg0, doc)
    seed = Assignment.from_dict(run["seed"])
    ranks = list(seed.ranks)
    gain = cm.rank_gain[:, cm.ranks.index(4)]
    for u in sorted((u for u, r in enumerate(ranks) if r == 0), key=lambda u: -gain[u]):
        trial = su0.space.make(list(seed.bits), ranks[:u] + [4] + ranks[u + 1:])
        if su0.memory.predict(trial).model_bytes <= su0.budget_bytes:
            ranks[u] = 4
    points = {"seed": seed, "seed+fill": su0.space.make(list(seed.bits), ranks),
              "best_random": best_random,
              "chosen": Assignment.from_dict(run["chosen"])}
    doc.update(cpu=cpu_name(), precision=su0.precision, budget_bytes=su0.budget_bytes,
               points={k: {"assignment": a.to_dict(), "model_bytes": su0.memory.predict(a).model_bytes}
                       for k, a in points.items()})
    high = Fidelity(cfg0.resolved("high_steps"), "high")
    for s in (1, 0, 2, 3, 4):
        su = prepare(model, attrs.evolve(cfg0, seed=s), tokenizer=tok)
        for name, a in points.items():
            key = f"{name}:{s}"
            if key not in doc["scores"]:
                r = su.evaluator.evaluate(a, high)
                doc["scores"][key] = r.score
                log.info("%s seed %d: %.4f (%.0f s)", name, s, r.score, r.seconds)
                out.write_text(json.dumps(doc, indent=1))
    seeds = sorted({int(k.split(":")[1]) for k in doc["scores"]})
    lines = ["# Spending the seed's unused bytes on adapters (run B4 / search seed 1, paired re-test)", "",
             f"CPU {doc['cpu']}, {doc['precision']}, {high.steps} steps (demo high fidelity), evaluator seeds {seeds}; "
             f"budget {doc['budget_bytes']:,} bytes.", "",
             "| point | model bytes | mean score | minus the seed: mean ± sd | beats the seed on |", "|---|---|---|---|---|"]
    for name, p in doc["points"].items():
        sc = [doc["scores"][f"{name}:{s}"] for s in seeds if f"{name}:{s}" in doc["scores"]]
        d = [doc["scores"][f"{name}:{s}"] - doc["scores"][f"seed:{s}"] for s in seeds if f"{name}:{s}" in doc["scores"]]
        lines.append(f"| {name} | {p['model_bytes']:,} | {statistics.mean(sc):.4f} | "
                     + (f"{statistics.mean(d):+.4f} ± {statistics.stdev(d):.4f} | {sum(x > 0 for x in d)}/{len(d)} |"
                        if name != "seed" and len(d) > 1 else "– | – |"))
    (ROOT / "results" / "rank_slack.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
