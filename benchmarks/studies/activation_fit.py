"""Measured activation peaks of one LoRA step under bf16/fp16 autocast vs the estimate (``autoqra.memory.activations``).

Every run: build a tiny Llama (or SmolLM2-135M) with its frozen weights in the compute dtype, quantize
and wrap it with ``apply_assignment`` (backend in the same compute dtype), run one
``pm(input_ids=ids, labels=ids).loss.backward()`` under ``torch.autocast("cpu", dtype)`` inside
:func:`autoqra.memory.trace.measure_peak`, and compare ``peak - lora_grad_bytes`` with
``MemoryModel(..., precision=p).predict(a).activation_bytes``.

Runs (per precision): five tiny shapes × batch 1×64 and 2×128 × backends none / HQQ 4 / bnb 4 and 8 /
GPTQ 4, uniform assignments at ranks 8/16 with dropout 0 and 0.05 plus two mixed assignments
(alternating quantized/16-bit units and rank/0), HQQ and GPTQ at 2/3/8 bits; then SmolLM2, batch
4×128, r8, none and HQQ 4-bit (dropout 0.05 and 0), the out-of-sample check.

Usage::

    python benchmarks/studies/activation_fit.py                # all runs, bf16 and fp16 (~40 min on 2 busy cores)
    python benchmarks/studies/activation_fit.py --quick        # a subset (~1-2 min), SmolLM2 skipped
    python benchmarks/studies/activation_fit.py --precisions bf16 --smollm2 no   # bf16 tiny runs only (~12 min)
    python benchmarks/studies/activation_fit.py --fit          # also refit the per-block coefficients

A one-off study: it fitted the shipped per-block coefficients (``COEF16`` in :mod:`autoqra.memory.activations`);
rerun it to refit them.

Writes ``benchmarks/studies/results/activation_fit.json`` (``activation_fit_quick.json`` with ``--quick``;
``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from autoqra import MemoryModel, SearchSpace, TrainSpec, apply_assignment
from autoqra.memory.activations import COEF16
from autoqra.memory.trace import measure_peak
from autoqra.models import load_default, tiny_llama
from autoqra.quant_backends import get_backend
from autoqra.space import Assignment

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LADDERS = {"none": (16,), "hqq": (2, 3, 4, 8, 16), "bnb": (4, 8, 16), "gptq": (2, 3, 4, 8, 16)}
#: (hidden, intermediate, blocks, vocab)
SHAPES = [(128, 256, 2, 512), (256, 512, 2, 1024), (128, 384, 4, 512), (256, 768, 3, 2048), (384, 1024, 2, 1024)]
BATCHES = [(1, 64), (2, 128)]
BACKENDS = [("none", 16), ("hqq", 4), ("bnb", 4), ("bnb", 8), ("gptq", 4)]
SMOL_BACKENDS = [("none", 16), ("hqq", 4)]
SMOL_EXTRA = [("bnb", 4), ("bnb", 8), ("gptq", 4)]


def make_backend(name: str, precision: str):
    """The backend computing in the precision's dtype (each backend's own constructor option)."""
    dt = DTYPES[precision]
    if name in ("hqq", "bnb"):
        return get_backend(name, compute_dtype=dt)
    if name == "gptq":
        return get_backend(name, dtype=str(dt).removeprefix("torch."))
    return get_backend(name)


def tiny_runs(quick: bool) -> list[dict]:
    """Run specs on the tiny shapes: ``bits``/``ranks`` per unit are filled in per model."""
    runs = []
    shapes = SHAPES[:2] if quick else SHAPES
    for shape in shapes:
        for backend, bits in BACKENDS:
            for batch, seq in BATCHES[1:] if quick else BATCHES:
                for rank in (8,) if quick else (8, 16):
                    for dropout in (0.05,) if quick else (0.0, 0.05):
                        runs.append(dict(shape=shape, backend=backend, bits=bits, rank=rank, dropout=dropout,
                                         batch=batch, seq=seq, kind="uniform"))  # fmt: skip
                if not quick:
                    runs.append(dict(shape=shape, backend=backend, bits=bits, rank=8, dropout=0.05,
                                     batch=batch, seq=seq, kind="mixed"))  # fmt: skip
                    runs.append(dict(shape=shape, backend=backend, bits=bits, rank=16, dropout=0.0,
                                     batch=batch, seq=seq, kind="mixed_inv"))  # fmt: skip
            if backend in ("hqq", "gptq") and not quick:
                for other in (2, 3, 8):
                    runs.append(dict(shape=shape, backend=backend, bits=other, rank=8, dropout=0.05,
                                     batch=2, seq=128, kind="uniform"))  # fmt: skip
    return runs


def assignment_for(space: SearchSpace, run: dict) -> Assignment:
    n, b, r = space.n_units, run["bits"], run["rank"]
    if run["kind"] == "mixed":  # even units quantized with LoRA, odd units 16-bit without
        bits, ranks = [b if u % 2 == 0 else 16 for u in range(n)], [r if u % 2 == 0 else 0 for u in range(n)]
    elif run["kind"] == "mixed_inv":  # even units 16-bit at rank r, odd units quantized at rank 4
        bits, ranks = [16 if u % 2 == 0 else b for u in range(n)], [r if u % 2 == 0 else 4 for u in range(n)]
    else:
        bits, ranks = [b] * n, [r] * n
    return Assignment(tuple(u.name for u in space.units), bits, ranks)


def measure(model, run: dict, precision: str) -> dict:
    t0 = time.perf_counter()
    be = make_backend(run["backend"], precision)
    vocab = model.config.vocab_size
    space = SearchSpace.from_model(model, bits=LADDERS[run["backend"]], ranks=(0, 4, 8, 16))
    a = assignment_for(space, run)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (4, 32), generator=g) if be.needs_calibration else None
    pm = apply_assignment(model, a, be, space=space, dropout=run["dropout"], calib_ids=calib)
    pm.train()
    ids = torch.randint(0, vocab, (run["batch"], run["seq"]), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.autocast("cpu", dtype=DTYPES[precision]):
            pm(input_ids=ids, labels=ids).loss.backward()

    _, peak = measure_peak(step)
    train = TrainSpec(batch_size=run["batch"], seq_len=run["seq"], lora_dropout=run["dropout"])
    pred = MemoryModel(model, space, be, train=train, precision=precision).predict(a)
    measured = peak - pred.lora_grad_bytes
    est = pred.activation_bytes
    hidden, inter, blocks = (getattr(model.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    return {
        **{k: v for k, v in run.items() if k != "shape"},
        "shape": list(run["shape"]) if isinstance(run["shape"], tuple) else run["shape"],
        "precision": precision, "unit_bits": list(a.bits), "unit_ranks": list(a.ranks),
        "peak": peak, "lora_grad_bytes": pred.lora_grad_bytes, "measured": measured, "estimated": est,
        "rel_error": round(est / measured - 1, 5), "seconds": round(time.perf_counter() - t0, 2),
        "block_tokens": [run["batch"] * run["seq"] * blocks * hidden, run["batch"] * run["seq"] * blocks * inter],
    }  # fmt: skip


def refit_blocks(rows: list[dict], precision: str) -> dict:
    """Least squares (relative) of the two per-block coefficients, every other term as shipped."""
    c = COEF16[precision]
    x = np.array([r["block_tokens"] for r in rows], float)
    y = np.array([r["measured"] for r in rows], float)
    rest = np.array([r["estimated"] for r in rows], float) - x @ np.array([c.block_hidden, c.block_inter])
    w = 1 / y
    coef, *_ = np.linalg.lstsq(x * w[:, None], (y - rest) * w, rcond=None)
    err = (rest + x @ coef) / y - 1
    return {"block_hidden": round(float(coef[0]), 3), "block_inter": round(float(coef[1]), 3),
            "rel_error_min": round(float(err.min()), 4), "rel_error_max": round(float(err.max()), 4)}  # fmt: skip


def summary(rows: list[dict]) -> dict:
    out = {}
    for p in sorted({r["precision"] for r in rows}):
        for group, sel in (("tiny", lambda r: r["shape"] != "smollm2"), ("smollm2", lambda r: r["shape"] == "smollm2")):
            e = [r["rel_error"] for r in rows if r["precision"] == p and sel(r)]
            if e:
                out[f"{p}/{group}"] = {"runs": len(e), "rel_error_min": min(e), "rel_error_max": max(e),
                                       "mean_abs": round(float(np.mean(np.abs(e))), 4)}  # fmt: skip
    return out


def dumps(result: dict) -> str:
    """JSON with one line per row (the file stays readable and diffable)."""
    head = json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1)
    rows = ",\n  ".join(json.dumps(r) for r in result["rows"])
    return head[:-2] + ',\n "rows": [\n  ' + rows + "\n ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset of the tiny runs; SmolLM2 skipped")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    ap.add_argument(
        "--smollm2", choices=["auto", "yes", "no", "all"], default="auto",
        help="auto: yes unless --quick; all: also bnb 4/8 and GPTQ 4 (+~10 min)",
    )  # fmt: skip
    ap.add_argument("--fit", action="store_true", help="refit the per-block coefficients and print them")
    ap.add_argument("--out", default=None, help="default: results/activation_fit.json (_quick.json with --quick)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    smol = args.smollm2 in ("yes", "all") or (args.smollm2 == "auto" and not args.quick)
    smol_backends = SMOL_BACKENDS + (SMOL_EXTRA if args.smollm2 == "all" else [])
    rows: list[dict] = []
    t0 = time.perf_counter()
    for p in args.precisions:
        models: dict[tuple, torch.nn.Module] = {}
        for run in tiny_runs(args.quick):
            h, i, nb, v = run["shape"]
            if run["shape"] not in models:
                models = {
                    run["shape"]: tiny_llama(
                        seed=0, hidden_size=h, intermediate_size=i, num_layers=nb, vocab_size=v, dtype=DTYPES[p]
                    )
                }  # one shape alive at a time
            rows.append(measure(models[run["shape"]], run, p))
            r = rows[-1]
            print(f"{p} {r['shape']} {r['backend']}{r['bits']} r{r['rank']} d{r['dropout']} {r['batch']}x{r['seq']} "
                  f"{r['kind']}: measured {r['measured']:,} est {r['estimated']:,} ({r['rel_error']:+.3f})", flush=True)  # fmt: skip
        if smol:
            model, _ = load_default(dtype=DTYPES[p])
            for backend, bits in smol_backends:
                for dropout in (0.05, 0.0):
                    run = dict(shape="smollm2", backend=backend, bits=bits, rank=8, dropout=dropout,
                               batch=4, seq=128, kind="uniform")  # fmt: skip
                    rows.append(measure(model, run, p))
                    r = rows[-1]
                    print(f"{p} smollm2 {backend}{bits} d{dropout}: measured {r['measured']:,} "
                          f"est {r['estimated']:,} ({r['rel_error']:+.3f})", flush=True)  # fmt: skip
            del model
    result = {
        "what": "activation estimate vs measured peak - LoRA grads, one LoRA forward+backward under CPU autocast",
        "quick": args.quick, "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "coefficients": {p: COEF16[p]._asdict() for p in args.precisions},
        "summary": summary(rows), "rows": rows,
    }  # fmt: skip
    if args.fit:
        result["refit_blocks"] = {
            p: refit_blocks([r for r in rows if r["precision"] == p and r["shape"] != "smollm2"], p)
            for p in args.precisions
        }
        print(json.dumps(result["refit_blocks"], indent=1))
    print(json.dumps(result["summary"], indent=1))
    out = Path(args.out or Path(__file__).parent / "results" / f"activation_fit{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
