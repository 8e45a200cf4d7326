"""Shared test helpers: per-backend ladders, a training step, an instant synthetic evaluator."""

import numpy as np
import torch

from autoqra.evaluators.base import EvalResult, Evaluator
from autoqra.quant_backends import get_backend

LADDERS = {"none": (16,), "hqq": (2, 3, 4, 8, 16), "bnb": (4, 8, 16), "gptq": (2, 3, 4, 8, 16)}
BACKENDS = tuple(LADDERS)


def calib_for(backend, vocab, n=4, seq=32, seed=0):
    if not get_backend(backend).needs_calibration:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


def train_step(model, vocab, batch=2, seq=32, seed=0):
    """One AdamW step on random tokens; returns the optimizer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return opt, loss.item()


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (deduplicated by storage data_ptr)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def assert_exact_bytes(backend, module, out_f: int, in_f: int, bits: int, bias_bytes: int = 0) -> None:
    """The live storages of a quantized ``module`` equal ``weight_bytes`` (+ ``bias_bytes`` in ``other``), to the byte."""
    assert backend.owns(module)
    packed, meta, other = backend.module_tensors(module)
    want_packed, want_meta = backend.weight_bytes(out_f, in_f, bits)
    assert storage_bytes(packed) == want_packed
    assert storage_bytes(meta) == want_meta
    assert storage_bytes(other) == bias_bytes
    # no storage is counted twice across the three groups
    assert storage_bytes(packed + meta + other) == want_packed + want_meta + storage_bytes(other)
    # every parameter/buffer of the module is accounted for
    listed = {t.untyped_storage().data_ptr() for t in packed + meta + other}
    for t in [*module.parameters(), *module.buffers()]:
        assert t.untyped_storage().data_ptr() in listed


class ScoreEvaluator(Evaluator):
    """Instant, deterministic: score = mean bits + ranks/100 + fidelity steps/1000; counts calls."""

    name = "score"

    def __init__(self, space):
        self.space, self.calls = space, []

    def spec(self):
        return {"name": self.name}

    def evaluate(self, a, fidelity):
        self.calls.append((a, fidelity.steps))
        return EvalResult(score=float(np.mean(a.bits)) + sum(a.ranks) / 100 + fidelity.steps / 1000, seconds=0.01)
