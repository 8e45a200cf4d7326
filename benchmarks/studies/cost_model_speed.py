"""How much time does prefix replay save in the cost model, and is its table the same?

The demo search's cost model on SmolLM2 + HQQ (bits 2/3/4/8, 30 blocks, 8 calibration blocks; the rank probe
at 4 bits, 30 steps, leave-one-out on 8 held-out blocks) measured with and without
:mod:`autoqra.guidance.prefix` (``quant_damage(replay=...)``; the leave-one-out via the evaluator's
``replayable_score``). The quantized layers are made once first (the search caches them too), so the
timings compare the forward passes only. Each variant runs ``--repeats`` times, alternating; the tables
must be equal.

A one-off study of that change. Run: .venv/bin/python benchmarks/studies/cost_model_speed.py
→ benchmarks/studies/results/cost_model_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared _common
from _common import load

from autoqra.apply import quantized_layers
from autoqra.config import OptimizeConfig
from autoqra.guidance.costmodel import leave_one_out, quant_damage
from autoqra.precision import cpu_bf16_native, cpu_name
from autoqra.preparation import prepare
from autoqra.quant_backends import UNQUANTIZED_BITS
from autoqra.space import Assignment

ROOT = Path(__file__).resolve().parent


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "cost_model_speed.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load()
    cfg = OptimizeConfig(preset="demo", budget="4bit")
    su = prepare(model, cfg, tokenizer=tok)
    ev, space = su.evaluator, su.space
    n, steps = cfg.resolved("importance_blocks"), cfg.resolved("high_steps")
    blocks = ev.data.train[:n]
    batches = [blocks[i: i + 8] for i in range(0, blocks.shape[0], 8)]
    _, t_quant = _timed(lambda: [quantized_layers(ev.model, dict.fromkeys(space.module_names, b), ev.backend, None,
                                                  space.module_names) for b in space.bits if b != UNQUANTIZED_BITS])
    times: dict[str, list[float]] = {"kl_full": [], "kl_replay": [], "loo_full": [], "loo_replay": []}
    tables: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for replay in (False, True):
            q, dt = _timed(lambda replay=replay: quant_damage(ev.model, space, ev.backend, batches, None, su.precision,
                                                              replay=replay))
            key = "kl_replay" if replay else "kl_full"
            times[key].append(dt)
            assert key not in tables or np.array_equal(tables[key], q)
            tables[key] = q
    saved = ev.eval_blocks
    ev.eval_blocks = 8
    pm = ev.build(Assignment(space.unit_names, [4] * space.n_units, [4] * space.n_units))
    ev.fit(pm, steps)
    for _ in range(args.repeats):
        for replay in (False, True):
            ev.replayable_score = replay
            g, dt = _timed(lambda: leave_one_out(ev, pm, space))
            key = "loo_replay" if replay else "loo_full"
            times[key].append(dt)
            tables[key] = g
    ev.eval_blocks, ev.replayable_score = saved, True
    same_kl = bool(np.array_equal(tables["kl_full"], tables["kl_replay"]))
    same_loo = bool(np.array_equal(tables["loo_full"], tables["loo_replay"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    doc = {"cpu": cpu_name(), "cpu_bf16_native": cpu_bf16_native(), "precision": su.precision, "threads": args.threads,
           "n_units": space.n_units, "bits": list(space.bits), "calib_blocks": n, "loo_blocks": 8,
           "quantize_all_seconds": t_quant, "seconds": times, "median_seconds": med,
           "speedup": {"kl": med["kl_full"] / med["kl_replay"], "loo": med["loo_full"] / med["loo_replay"]},
           "same_table": {"kl": same_kl, "loo": same_loo},
           "max_abs_diff": {"kl": float(np.abs(tables["kl_full"] - tables["kl_replay"]).max()),
                            "loo": float(np.abs(tables["loo_full"] - tables["loo_replay"]).max())}}
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: doc[k] for k in ("cpu", "precision", "median_seconds", "speedup", "same_table", "max_abs_diff")},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
