"""Training precision per backend on this CPU: step time, loss, exact bytes, peak vs estimate.

SmolLM2 loaded in each precision's dtype, one backend at a time (none = 16-bit, hqq / bnb nf4 / gptq at
4 bits), LoRA r8 on every block, batch 4 × 128, the library's default recipe (``TrainSpec()``), 20
steps, torch threads 2:

* step_seconds: median seconds of steps 2-20 (step 1 also measures its peak);
* loss: held-out (validation) loss after the 20 steps, 32 blocks;
* model_bytes_predicted / _measured: the memory model vs the live tensors;
* peak_estimated: the memory model's train_bytes (model + LoRA grads + AdamW state + activation estimate);
  peak_measured: live model bytes + AdamW state + the storage peak of the first training step (which
  holds the LoRA gradients). activation_* give the activation term alone.

Run: .venv/bin/python benchmarks/precision.py → benchmarks/results/precision.json / .md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import autoqra
from autoqra.config import TrainSpec
from autoqra.evaluators.finetune import FinetuneEvaluator
from autoqra.memory import MemoryModel, measure_memory
from autoqra.precision import DTYPES, cpu_bf16_native, cpu_name, resolve_precision
from autoqra.quant_backends import backend_for_precision
from autoqra.space import SearchSpace

BITS = {"none": 16, "hqq": 4, "bnb": 4, "gptq": 4}
OUT = Path(__file__).resolve().parent / "results"


def row(model, tok, backend: str, precision: str, steps: int) -> dict:
    be = backend_for_precision(backend, precision)
    space = SearchSpace.from_model(model, bits=(BITS[backend],), ranks=(8,))
    train = TrainSpec()
    ev = FinetuneEvaluator(model, space, be, tokenizer=tok, train=train, eval_blocks=32, precision=precision,
                           track_peak=True)
    a = space.uniform(BITS[backend], 8)
    pm = ev.build(a)
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    stats = ev.fit(pm, steps, on_step=on_step)
    opt = stats.optimizer
    loss = -ev.score(pm)[0]
    measured = measure_memory(pm, opt)
    pred = MemoryModel(model, space, be, train=train, precision=precision).predict(a)
    step_peak = int(stats.peak_bytes)
    return {
        "backend": backend, "precision": precision, "bits": BITS[backend], "rank": 8,
        "step_seconds": statistics.median(times[1:]), "step_seconds_all": times, "loss": loss,
        "model_bytes_predicted": pred.model_bytes, "model_bytes_measured": measured.model_bytes,
        "peak_estimated": pred.train_bytes,
        "peak_measured": measured.model_bytes + measured.optimizer_bytes + step_peak,
        "activation_estimated": pred.activation_bytes, "activation_measured": step_peak - pred.lora_grad_bytes,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=list(BITS))
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for precision in args.precisions:
        model, tok = autoqra.models.load_default(dtype=DTYPES[precision])
        for b in args.backends:
            rows.append(row(model, tok, b, precision, args.steps))
            r = rows[-1]
            print(f"{b:5s} {precision}: {r['step_seconds']:.2f} s/step, loss {r['loss']:.4f}, bytes "
                  f"{r['model_bytes_predicted']} / {r['model_bytes_measured']}, peak {r['peak_estimated']} / "
                  f"{r['peak_measured']}", flush=True)
        del model
    doc = {"cpu": cpu_name(), "cpu_bf16_native": cpu_bf16_native(), "auto_picks": resolve_precision("auto", "cpu"),
           "threads": args.threads, "steps": args.steps, "torch": torch.__version__, "rows": rows,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    by = {(r["backend"], r["precision"]): r for r in rows}
    doc["summary"] = {b: {"bf16_over_fp32_step": by[(b, "bf16")]["step_seconds"] / by[(b, "fp32")]["step_seconds"],
                          "loss_rel_diff": by[(b, "bf16")]["loss"] / by[(b, "fp32")]["loss"] - 1}
                      for b in args.backends if (b, "bf16") in by and (b, "fp32") in by}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# Training precision on this CPU ({doc['cpu']}; native bf16: {doc['cpu_bf16_native']}; "
             f"`auto` picks {doc['auto_picks']})", "",
             f"SmolLM2 in each precision's dtype, r8 on every block, batch 4×128, {args.steps} steps, "
             f"{args.threads} threads, finished {doc['finished']}.", "",
             "| backend | precision | s/step (median) | held-out loss | model bytes pred / meas | train peak est / meas "
             "| activations est / meas |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['precision']} | {r['step_seconds']:.2f} | {r['loss']:.4f} | "
                     f"{r['model_bytes_predicted']:,} / {r['model_bytes_measured']:,} | {r['peak_estimated'] / 1e6:,.1f} "
                     f"/ {r['peak_measured'] / 1e6:,.1f} MB | {r['activation_estimated'] / 1e6:,.1f} / "
                     f"{r['activation_measured'] / 1e6:,.1f} MB |")
    lines += ["", "| backend | bf16 / fp32 step time | bf16 vs fp32 loss |", "|---|---|---|"]
    for b, v in doc["summary"].items():
        lines.append(f"| {b} | {v['bf16_over_fp32_step']:.2f} | {v['loss_rel_diff']:+.2%} |")
    (out / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
