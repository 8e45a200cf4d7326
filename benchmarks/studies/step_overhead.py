"""Per-step time of the finetune evaluator's loop vs a plain peft + torch loop (same model, batch, steps).

A one-off check (README: the evaluator's loop at 1.019× a plain loop). Run:
.venv/bin/python benchmarks/studies/step_overhead.py [--steps 6]  → benchmarks/studies/results/step_overhead.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import autoqra
from autoqra.evaluators import FinetuneEvaluator
from autoqra.evaluators.data import build_task_data, iter_steps

OUT = Path(__file__).parent / "results" / "step_overhead.json"


def plain_loop(pm, data, steps, batch):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-4)
    pm.train()
    times = []
    for ids in iter_steps(data.train, batch, steps, seed=0):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    model, tok = autoqra.models.load_default()
    train = autoqra.TrainSpec(batch_size=4, seq_len=128)
    data = build_task_data("pydoc", tok, block_size=128)
    space = autoqra.SearchSpace.from_model(model, bits=(4,), ranks=(8,))
    ev = FinetuneEvaluator(model, space, "hqq", data=data, tokenizer=tok, train=train, track_peak=False)
    a = space.uniform(4, 8)
    res = {}
    for _rep in range(2):  # alternate to cancel drift
        pm = ev.build(a)
        res.setdefault("plain", []).extend(plain_loop(pm, data, args.steps, train.batch_size)[1:])
        pm = ev.build(a)
        times = []
        last = [time.perf_counter()]

        def on_step(step, loss, times=times, last=last):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        last[0] = time.perf_counter()
        ev.fit(pm, args.steps, on_step=on_step)
        res.setdefault("autoqra", []).extend(times[1:])
    med = {k: statistics.median(v) for k, v in res.items()}
    out = {"median_step_s": med, "ratio": med["autoqra"] / med["plain"], "steps_each": len(res["plain"]),
           "setup": "SmolLM2, HQQ 4-bit, LoRA r8 on all 7 projections, batch 4 x 128, fp32 CPU, 2 threads"}
    OUT.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
