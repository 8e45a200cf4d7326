"""Foundation measurements on SmolLM2 (README numbers): memory table per backend × bits, per-candidate
apply time with and without the quantized-layer cache, the activation estimate vs a measured peak, and the
planner's speed (µs per ``MemoryModel.predict``; seconds to plan an 8B Llama on the meta device).

Run: .venv/bin/python benchmarks/foundation.py  → benchmarks/results/foundation.json (+ printed table)
"""

import json
import time
from pathlib import Path

import numpy as np
import torch

import autoqra
from autoqra.apply import quant_cache
from autoqra.evaluators.data import build_task_data
from autoqra.memory.trace import measure_peak

OUT = Path(__file__).parent / "results" / "foundation.json"
#: Llama-3-8B's shapes (the tests check that planning it allocates no weight; here: how long it takes)
LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}


def planning(model, n: int = 1000) -> dict:
    """Microseconds per ``predict`` (module granularity, HQQ, ``n`` random assignments) and seconds to build
    an 8B model on the meta device, its space and memory model, and predict once."""
    space = autoqra.SearchSpace.from_model(model, bits=(2, 3, 4, 8, 16), granularity="module")
    mm = autoqra.MemoryModel(model, space, "hqq")
    rng = np.random.default_rng(0)
    A = [space.sample(rng) for _ in range(n)]
    t0 = time.perf_counter()
    for a in A:
        mm.predict(a)
    per_call = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    big = autoqra.models.from_config(LLAMA_8B)
    big_space = autoqra.SearchSpace.from_model(big)
    autoqra.MemoryModel(big, big_space, "hqq").predict(big_space.uniform(4, 8))
    return {"predict_us": round(per_call * 1e6, 1), "n_units": space.n_units,
            "meta_8b_seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    model, tok = autoqra.models.load_default()
    out: dict = {"memory": {}, "apply": {}, "activation": {}, "planning": planning(model)}
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
    print(json.dumps({"apply": out["apply"], "activation": out["activation"], "planning": out["planning"]}, indent=1))
    for be, rows in out["memory"].items():
        for b, d in rows.items():
            print(f"{be:5s} {b:>2}-bit r8: model {d['model_bytes'] / 1e6:8.2f} MB  train {d['train_bytes'] / 1e6:9.2f} MB"
                  f"  (weights {d['quant_weight_bytes'] / 1e6:.2f} + meta {d['quant_meta_bytes'] / 1e6:.2f})")


if __name__ == "__main__":
    main()
