"""Does the search beat its own warm start? Paired runs on SmolLM2 + the embedded task, HQQ, B4 and Bmid.

For each budget and search seed: one `autoqra.optimize` at the demo preset (its own trial store), then

* seed_high / chosen_high: the warm-start seed's and the chosen point's high-fidelity scores (same run,
  same evaluator: common LoRA init and data order);
* local_random_high: the best of N random byte-neutral edits of the same seed (`autoqra.guidance.moves.random_edit`,
  no cost model), N = the search's Phase I+II high-fidelity evaluations other than the seed, evaluated
  by the same evaluator;
* old_seed_high: today's anchored warm start (priors fill, `guidance="priors"`) under the same protocol;
* *_test: test loss after a final training of `--final-steps` steps (the recipe's cosine schedule), final
  seeds 0 and 1;
* noise_high: sample sd of the high-fidelity score of one fixed assignment (the B4 seed of search seed 0)
  over evaluator seeds 0-4.

Run: .venv/bin/python benchmarks/search_vs_seed.py [--seeds 0 1 2 3 4] [--budgets B4 Bmid]
→ benchmarks/results/search_vs_seed.json / .md, rewritten after each finished run. Resumable across sessions:
finished searches, random edits, final trainings and the noise measurement are kept in
benchmarks/results/search_vs_seed.cache.json (committed) and read back, never re-run; each search records the
CPU and precision it ran on.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import Cache

import autoqra
from autoqra.config import OptimizeConfig
from autoqra.evaluators.base import Fidelity
from autoqra.final import evaluator_for, run_final
from autoqra.guidance.importance import compute_importance
from autoqra.guidance.moves import random_edit
from autoqra.guidance.repair import make_repair
from autoqra.precision import cpu_bf16_native, cpu_name
from autoqra.preparation import prepare
from autoqra.searchers.nsga2_seeds import anchored_seeds
from autoqra.space import Assignment
from autoqra.stages.runner import TrialRunner
from autoqra.store import TrialStore

log = logging.getLogger("search_vs_seed")
ROOT = Path(__file__).resolve().parent


def budgets(model, tok) -> dict[str, int]:
    """B4 = uniform 4-bit HQQ r8 model bytes; Bmid = half-way between uniform 3-bit and 4-bit r8."""
    su = prepare(model, OptimizeConfig(preset="demo"), tokenizer=tok)
    b4 = su.memory.predict(su.space.uniform(4, 8)).model_bytes
    b3 = su.memory.predict(su.space.uniform(3, 8)).model_bytes
    return {"B4": int(b4), "Bmid": int((b3 + b4) // 2)}


def high_eval(store: TrialStore, su, a: Assignment, fidelity: Fidelity, phase: str, fp: str) -> float:
    """High-fidelity score of ``a`` with the run's evaluator, read back from / written to its store."""
    runner = TrialRunner(store, su.evaluator, su.memory.predict, lambda x: su.memory.predict(x).model_bytes,
                         su.budget_bytes, backend_spec=su.backend.spec(), fingerprint=fp, seed=su.evaluator.seed)
    return float(runner.trial(a, fidelity, phase)[0].score)


def run_search(model, tok, name: str, budget: int, seed: int, work: Path, cache: Cache) -> dict:
    key = f"search:{name}:{seed}"
    done = cache.get(key)
    if done is not None:
        return done
    cfg = OptimizeConfig(budget=budget, preset="demo", seed=seed)
    t0 = time.perf_counter()
    res = autoqra.optimize(model, tokenizer=tok, config=cfg, store=work / f"{name}-s{seed}.db", progress=False)
    wall = time.perf_counter() - t0
    by_key = {t.key: t for t in res.history}
    seed_t = by_key[res.info["seed_key"]]
    high = [t for t in res.history if t.fidelity.name == "high" and t.phase in ("phase1", "phase2")]
    out = {"budget": name, "budget_bytes": budget, "search_seed": seed, "evaluations": len(res.history),
           "evaluations_by_fidelity": {f: sum(t.fidelity.name == f for t in res.history) for f in ("low", "mid", "high")},
           "n_high_search": len([t for t in high if t.key != seed_t.key]), "wall_seconds": wall,
           "seed": seed_t.assignment.to_dict(), "seed_high": seed_t.score,
           "chosen": res.best.assignment.to_dict(), "chosen_high": res.best.score,
           "chosen_is_seed": res.best.key == seed_t.key, "chosen_phase": res.best.phase,
           "stop_reasons": res.info["stop_reasons"],
           "cost_model": {k: res.info["cost_model"].get(k) for k in ("spearman_high", "n_high", "spearman_screen",
                                                                      "seconds")},
           "fingerprint": res.info["model_fingerprint"], "cpu": cpu_name(), "precision": res.info.get("precision")}
    cache.put(key, out)
    return out


def local_random(model, tok, run: dict, work: Path, cache: Cache) -> float:
    key = f"random:{run['budget']}:{run['search_seed']}"
    if cache.get(key) is not None:
        return cache.get(key)
    cfg = OptimizeConfig(budget=run["budget_bytes"], preset="demo", seed=run["search_seed"])
    su = prepare(model, cfg, tokenizer=tok)
    store = TrialStore(work / f"{run['budget']}-s{run['search_seed']}.db")
    high = Fidelity(cfg.resolved("high_steps"), "high")
    rep = make_repair(su.memory, su.budget_bytes)
    rng = np.random.default_rng(1000 + run["search_seed"])
    x0 = su.space.encode(Assignment.from_dict(run["seed"]))
    seen, best = {tuple(x0.tolist())}, -np.inf
    tries = 0
    while len(seen) - 1 < run["n_high_search"] and tries < 200:
        tries += 1
        y = random_edit(x0, np.asarray(su.space.upper), rep.bytes_encoded, su.budget_bytes, rng)
        if tuple(y.tolist()) in seen:
            continue
        seen.add(tuple(y.tolist()))
        best = max(best, high_eval(store, su, su.space.decode(y), high, "local-random", run["fingerprint"]))
    store.close()
    cache.put(key, best)
    return best


def old_seed(model, tok, run: dict, work: Path, cache: Cache) -> tuple[dict, float]:
    """Today's anchored warm start (I_q/I_r priors fill) and its high-fidelity score in the run's evaluator."""
    key = f"oldseed:{run['budget']}:{run['search_seed']}"
    if cache.get(key) is not None:
        return tuple(cache.get(key))
    cfg = OptimizeConfig(budget=run["budget_bytes"], preset="demo", seed=run["search_seed"])
    su = prepare(model, cfg, tokenizer=tok)
    data = su.evaluator.data
    imp = compute_importance(model, su.space, su.backend, data.train[: cfg.resolved("importance_blocks")],
                             seed=cfg.seed, precision=su.precision)
    bytes_of = make_repair(su.memory, su.budget_bytes).bytes_encoded
    a = su.space.decode(anchored_seeds(su.space, imp.q, imp.r, bytes_of, su.budget_bytes)[0])
    store = TrialStore(work / f"{run['budget']}-s{run['search_seed']}.db")
    s = high_eval(store, su, a, Fidelity(cfg.resolved("high_steps"), "high"), "old-seed", run["fingerprint"])
    store.close()
    cache.put(key, [a.to_dict(), s])
    return a.to_dict(), s


def final_key(assignment: dict, final_seed: int, steps: int) -> str:
    """Cache key of one final training (assignment, final-training seed, steps)."""
    return f"final:{json.dumps(assignment, sort_keys=True)}:{final_seed}:{steps}"


def final_tests(model, tok, run: dict, assignment: dict, steps: int, seeds: list[int], cache: Cache) -> list[float]:
    out = []
    for fs in seeds:
        key = final_key(assignment, fs, steps)
        if cache.get(key) is None:
            cfg = OptimizeConfig(budget=run["budget_bytes"], preset="demo", seed=run["search_seed"])
            su = prepare(model, cfg, tokenizer=tok)
            res = autoqra.Result(best=None, pareto=[], baselines={}, history=[], budget_bytes=run["budget_bytes"],
                                 target="model", space=su.space, config=cfg.to_dict(),
                                 info={"backend_spec": su.backend.spec(), "precision": su.precision})
            ev = evaluator_for(res, model, tok, seed=fs)

            class _T:
                pass

            t = _T()
            t.assignment = Assignment.from_dict(assignment)
            fm = run_final(ev, t, steps, None, 25, False, {})
            cache.put(key, fm.metrics["test_loss"])
        out.append(cache.get(key))
    return out


def noise(model, tok, runs: list[dict], work: Path, cache: Cache, seeds=(0, 1, 2, 3, 4)) -> dict:
    ref = next(r for r in runs if r["budget"] == "B4" and r["search_seed"] == 0)
    key = "noise"
    if cache.get(key) is None:
        a = Assignment.from_dict(ref["seed"])
        scores = []
        for s in seeds:
            cfg = OptimizeConfig(budget=ref["budget_bytes"], preset="demo", seed=s)
            su = prepare(model, cfg, tokenizer=tok)
            store = TrialStore(work / f"noise-s{s}.db")
            scores.append(high_eval(store, su, a, Fidelity(cfg.resolved("high_steps"), "high"), "noise",
                                    ref["fingerprint"]))
            store.close()
        cache.put(key, {"assignment": ref["seed"], "evaluator_seeds": list(seeds), "scores": scores,
                        "sd": statistics.stdev(scores)})
    return cache.get(key)


def verdict(runs: list[dict], noise_high: float) -> dict:
    out = {}
    for b in sorted({r["budget"] for r in runs}):
        rs = [r for r in runs if r["budget"] == b]
        win = [not r["chosen_is_seed"] and r["chosen_high"] - r["seed_high"] > noise_high
               and r["chosen_high"] > r["local_random_high"] for r in rs]
        out[b] = {"runs": len(rs), "wins": int(sum(win)), "fraction": sum(win) / len(rs),
                  "not_seed": sum(not r["chosen_is_seed"] for r in rs),
                  "beats_seed_by_noise": sum(r["chosen_high"] - r["seed_high"] > noise_high for r in rs),
                  "beats_local_random": sum(r["chosen_high"] > r["local_random_high"] for r in rs),
                  "mean_chosen_test": float(np.mean([np.mean(r["chosen_test"]) for r in rs])),
                  "mean_seed_test": float(np.mean([np.mean(r["seed_test"]) for r in rs])),
                  "mean_old_seed_test": float(np.mean([np.mean(r["old_seed_test"]) for r in rs])),
                  "mean_seed_high": float(np.mean([r["seed_high"] for r in rs])),
                  "mean_old_seed_high": float(np.mean([r["old_seed_high"] for r in rs])),
                  "max_wall_seconds": max(r["wall_seconds"] for r in rs)}
    return out


def write_md(doc: dict, path: Path) -> None:
    n = doc["noise_high"]
    lines = [
        "# Search vs its own warm start (SmolLM2, embedded task, HQQ)", "",
        f"* this write's CPU: {doc['cpu']}; precision {doc['precision']} (each run's own in the table); torch threads {doc['threads']}; preset demo; "
        f"final training {doc['final_steps']} steps, seeds {doc['final_seeds']}; finished {doc['finished']}",
        f"* runs finished: {len(doc['runs'])} of {len(doc['planned']['seeds']) * len(doc['planned']['budgets'])} "
        f"planned (search seeds {doc['planned']['seeds']} × budgets {doc['planned']['budgets']}); the verdict below "
        "covers the finished runs only",
        f"* noise_high (sd of the high-fidelity score of one assignment over evaluator seeds "
        f"{doc['noise']['evaluator_seeds']}): **{n:.4f}** nats",
        "* a run *wins* when the chosen point is not the seed, beats it at high fidelity by more than noise_high "
        "and beats the best random byte-neutral edit of the seed (same number of high-fidelity evaluations)", "",
        "| budget | seed | evals | wall s | seed high | chosen high | Δ | local random | old seed high | "
        "seed test | chosen test | old seed test | win | CPU, precision |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        win = (not r["chosen_is_seed"] and r["chosen_high"] - r["seed_high"] > n
               and r["chosen_high"] > r["local_random_high"])
        lines.append(
            f"| {r['budget']} | {r['search_seed']} | {r['evaluations']} | {r['wall_seconds']:.0f} | "
            f"{r['seed_high']:.4f} | {r['chosen_high']:.4f} | {r['chosen_high'] - r['seed_high']:+.4f} | "
            f"{r['local_random_high']:.4f} | {r['old_seed_high']:.4f} | {np.mean(r['seed_test']):.4f} | "
            f"{np.mean(r['chosen_test']):.4f} | {np.mean(r['old_seed_test']):.4f} | {'yes' if win else 'no'} | "
            f"{r.get('cpu', '?')}, {r.get('precision', '?')} |")
    if "score_noise" in doc:  # written by benchmarks/score_noise.py
        sn = doc["score_noise"]
        lines += ["", f"## Noise and room at B4 (benchmarks/score_noise.py, {sn['cpu']}, {sn['precision']}; "
                  "run B4/seed 0's points, evaluator seeds 0-4)", "",
                  "| point | sd over evaluator seeds | minus the seed, paired by evaluator seed (mean ± sd) |",
                  "|---|---|---|"]
        lines.append(f"| seed | {sn['sd']['seed']:.4f} | – |")
        for k, v in sn["vs_seed"].items():
            name = k.rsplit("-seed", 1)[0]
            lines.append(f"| {name} | {sn['sd'][name]:.4f} | {v['mean']:+.4f} ± {v['sd']:.4f} |")
    lines += ["", "## Per budget", ""]
    for b, v in doc["verdict"].items():
        lines.append(
            f"* **{b}**: {v['wins']}/{v['runs']} runs win ({v['fraction']:.0%}; target ≥ 60 %); chosen ≠ seed in "
            f"{v['not_seed']}, beats the seed by > noise in {v['beats_seed_by_noise']}, beats local random in "
            f"{v['beats_local_random']}; mean test loss chosen {v['mean_chosen_test']:.4f} vs seed "
            f"{v['mean_seed_test']:.4f} vs today's anchored seed {v['mean_old_seed_test']:.4f}; mean high-fidelity "
            f"score new seed {v['mean_seed_high']:.4f} vs today's {v['mean_old_seed_high']:.4f}; slowest search "
            f"{v['max_wall_seconds'] / 60:.1f} min")
    path.write_text("\n".join(lines) + "\n")


def _complete(cache: Cache, name: str, seed: int, args: argparse.Namespace) -> bool:
    """Whether run (``name``, ``seed``) is fully in the cache: search, controls and every final training."""
    run = cache.get(f"search:{name}:{seed}")
    old = cache.get(f"oldseed:{name}:{seed}")
    if run is None or old is None or cache.get(f"random:{name}:{seed}") is None:
        return False
    return all(cache.get(final_key(a, fs, args.final_steps)) is not None
               for a in (run["seed"], run["chosen"], old[0]) for fs in args.final_seeds)


def write_outputs(runs: list[dict], nz: dict, bud: dict, args: argparse.Namespace, out: Path) -> dict:
    """JSON + Markdown of the runs finished so far (written after each run, so a stopped benchmark still
    reports what it measured)."""
    doc = {"runs": runs, "noise_high": nz["sd"], "noise": nz, "budgets": bud, "cpu": cpu_name(),
           "cpu_bf16_native": cpu_bf16_native(), "precision": "bf16" if cpu_bf16_native() else "fp32",
           "threads": args.threads, "final_steps": args.final_steps, "final_seeds": args.final_seeds,
           "planned": {"budgets": args.budgets, "seeds": args.seeds},
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    doc["verdict"] = verdict(runs, doc["noise_high"]) if runs else {}
    sn = out.parent / "studies" / "results" / "score_noise.json"  # studies/score_noise.py: paired noise, room above the seed
    if sn.exists() and "summary" in (snd := json.loads(sn.read_text())):
        doc["score_noise"] = {"cpu": snd["cpu"], "precision": snd["precision"],
                              "sd": snd["summary"]["sd"]["live"], "vs_seed": snd["summary"]["paired"]["live"]}
    (out / "search_vs_seed.json").write_text(json.dumps(doc, indent=1, default=float))
    write_md(doc, out / "search_vs_seed.md")
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--budgets", nargs="+", default=["B4", "Bmid"], choices=["B4", "Bmid"])
    ap.add_argument("--final-steps", type=int, default=60)
    ap.add_argument("--final-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "runs" / "search_vs_seed"), help="trial stores (not committed)")
    ap.add_argument("--cache", default=str(ROOT / "results" / "search_vs_seed.cache.json"),
                    help="finished measurements (committed, small JSON): a later session resumes from it")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--report-only", action="store_true",
                    help="write the outputs from the cache's complete runs; run nothing new")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(Path(args.cache))
    model, tok = autoqra.models.load_default(dtype="bf16" if cpu_bf16_native() else "fp32")
    bud = budgets(model, tok)
    runs: list[dict] = []
    nz: dict = {"sd": float("nan"), "evaluator_seeds": []}
    # B4 before Bmid, seed by seed; each run complete (search, controls, final trainings) before the next,
    # nothing else on the machine while a search runs (its wall time is measured)
    for s in args.seeds:
        for name in args.budgets:
            if args.report_only and not _complete(cache, name, s, args):
                continue
            log.info("search %s seed %d", name, s)
            r = run_search(model, tok, name, bud[name], s, work, cache)
            log.info("controls and final trainings for %s seed %d", name, s)
            r["local_random_high"] = local_random(model, tok, r, work, cache)
            r["old_seed"], r["old_seed_high"] = old_seed(model, tok, r, work, cache)
            for what in ("seed", "chosen", "old_seed"):
                r[f"{what}_test"] = final_tests(model, tok, r, r[what], args.final_steps, args.final_seeds, cache)
            runs.append(r)
            if any(x["budget"] == "B4" and x["search_seed"] == 0 for x in runs):
                nz = noise(model, tok, runs, work, cache)
            write_outputs(runs, nz, bud, args, out)
    print((out / "search_vs_seed.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
