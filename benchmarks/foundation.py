"""Foundation measurements on SmolLM2 (README numbers): memory table per backend × bits, per-candidate
apply time with and without the quantized-layer cache, and the activation estimate vs a measured peak.

Run: .venv/bin/python benchmarks/foundation.py  → benchmarks/results/foundation.json (+ printed table)
"""

import json
import time
from pathlib import Path

import torch

import autoqra
from autoqra.apply import quant_cache
from autoqra.evaluators.data import build_task_data
from autoqra.memory.trace import measure_peak

OUT = Path(__file__).parent / "results" / "foundation.json"


def main() -> None:
    model, tok = autoqra.models.load_default()
    out: dict = {"memory": {}, "apply": {}, "activation": {}}
    ladders = {"hqq": (2, 3, 4, 8), "bnb": (4, 8), "gptq": (2, 3, 4, 8), "none": (16,)}
    for be, bits in ladders.items():
        space = autoqra.SearchSpace.from_model(model, bits=bits, ranks=(8,))
        mm = autoqra.MemoryModel(model, space, be)
        out["memory"][be] = {b: mm.predict(space.uniform(b, 8)).to_dict() for b in bits}
    # apply time: a first candidate quantizes everything; the next one reuses unchanged units
    space = autoqra.SearchSpace.from_model(model, bits=(3, 4), ranks=(8, 16))
    a = space.uniform(4, 8)
    b = space.make([3] + [4] * (space.n_units - 1), [16] + [8] * (space.n_units - 1))
    quant_cache(model).clear()
    for name, cand in (("first (cold cache)", a), ("neighbour (1 unit changed)", b), ("same again", a)):
        t0 = time.perf_counter()
        pm = autoqra.apply_assignment(model, cand, "hqq", space=space)
        out["apply"][name] = round(time.perf_counter() - t0, 2)
        mm = autoqra.MemoryModel(model, space, "hqq")
        assert autoqra.measure_memory(pm).model_bytes == mm.predict(cand).model_bytes
    # activation estimate vs measured peak (one forward+backward, batch 4 x 128)
    data = build_task_data("pydoc", tok, block_size=128)
    ids = data.train[:4]
    for be, bits in (("none", 16), ("hqq", 4), ("bnb", 4)):
        sp = autoqra.SearchSpace.from_model(model, bits=(bits,), ranks=(8,))
        mm = autoqra.MemoryModel(model, sp, be, train=autoqra.TrainSpec(batch_size=4, seq_len=128))
        pm = autoqra.apply_assignment(model, sp.uniform(bits, 8), be, space=sp)
        pm.train()
        _, peak = measure_peak(lambda pm=pm: pm(input_ids=ids, labels=ids).loss.backward())
        pred = mm.predict(sp.uniform(bits, 8))
        measured = peak - pred.lora_grad_bytes
        out["activation"][f"{be}-{bits}bit-r8"] = {
            "estimate": pred.activation_bytes, "measured": measured,
            "error": round((pred.activation_bytes - measured) / measured, 4),
        }
        del pm
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    OUT.write_text(json.dumps(out, indent=1))
    print(json.dumps({"apply": out["apply"], "activation": out["activation"]}, indent=1))
    for be, rows in out["memory"].items():
        for b, d in rows.items():
            print(f"{be:5s} {b:>2}-bit r8: model {d['model_bytes'] / 1e6:8.2f} MB  train {d['train_bytes'] / 1e6:9.2f} MB"
                  f"  (weights {d['quant_weight_bytes'] / 1e6:.2f} + meta {d['quant_meta_bytes'] / 1e6:.2f})")


if __name__ == "__main__":
    main()
