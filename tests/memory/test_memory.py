import numpy as np
import pytest
import torch
from _helpers import BACKENDS, LADDERS, calib_for, train_step

from autoqra import MemoryModel, SearchSpace, TrainSpec, apply_assignment, measure_memory
from autoqra.memory.model import MemoryBreakdown
from autoqra.memory.trace import measure_peak
from autoqra.quant_backends import get_backend


def _check_exact(model, space, backend, assignments, vocab):
    mm = MemoryModel(model, space, backend)
    calib = calib_for(backend, vocab)
    for a in assignments:
        pm = apply_assignment(model, a, backend, space=space, calib_ids=calib)
        pred, meas = mm.predict(a), measure_memory(pm)
        assert pred.model_bytes == meas.model_bytes, (backend, a.short(), pred.to_dict(), meas.to_dict())
        assert pred.quant_weight_bytes == meas.quant_weight_bytes
        assert pred.quant_meta_bytes == meas.quant_meta_bytes
        assert pred.lora_bytes == meas.lora_bytes
    return mm


@pytest.mark.parametrize("granularity", ["block", "module"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_equals_measured_tiny(tiny, backend, granularity):
    space = SearchSpace.from_model(tiny, bits=LADDERS[backend], ranks=(0, 4, 8, 16), granularity=granularity)
    rng = np.random.default_rng(1)
    assigns = [space.uniform(b, 8) for b in space.bits] + [space.sample(rng) for _ in range(20)]
    _check_exact(tiny, space, backend, assigns, tiny.config.vocab_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_and_optimizer_bytes_exact_after_step(tiny, backend):
    space = SearchSpace.from_model(tiny, bits=LADDERS[backend], ranks=(0, 4, 8, 16), granularity="module")
    mm = MemoryModel(tiny, space, backend)
    rng = np.random.default_rng(2)
    for _ in range(3):
        a = space.sample(rng)
        if not any(a.ranks):
            continue
        pm = apply_assignment(tiny, a, backend, space=space, calib_ids=calib_for(backend, 512))
        opt, _ = train_step(pm, 512)
        meas, pred = measure_memory(pm, opt), mm.predict(a)
        assert meas.lora_grad_bytes == pred.lora_grad_bytes > 0
        assert meas.optimizer_bytes == pred.optimizer_bytes > 0


def test_predict_is_a_table_lookup_and_vectorised(tiny):
    """The backend's byte formula runs once per (tensor, bits) when the model is built, never in ``predict``
    (the time per call is in ``benchmarks/foundation.py``'s output)."""
    space = SearchSpace.from_model(tiny, bits=(2, 3, 4, 8, 16), granularity="module")
    be = get_backend("hqq")
    calls = []
    weight_bytes = be.weight_bytes
    be.weight_bytes = lambda *args: calls.append(args) or weight_bytes(*args)
    mm = MemoryModel(tiny, space, be)
    built = len(calls)
    assert 0 < built <= len(space.tensors) * len(space.bits)
    rng = np.random.default_rng(0)
    A = [space.sample(rng) for _ in range(50)]
    X = np.stack([space.encode(a) for a in A])
    assert list(mm.model_bytes_encoded(X)) == [mm.predict(a).model_bytes for a in A]
    for a in A * 20:
        mm.predict(a)
    assert len(calls) == built  # 1,050 predictions, no byte formula evaluated


def test_breakdown_arithmetic_and_roundtrip():
    a = MemoryBreakdown(1, 2, 3, 4, 5, 6, 7)
    assert a.model_bytes == 10 and a.train_bytes == 28
    assert MemoryBreakdown.from_dict(a.to_dict()) == a
    assert (a + a).train_bytes == 56


def test_unsupported_bits_raise_at_construction(tiny):
    space = SearchSpace.from_model(tiny, bits=(3, 4))
    with pytest.raises(ValueError, match=r"'bnb'.*supported bits"):
        MemoryModel(tiny, space, "bnb")


def test_activation_estimate_close_to_measured_peak(tiny):
    """Estimate vs the storage-tracker peak (minus LoRA grads), within the documented ±15 %."""
    train = TrainSpec(batch_size=2, seq_len=64)
    for backend in ("none", "hqq"):
        space = SearchSpace.from_model(tiny, bits=LADDERS[backend], ranks=(0, 8, 16))
        mm = MemoryModel(tiny, space, backend, train=train)
        a = space.uniform(space.bits[0], 16)
        pm = apply_assignment(tiny, a, backend, space=space)
        pm.train()
        ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
        _, peak = measure_peak(lambda pm=pm, ids=ids: pm(input_ids=ids, labels=ids).loss.backward())
        pred = mm.predict(a)
        measured = peak - pred.lora_grad_bytes
        assert abs(pred.activation_bytes - measured) / measured < 0.15, (backend, pred.activation_bytes, measured)


def test_meta_device_8b_without_materialising_a_weight():
    """An 8B plan from shapes alone: the model stays on the meta device and no weight matrix is ever allocated
    (the bytes every op allocates are counted; the seconds it takes are in ``benchmarks/foundation.py``)."""
    from autoqra.models import from_config

    cfg = {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    }

    def plan():
        m = from_config(cfg)
        space = SearchSpace.from_model(m)
        return m, MemoryModel(m, space, "hqq").predict(space.uniform(4, 8))

    (m, bd), allocated = measure_peak(plan)
    smallest = min(p.numel() * p.element_size() for p in m.parameters() if p.dim() == 2)
    assert all(p.is_meta for p in m.parameters()) and allocated < smallest
    # 4-bit HQQ (g64, fp32 meta = 5 bits/weight) of 6.98e9 linear weights ≈ 4.36 GB + fp32 embeddings
    assert 4.3e9 < bd.quant_weight_bytes + bd.quant_meta_bytes < 4.4e9


@pytest.mark.slow
@pytest.mark.parametrize("backend, bits", [("none", (16,)), ("hqq", (4, 16)), ("bnb", (4, 8))])
def test_predict_equals_measured_smollm2(smollm2, backend, bits):
    """SmolLM2 (4 distinct linear shapes): uniform + 20 random assignments per granularity, to the byte.

    GPTQ on SmolLM2 is covered by ``benchmarks/foundation.py`` (calibration + quantization take ~2 min);
    its byte formula is shape-only and tested on the tiny model above.
    """
    model, _ = smollm2
    rng = np.random.default_rng(7)
    for gran in ("block", "module"):
        space = SearchSpace.from_model(model, bits=bits, ranks=(0, 8), granularity=gran)
        assigns = [space.uniform(b, 8) for b in bits] + [space.sample(rng) for _ in range(20)]
        mm = _check_exact(model, space, backend, assigns, model.config.vocab_size)
        pm = apply_assignment(model, assigns[-1], backend, space=space)
        if any(assigns[-1].ranks):
            opt, _ = train_step(pm, model.config.vocab_size, batch=1, seq=16)
            meas, pred = measure_memory(pm, opt), mm.predict(assigns[-1])
            assert (meas.lora_grad_bytes, meas.optimizer_bytes) == (pred.lora_grad_bytes, pred.optimizer_bytes)
