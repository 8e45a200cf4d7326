"""Wall time of one batch of fine-tune trials: in-process vs 1 Ray worker vs 2 Ray workers.

Same model, evaluator, trials and fidelity in every mode; each mode starts with a cold quantized-layer
cache. Start-up (Ray, worker processes) is timed separately from the batch. The machine's load
average is recorded too: on a shared 2-core machine, 2 workers can only help as much as 2 cores
are free.

Run: .venv/bin/python benchmarks/ray_speedup.py [--model default|tiny] [--trials 4] [--steps 4] [--modes ...]
     → benchmarks/results/ray_speedup.json (one entry per --model)
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import autoqra
from autoqra.apply import quant_cache
from autoqra.evaluators import FinetuneEvaluator
from autoqra.evaluators.base import Fidelity
from autoqra.evaluators.data import build_task_data
from autoqra.executors import LocalExecutor
from autoqra.executors.ray import RayExecutor

OUT = Path(__file__).parent / "results" / "ray_speedup.json"
#: mode -> (workers, torch threads per worker); "local" runs in this process (None = torch's default threads)
MODES = {"local": (1, None), "local-1-thread": (1, 1), "ray-1-worker-1-thread": (1, 1),
         "ray-1-worker-2-threads": (1, 2), "ray-2-workers-1-thread": (2, 1)}


def run_batch(ex, items):
    t0 = time.perf_counter()
    done = sorted(ex.submit_batch(items), key=lambda d: d.index)
    wall = time.perf_counter() - t0
    return {"batch_seconds": wall, "trial_seconds": [d.result.seconds for d in done],
            "scores": [d.result.score for d in done], "status": [d.result.status for d in done],
            "pids": sorted({d.worker.get("pid") for d in done})}


def score_agreement(modes: dict) -> dict:
    """Scores are bit-identical across executors for the same torch thread count (float reductions
    depend on the thread count, not on the process)."""
    by_threads: dict[int, list] = {}
    for v in modes.values():
        by_threads.setdefault(v["threads_per_worker"], []).append(v["scores"])
    ref = next(iter(modes.values()))["scores"]
    return {"same_scores_all_modes": all(v["scores"] == ref for v in modes.values()),
            "same_scores_per_thread_count": all(all(x == g[0] for x in g) for g in by_threads.values()),
            "max_abs_score_diff": max(abs(a - b) for v in modes.values() for a, b in zip(v["scores"], ref))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default", choices=["default", "tiny"])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = ap.parse_args()
    if args.model == "tiny":
        model, tok = autoqra.models.tiny_llama(seed=0), None
        train = autoqra.TrainSpec(batch_size=2, seq_len=32)
    else:
        model, tok = autoqra.models.load_default()
        train = autoqra.TrainSpec(batch_size=4, seq_len=128)
    space = autoqra.SearchSpace.from_model(model, bits=(2, 3, 4, 8, 16), ranks=(4, 8))
    data = build_task_data("pydoc", tok or autoqra.evaluators.data.ByteTokenizer(model.config.vocab_size),
                           block_size=train.seq_len)
    ev = FinetuneEvaluator(model, space, "hqq", data=data, tokenizer=tok, train=train, eval_blocks=8,
                           track_peak=False)
    grid = [space.uniform(b, r) for r in (8, 4) for b in (4, 2, 3, 8)]
    items = [(a, Fidelity(args.steps, "bench")) for a in grid[: args.trials]]
    out = {"model": args.model, "trials": len(items), "steps": args.steps, "batch_size": train.batch_size,
           "seq_len": train.seq_len, "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "torch_threads_local": torch.get_num_threads(), "loadavg_start": os.getloadavg(), "modes": {}}

    warm = [(space.uniform(16, r), Fidelity(1, "warm-up")) for r in (4, 8)]  # not in the batch
    m = out["modes"]
    default_threads = torch.get_num_threads()
    for name in [n for n in MODES if n in args.modes and n.startswith("local")]:
        torch.set_num_threads(MODES[name][1] or default_threads)
        run_batch(LocalExecutor(ev), warm[:1])
        quant_cache(model).clear()
        m[name] = {**run_batch(LocalExecutor(ev), items), "workers": 1, "threads_per_worker": torch.get_num_threads()}
        torch.set_num_threads(default_threads)
        print(name, m[name]["batch_seconds"], flush=True)
    ray_modes = [n for n in MODES if n in args.modes and n.startswith("ray")]
    if ray_modes:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        out["ray_init_seconds"] = time.perf_counter() - t0
    for name in ray_modes:
        workers, cpus = MODES[name]
        t0 = time.perf_counter()
        ex = RayExecutor(ev, workers=workers, resources={"num_cpus": cpus})  # torch threads = num_cpus
        ex.workers_info()
        startup = time.perf_counter() - t0
        run_batch(ex, warm[:workers])  # one untimed trial per worker (imports, first-call costs)
        m[name] = {**run_batch(ex, items), "workers_startup_seconds": startup, "workers": workers,
                   "threads_per_worker": cpus}
        ex.close()
        print(name, m[name]["batch_seconds"], flush=True)
    if ray_modes:
        ray.shutdown()
    two = m.get("ray-2-workers-1-thread", {}).get("batch_seconds")
    for name in m:
        if two and name != "ray-2-workers-1-thread":
            out[f"speedup_2_workers_vs_{name}"] = m[name]["batch_seconds"] / two
    out.update(score_agreement(m))
    out["loadavg_end"] = os.getloadavg()
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    old[args.model] = out
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(old, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "modes"}, indent=2))


if __name__ == "__main__":
    main()
