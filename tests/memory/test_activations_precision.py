"""Activation estimate per training precision (``autoqra.memory.activations``): bf16/fp16 vs measured, fp32 unchanged."""

import pytest
import torch
from _helpers import LADDERS

from autoqra import MemoryModel, SearchSpace, TrainSpec, apply_assignment
from autoqra.memory.trace import measure_peak
from autoqra.models import tiny_llama
from autoqra.quant_backends import get_backend

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _backend(name, precision):
    return get_backend(name, compute_dtype=DTYPES[precision]) if name == "hqq" else get_backend(name)


@pytest.mark.parametrize("precision, backend", [("bf16", "none"), ("bf16", "hqq"), ("fp16", "hqq")])
def test_activation_estimate_16bit_close_to_measured_peak(precision, backend):
    """Estimate vs the storage-tracker peak (minus LoRA grads) under autocast, within the documented ±15 %."""
    tiny = tiny_llama(seed=0, dtype=DTYPES[precision])
    train = TrainSpec(batch_size=2, seq_len=64)
    be = _backend(backend, precision)
    space = SearchSpace.from_model(tiny, bits=LADDERS[backend], ranks=(0, 8, 16))
    mm = MemoryModel(tiny, space, be, train=train, precision=precision)
    a = space.uniform(space.bits[0], 16)
    pm = apply_assignment(tiny, a, be, space=space, dropout=train.lora_dropout)
    pm.train()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=DTYPES[precision]):
            pm(input_ids=ids, labels=ids).loss.backward()

    _, peak = measure_peak(step)
    pred = mm.predict(a)
    measured = peak - pred.lora_grad_bytes
    assert abs(pred.activation_bytes - measured) / measured < 0.15, (precision, backend, pred.activation_bytes, measured)


def test_16bit_differs_from_fp32_and_bad_precision_raises():
    # a vocabulary large enough that the logits dominate, as in real LMs (fp32 logits 16 B/token·vocab, bf16 12)
    tiny = tiny_llama(seed=0, dtype=torch.bfloat16, vocab_size=8192)
    space = SearchSpace.from_model(tiny, bits=(4, 16), ranks=(0, 8))
    a = space.uniform(4, 8)
    by = {p: MemoryModel(tiny, space, "hqq", precision=p).predict(a).activation_bytes for p in ("fp32", "bf16")}
    assert by["bf16"] < by["fp32"]
    with pytest.raises(ValueError, match=r"precision='fp8'.*'fp32', 'bf16', 'fp16'"):
        MemoryModel(tiny, space, "hqq", precision="fp8")


def test_fp32_table_unchanged():
    """fp32 (the default and ``precision="fp32"``) is the docstring formula, to the byte."""
    tiny = tiny_llama(seed=0)
    hidden, inter, vocab, blocks = 128, 256, 512, 2
    train = TrainSpec(batch_size=3, seq_len=40, lora_dropout=0.1)
    n = 3 * 40
    space = SearchSpace.from_model(tiny, bits=(2, 4, 16), ranks=(0, 4, 8))
    fixed = 16 * n * vocab + n * blocks * (13 * hidden + 27 * inter) + 4 * vocab * hidden + 32 * blocks * hidden**2
    hqq_delta = -7.27  # HQQ's fp32 per-token delta, bytes per token per input feature (docstring)

    def expected(bits, ranks):
        total = fixed
        for unit, b, r in zip(space.units, bits, ranks):
            ins = [i for _, i in unit.shapes]
            if r:
                total += sum(4 * n * r + 5 * n * i for i in ins)
            if b != 16:
                total += int(round(hqq_delta * n * sum(ins)))
        return total

    assignments = [space.uniform(4, 8), space.uniform(16, 0)]
    assignments.append(type(assignments[0])(assignments[0].units, (2, 16), (0, 4)))
    for mm in (MemoryModel(tiny, space, "hqq", train=train), MemoryModel(tiny, space, "hqq", train=train, precision="fp32")):
        for a in assignments:
            assert mm.predict(a).activation_bytes == expected(a.bits, a.ranks), a
