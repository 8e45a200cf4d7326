"""How noisy is the high-fidelity score, and does averaging the LoRA weights over the last steps reduce it?

For a few assignments (the B4 warm start and chosen point of search_vs_seed's run B4/seed 0, uniform 4-bit r8)
and evaluator seeds 0-4 (LoRA init and data order), one demo-preset high-fidelity training each (constant rate,
the search's recipe). Every training is scored several ways on the same held-out blocks:

* live: the LoRA weights after the last step (today's score);
* tail-K: the LoRA weights averaged uniformly over the last K steps (Polyak tail averaging);
* ema-B: an exponential moving average of the LoRA weights with decay B.

Reported per scoring: the sd over evaluator seeds of each assignment (the issue's noise_high) and, for each
assignment, the mean and sd over seeds of its paired difference to the warm start (what a search compares).
With ``--bounds`` also the space's maximum (every unit at 8 bits and rank 16, far over budget) and uniform 3-bit:
how much better than the warm start *any* point can be at this fidelity.

A one-off study on the points of ``benchmarks/search_vs_seed.py``'s run B4/seed 0 (read from its
``benchmarks/results/search_vs_seed.cache.json``).

Run: .venv/bin/python benchmarks/studies/score_noise.py [--bounds] → benchmarks/studies/results/score_noise.json / .md
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared _common
from _common import RESULTS, Cache, load

from autoqra.config import OptimizeConfig
from autoqra.precision import cpu_name
from autoqra.preparation import prepare
from autoqra.space import Assignment

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("score_noise")


class Averages:
    """Running tail averages and EMAs of a model's trainable parameters during one training."""

    def __init__(self, model, steps: int, tails: list[int], emas: list[float]) -> None:
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.steps, self.tails, self.emas = steps, tails, emas
        self.sums = {k: {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()} for k in tails}
        self.ema = {b: {n: p.detach().float().clone() for n, p in self.params.items()} for b in emas}

    @torch.no_grad()
    def __call__(self, step: int, loss: float) -> None:
        for k in self.tails:
            if step >= self.steps - k:
                for n, p in self.params.items():
                    self.sums[k][n] += p.float()
        for b in self.emas:
            for n, p in self.params.items():
                self.ema[b][n].mul_(b).add_(p.float(), alpha=1 - b)

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {f"tail-{k}": {n: s / k for n, s in self.sums[k].items()} for k in self.tails}
        out.update({f"ema-{b}": dict(self.ema[b]) for b in self.emas})
        return out


@torch.no_grad()
def score_with(ev, model, params: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> float:
    live = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        p.copy_(weights[n].to(p.dtype))
    s = ev.score(model)[0]
    for n, p in params.items():
        p.copy_(live[n])
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--tails", type=int, nargs="+", default=[5, 10, 15])
    ap.add_argument("--emas", type=float, nargs="+", default=[0.8, 0.9])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bounds", action="store_true",
                    help="also score the space's maximum (most bits, most rank) and uniform 3-bit r8")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    run = Cache(RESULTS / "search_vs_seed.cache.json").get("search:B4:0")
    model, tok = load()
    su0 = prepare(model, OptimizeConfig(budget=run["budget_bytes"], preset="demo"), tokenizer=tok)
    assignments = {"seed": Assignment.from_dict(run["seed"]), "chosen": Assignment.from_dict(run["chosen"]),
                   "uniform4_r8": su0.space.uniform(4, 8)}
    if args.bounds:  # the space's top corner (every unit at the most bits and rank: far over any budget)
        assignments.update(maximum=su0.space.maximum(), uniform3_r8=su0.space.uniform(3, 8))
    out_path = Path(args.out) / "score_noise.json"
    doc = json.loads(out_path.read_text()) if out_path.exists() else {"scores": {}}
    for s in args.seeds:
        cfg = OptimizeConfig(budget=run["budget_bytes"], preset="demo", seed=s)
        su = prepare(model, cfg, tokenizer=tok)
        ev, steps = su.evaluator, cfg.resolved("high_steps")
        for name, a in assignments.items():
            key = f"{name}:{s}"
            if key in doc["scores"]:
                continue
            t0 = time.perf_counter()
            pm = ev.build(a)
            avg = Averages(pm, steps, args.tails, args.emas)
            ev.fit(pm, steps, on_step=avg)
            row = {"live": ev.score(pm)[0]}
            for label, w in avg.weights().items():
                row[label] = score_with(ev, pm, avg.params, w)
            row["seconds"] = time.perf_counter() - t0
            doc["scores"][key] = row
            log.info("%s seed %d: %s", name, s, {k: round(v, 4) for k, v in row.items()})
            doc.update(cpu=cpu_name(), precision=su.precision, steps=steps, threads=args.threads)
            out_path.write_text(json.dumps(doc, indent=1))
    summarize(doc, list(assignments), args.seeds, Path(args.out) / "score_noise.md")
    return 0


def summarize(doc: dict, names: list[str], seeds: list[int], path: Path) -> None:
    methods = [m for m in next(iter(doc["scores"].values())) if m != "seconds"]
    sd = {m: {a: statistics.stdev([doc["scores"][f"{a}:{s}"][m] for s in seeds]) for a in names} for m in methods}
    pairs = [(a, names[0]) for a in names[1:]]  # every assignment against the warm start, paired by seed
    diff = {m: {f"{a}-{b}": [doc["scores"][f"{a}:{s}"][m] - doc["scores"][f"{b}:{s}"][m] for s in seeds]
                for a, b in pairs} for m in methods}
    doc["summary"] = {"sd": sd, "paired": {m: {p: {"mean": statistics.mean(v), "sd": statistics.stdev(v)}
                                               for p, v in d.items()} for m, d in diff.items()}}
    lines = ["# Seed noise of the high-fidelity score, live vs averaged LoRA weights", "",
             f"CPU {doc['cpu']}, precision {doc['precision']}, {doc['steps']} steps (demo high fidelity, constant "
             f"rate), evaluator seeds {seeds}. Scores are −held-out loss (nats).", "",
             "| scoring | " + " | ".join(f"sd {a}" for a in names) + " | "
             + " | ".join(f"{p}: mean ± sd" for p in diff[methods[0]]) + " |",
             "|---" * (1 + len(names) + len(pairs)) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{sd[m][a]:.4f}" for a in names) + " | " + " | ".join(
            f"{doc['summary']['paired'][m][p]['mean']:+.4f} ± {doc['summary']['paired'][m][p]['sd']:.4f}"
            for p in diff[m]) + " |")
    path.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
