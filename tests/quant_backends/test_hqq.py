"""Tests of the ``hqq`` backend: exact bytes, fidelity, gradients, input safety, peft wrapping."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_exact_bytes
from torch import nn

pytest.importorskip("hqq")

from autoqra.quant_backends import get_backend  # noqa: E402
from autoqra.quant_backends.hqq import HQQBackend  # noqa: E402

BITS = (1, 2, 3, 4, 5, 6, 8)
SHAPES = [(64, 128), (128, 256), (256, 128), (192, 576)]
#: relative output error bounds per bits on a random layer (measured ~0.93, .31, .13, .065, .03, .015, .004)
REL_ERR = {1: 1.0, 2: 0.5, 3: 0.25, 4: 0.12, 5: 0.06, 6: 0.03, 8: 0.01}


@pytest.fixture(scope="module")
def hqq() -> HQQBackend:
    return HQQBackend()


def _linear(out_f: int, in_f: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).requires_grad_(False)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_bytes(hqq, shape, bits):
    out_f, in_f = shape
    q = hqq.quantize(_linear(out_f, in_f), bits)
    assert_exact_bytes(hqq, q, out_f, in_f, bits)


def test_exact_bytes_large_bias_and_after_training_step(hqq):
    q = hqq.quantize(_linear(576, 1536, bias=True), 4)  # SmolLM2's down_proj shape
    assert_exact_bytes(hqq, q, 576, 1536, 4, bias_bytes=576 * hqq.compute_dtype.itemsize)
    x = torch.randn(2, 1536, requires_grad=True)
    q(x).sum().backward()
    assert_exact_bytes(hqq, q, 576, 1536, 4, bias_bytes=576 * hqq.compute_dtype.itemsize)


def test_known_values(hqq):
    # 576x1536 at group 64, fp32 meta: numbers from the measured research notes
    assert hqq.weight_bytes(576, 1536, 8) == (884_736, 110_592)
    assert hqq.weight_bytes(576, 1536, 4) == (442_368, 110_592)
    assert hqq.weight_bytes(576, 1536, 3) == (354_048, 110_592)
    assert hqq.weight_bytes(576, 1536, 2) == (221_184, 110_592)
    assert hqq.weight_bytes(576, 1536, 1) == (110_592, 110_592)
    assert hqq.weight_bytes(576, 1536, 16) == (0, 0)


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("axis", [0, 1])
def test_exact_bytes_other_options(compute_dtype, axis):
    be = HQQBackend(group_size=32, compute_dtype=compute_dtype, axis=axis)
    for bits in (1, 3, 4):
        q = be.quantize(_linear(64, 128, bias=True), bits)
        assert q.meta["scale"].dtype == compute_dtype and q.meta["zero"].dtype == compute_dtype
        assert_exact_bytes(be, q, 64, 128, bits, bias_bytes=64 * be.compute_dtype.itemsize)
    assert be.weight_bytes(64, 128, 4)[1] == 2 * (64 * 128 // 32) * 2  # scale+zero, 2 bytes each


def test_ungroupable_shapes_raise(hqq):
    # 8x24 = 192 weights = 3 groups of 64: 3/5/6/8 bits pack fine, 1/2/4 bits cannot pack 3 rows
    for bits in (3, 5, 6, 8):
        q = hqq.quantize(_linear(8, 24), bits)
        assert_exact_bytes(hqq, q, 8, 24, bits)
    for bits in (1, 2, 4):
        with pytest.raises(ValueError, match="multiple of"):
            hqq.weight_bytes(8, 24, bits)
        with pytest.raises(ValueError, match="multiple of"):
            hqq.quantize(_linear(8, 24), bits)
    # 10x10 = 100 weights is not a multiple of the group size at all
    with pytest.raises(ValueError, match="group_size=64"):
        hqq.weight_bytes(10, 10, 8)
    with pytest.raises(ValueError, match="group_size=64"):
        hqq.quantize(_linear(10, 10), 8)


def test_quantize_does_not_touch_input(hqq):
    lin = _linear(64, 128, bias=True)
    w, b = lin.weight, lin.bias
    w0, b0 = w.detach().clone(), b.detach().clone()
    ptr = w.data_ptr()
    for bits in BITS:
        hqq.quantize(lin, bits)
    assert lin.weight is w and lin.bias is b and lin.weight.data_ptr() == ptr
    assert torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0)
    assert isinstance(lin.weight, nn.Parameter) and not lin.weight.requires_grad
    assert hqq.quantize(lin, 16) is lin


def test_forward_close_to_fp(hqq):
    lin = _linear(256, 128, bias=True)
    x = torch.randn(16, 128)
    ref = lin(x)
    errs = {}
    for bits in BITS:
        y = hqq.quantize(lin, bits)(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        errs[bits] = ((y - ref).norm() / ref.norm()).item()
        assert errs[bits] < REL_ERR[bits], (bits, errs[bits])
    assert [errs[b] for b in BITS] == sorted(errs.values(), reverse=True)  # more bits, less error


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_backward_reaches_input_and_external_param(hqq, bits):
    q = hqq.quantize(_linear(64, 128), bits)
    w_deq = q.dequantize().detach()
    ext = nn.Parameter(torch.randn(128, 128) / 12)
    x = torch.randn(4, 128, requires_grad=True)
    h = x @ ext
    h.retain_grad()
    g = torch.randn(4, 64)
    (q(h) * g).sum().backward()
    assert x.grad is not None and ext.grad is not None and x.grad.abs().sum() > 0 and ext.grad.abs().sum() > 0
    torch.testing.assert_close(h.grad, g @ w_deq, rtol=1e-4, atol=1e-5)  # exact chain rule through W_deq
    assert not any(p.requires_grad for p in q.parameters())


def test_unsupported_bits_raise(hqq):
    for bits in (0, 7, 12, 32):
        with pytest.raises(ValueError, match=r"backend 'hqq' does not support bits .*supported bits: \[1, 2, 3, 4, 5, 6, 8, 16\]"):
            hqq.quantize(_linear(64, 128), bits)
        with pytest.raises(ValueError, match="backend 'hqq'"):
            hqq.weight_bytes(64, 128, bits)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"group_size": 0}, "group_size"),
        ({"group_size": 60}, "group_size"),
        ({"group_size": 64.0}, "group_size"),
        ({"axis": 2}, "axis"),
        ({"compute_dtype": torch.int8}, "compute_dtype"),
    ],
)
def test_bad_options_raise(kwargs, field):
    with pytest.raises(ValueError, match=f"{field}=.*allowed"):
        HQQBackend(**kwargs)


def test_registry_and_spec():
    be = get_backend("hqq", group_size=128)
    assert isinstance(be, HQQBackend) and be.is_available() and be.name == "hqq"
    spec = be.spec()
    assert spec["name"] == "hqq" and spec["group_size"] == 128 and spec["axis"] == 1
    assert spec["compute_dtype"] == "float32"
    assert be.shared_bytes([4, 8]) == 0
    assert not be.owns(nn.Linear(4, 4))


def test_peft_wraps_with_hqq_lora_and_only_lora_trains(hqq):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.hqq import HqqLoraLinear

    from autoqra.models import tiny_llama

    model = tiny_llama(seed=0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, mod in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets:
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, hqq.quantize(mod, 4))
    hqq.prepare_for_peft(model)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    wrapped = [m for m in pm.modules() if isinstance(m, HqqLoraLinear)]
    assert len(wrapped) == 14
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 512, (2, 16))
    pm(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if "lora_A" in n)


def test_bits_and_dims_types(hqq):
    import numpy as np

    assert hqq.weight_bytes(np.int64(64), np.int64(128), np.int64(4)) == hqq.weight_bytes(64, 128, 4)
    assert type(hqq.weight_bytes(np.int64(64), 128, 4)[0]) is int
    for bits in (1.58, 4.0, "4", None):
        with pytest.raises(ValueError, match="backend 'hqq' needs integer bits"):
            hqq.weight_bytes(64, 128, bits)
    for dims in ((0, 128), (64, -1), (64.0, 128), (True, 128)):
        with pytest.raises(ValueError, match="_features=.*allowed: a positive int"):
            hqq.weight_bytes(*dims, 4)


def test_group_size_per_bit_width_is_used_and_priced_exactly():
    """``group_size={4: 32}``: 4-bit layers in groups of 32, the other bit-widths at 64; bytes exact for both,
    the spec round-trips (string keys, as in a JSON store) and prices the same."""
    from autoqra.quant_backends import backend_from_spec

    be = HQQBackend(group_size={4: 32})
    assert be.group_size is None and be.group_size_of(4) == 32 and be.group_size_of(8) == 64
    for bits, g in ((4, 32), (8, 64), (3, 64)):
        q = be.quantize(_linear(64, 128, bias=True), bits)
        assert q.meta["scale"].numel() == 64 * 128 // g, bits
        assert_exact_bytes(be, q, 64, 128, bits, bias_bytes=64 * be.compute_dtype.itemsize)
    assert be.weight_bytes(576, 1536, 4) == (442_368, 2 * (576 * 1536 // 32) * 4)
    assert be.weight_bytes(576, 1536, 8) == HQQBackend().weight_bytes(576, 1536, 8)
    spec = be.spec()
    assert spec["group_size"]["4"] == 32 and spec["group_size"]["8"] == 64
    again = backend_from_spec(spec)
    assert again.spec() == spec and again.weight_bytes(576, 1536, 4) == be.weight_bytes(576, 1536, 4)
    assert HQQBackend(group_size=32).spec()["group_size"] == 32  # an int stays an int (stores keep matching)


@pytest.mark.parametrize("group_size", [{7: 32}, {4: 60}, {"four": 32}, {4: True}, "32"])
def test_bad_per_bit_group_sizes_raise(group_size):
    with pytest.raises(ValueError, match="group_size=.*allowed"):
        HQQBackend(group_size=group_size)


def test_embedding_options_follow_each_bit_widths_group_size():
    """An embedding is looked up row by row: a bit-width whose group size does not divide the hidden size is
    not offered (and refused when asked for), the others still are."""
    from types import SimpleNamespace

    emb = SimpleNamespace(kind="embedding", tensors=[SimpleNamespace(out_features=512, in_features=96)])
    assert HQQBackend().embedding_bits(emb) == ()  # 96 % 64 != 0
    assert HQQBackend(group_size={4: 32}).embedding_bits(emb) == (4,)  # 8 bits still in groups of 64
    assert HQQBackend(group_size={4: 32, 8: 32}).embedding_bits(emb) == (4, 8)
    assert HQQBackend(group_size=32).embedding_bits(emb) == (4, 8)
    with pytest.raises(ValueError, match="group_size=64"):
        HQQBackend(group_size={4: 32}).quantize_embedding(nn.Embedding(512, 96), 8)


def test_a_mapping_of_one_group_size_is_that_int():
    """Equal behaviour, equal identity: ``{4: 64}`` is the default backend (same spec, so the same stores)."""
    assert HQQBackend(group_size={4: 64}).spec() == HQQBackend().spec()
    assert HQQBackend(group_size={b: 32 for b in HQQBackend.supported_bits}).group_size == 32
