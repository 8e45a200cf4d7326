"""Tests of the ``bnb`` backend: exact bytes, fidelity, gradients, mixed 4/8 bits, peft classes, training parity."""

from __future__ import annotations

import logging

import pytest
import torch
from _helpers import assert_exact_bytes
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from autoqra.quant_backends import get_backend  # noqa: E402
from autoqra.quant_backends.bnb import BnbBackend  # noqa: E402

SHAPES = [(64, 128), (128, 256), (256, 128), (576, 1536), (10, 10), (7, 33)]
OPTIONS = [
    {"quant_type": "nf4"},
    {"quant_type": "fp4"},
    {"quant_type": "nf4", "double_quant": True},
    {"quant_type": "fp4", "double_quant": True, "blocksize": 128},
    {"quant_type": "nf4", "blocksize": 32},
]
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _linear(out_f: int, in_f: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).requires_grad_(False)


def _swap(model: nn.Module, backend, bits_of) -> nn.Module:
    """Hand swap every decoder projection for ``backend.quantize(linear, bits_of(name))``."""
    for name, mod in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in PROJ:
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, backend.quantize(mod, bits_of(name)))
    return model


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_exact_bytes_4bit(shape, opts):
    be = BnbBackend(**opts)
    q = be.quantize(_linear(*shape), 4)
    assert isinstance(q, bnb.nn.Linear4bit)
    assert_exact_bytes(be, q, *shape, 4)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_exact_bytes_8bit(shape):
    be = BnbBackend()
    q = be.quantize(_linear(*shape), 8)
    assert isinstance(q, bnb.nn.Linear8bitLt)
    assert_exact_bytes(be, q, *shape, 8)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("double_quant", [False, True])
def test_exact_bytes_with_bias_after_train_and_eval_forward(bits, double_quant):
    be = BnbBackend(double_quant=double_quant)
    q = be.quantize(_linear(192, 576, bias=True), bits)
    assert_exact_bytes(be, q, 192, 576, bits, bias_bytes=4 * 192)
    q.train()
    x = torch.randn(3, 576, requires_grad=True)
    q(x).sum().backward()  # 8 bits: moves CB/SCB from the weight into module.state
    assert_exact_bytes(be, q, 192, 576, bits, bias_bytes=4 * 192)
    q.eval()
    with torch.no_grad():
        q(torch.randn(3, 576))
    assert_exact_bytes(be, q, 192, 576, bits, bias_bytes=4 * 192)


def test_known_values():
    n, blocks = 576 * 1536, 576 * 1536 // 64
    assert BnbBackend().weight_bytes(576, 1536, 4) == (n // 2, 4 * blocks + 64)
    assert BnbBackend(double_quant=True).weight_bytes(576, 1536, 4) == (n // 2, blocks + 4 + 4 * 54 + 1024 + 64)
    assert BnbBackend().weight_bytes(576, 1536, 8) == (n, 4 * 576)
    assert BnbBackend().weight_bytes(576, 1536, 16) == (0, 0)
    assert BnbBackend().weight_bytes(3, 5, 4) == (8, 4 + 64)  # 15 values -> 8 bytes, 1 block


def test_code_books_are_per_layer_copies():
    """shared_bytes() is 0 because every layer owns its code books: check that no storage is shared."""
    be = BnbBackend(double_quant=True)
    a, b = be.quantize(_linear(64, 128), 4), be.quantize(_linear(64, 128, seed=1), 4)
    ptrs_a = {t.untyped_storage().data_ptr() for group in be.module_tensors(a) for t in group}
    ptrs_b = {t.untyped_storage().data_ptr() for group in be.module_tensors(b) for t in group}
    assert not ptrs_a & ptrs_b
    assert be.shared_bytes([4, 8]) == 0


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_does_not_touch_input(bits):
    lin = _linear(64, 128, bias=True)
    w, b = lin.weight, lin.bias
    w0, b0 = w.detach().clone(), b.detach().clone()
    q = BnbBackend().quantize(lin, bits)
    q.train()
    q(torch.randn(2, 128)).sum()
    assert lin.weight is w and lin.bias is b and type(lin.weight) is nn.Parameter
    assert torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0) and not lin.weight.requires_grad
    assert q.bias.data_ptr() != lin.bias.data_ptr()
    assert BnbBackend().quantize(lin, 16) is lin


@pytest.mark.parametrize(("quant_type", "bits", "bound"), [("nf4", 4, 0.15), ("fp4", 4, 0.2), ("nf4", 8, 0.01)])
def test_forward_close_to_fp(quant_type, bits, bound):
    lin = _linear(256, 128, bias=True)
    x = torch.randn(16, 128)
    ref = lin(x)
    q = BnbBackend(quant_type=quant_type).quantize(lin, bits)
    for train in (True, False):
        q.train(train)
        y = q(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert ((y - ref).norm() / ref.norm()).item() < bound


def _dequantized(q: nn.Module) -> torch.Tensor:
    if isinstance(q, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    cb = q.state.CB if q.state.CB is not None else q.weight.CB
    scb = q.state.SCB if q.state.SCB is not None else q.weight.SCB
    return cb.float() * scb.float().unsqueeze(1) / 127.0


@pytest.mark.parametrize("bits", [4, 8])
def test_backward_reaches_input_and_external_param(bits):
    q = BnbBackend().quantize(_linear(64, 128), bits).train()
    w_deq = _dequantized(q)
    ext = nn.Parameter(torch.randn(128, 128) / 12)
    x = torch.randn(4, 128, requires_grad=True)
    h = x @ ext
    h.retain_grad()
    g = torch.randn(4, 64)
    (q(h) * g).sum().backward()
    assert x.grad.abs().sum() > 0 and ext.grad.abs().sum() > 0
    torch.testing.assert_close(h.grad, g @ w_deq, rtol=1e-3, atol=1e-4)  # chain rule through the dequantized W
    assert not any(p.requires_grad for p in q.parameters())


def test_unsupported_bits_raise():
    be = BnbBackend()
    for bits in (1, 2, 3, 5, 6):
        with pytest.raises(ValueError, match=r"backend 'bnb' does not support bits .*supported bits: \[4, 8, 16\]"):
            be.quantize(_linear(64, 128), bits)
        with pytest.raises(ValueError, match="backend 'bnb'"):
            be.weight_bytes(64, 128, bits)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"quant_type": "int4"}, "quant_type"),
        ({"double_quant": 1}, "double_quant"),
        ({"blocksize": 48}, "blocksize"),
        ({"compute_dtype": torch.int8}, "compute_dtype"),
        ({"threshold": -1.0}, "threshold"),
    ],
)
def test_bad_options_raise(kwargs, field):
    with pytest.raises(ValueError, match=f"{field}=.*allowed"):
        BnbBackend(**kwargs)


def test_registry_and_spec():
    be = get_backend("bnb", quant_type="fp4", double_quant=True)
    assert isinstance(be, BnbBackend) and be.is_available()
    spec = be.spec()
    assert (spec["name"], spec["quant_type"], spec["double_quant"], spec["blocksize"]) == ("bnb", "fp4", True, 64)
    assert spec["compute_dtype"] == "float32" and spec["threshold"] == 0.0
    assert not be.owns(nn.Linear(4, 4))


def test_int8_cast_warning_silenced_but_other_messages_kept(caplog):
    q = BnbBackend().quantize(_linear(64, 128), 8).eval()  # eval -> MatMul8bitLt, which logs on every call
    lg = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING):
        with torch.no_grad():
            q(torch.randn(2, 128))
        lg.warning("some other bitsandbytes warning")
    msgs = [r.getMessage() for r in caplog.records]
    assert not any("MatMul8bitLt" in m for m in msgs)
    assert "some other bitsandbytes warning" in msgs


def test_mixed_4_and_8_bits_in_one_model_with_peft():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import bnb as lora_bnb

    from autoqra.models import tiny_llama

    be = BnbBackend()
    model = _swap(tiny_llama(seed=0), be, lambda name: 8 if ("mlp" in name) else 4)
    kinds = {type(m) for m in model.modules() if be.owns(m)}
    assert kinds == {bnb.nn.Linear4bit, bnb.nn.Linear8bitLt}
    be.prepare_for_peft(model)
    assert model.is_loaded_in_4bit and model.is_loaded_in_8bit
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=PROJ))
    wrapped = [type(m) for m in pm.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert wrapped.count(lora_bnb.Linear4bit) == 8 and wrapped.count(lora_bnb.Linear8bitLt) == 6
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (2, 8), generator=g).repeat(1, 4)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    pm.train()
    losses = []
    for _ in range(6):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for m in pm.modules():  # bytes still exact after training on both layer kinds
        if be.owns(m):
            bits = 4 if isinstance(m, bnb.nn.Linear4bit) else 8
            assert_exact_bytes(be, m, m.out_features, m.in_features, bits)


def test_without_prepare_peft_falls_back_to_generic_lora():
    """Documents why prepare_for_peft exists: without the flags peft picks its generic class."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import bnb as lora_bnb
    from peft.tuners.lora.layer import Linear as GenericLora

    from autoqra.models import tiny_llama

    model = _swap(tiny_llama(seed=0, num_layers=1), BnbBackend(), lambda name: 4)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    wrapped = [type(m) for m in pm.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert wrapped == [GenericLora] and GenericLora is not lora_bnb.Linear4bit


def test_training_parity_nf4_vs_hqq4():
    """bnb nf4 LoRA (peft's bnb Linear4bit class) learns at least ~0.8x as much as HQQ 4-bit LoRA."""
    pytest.importorskip("hqq")
    from peft.tuners.lora import bnb as lora_bnb
    from peft.tuners.lora.hqq import HqqLoraLinear

    drops = {}
    for name, cls in (("hqq", HqqLoraLinear), ("bnb", lora_bnb.Linear4bit)):
        before, after, classes = _train(name, 4)
        assert classes == {cls}
        drops[name] = before - after
    assert drops["hqq"] > 0.3, drops  # the task is learnable at all
    assert drops["bnb"] >= 0.8 * drops["hqq"], drops


def _train(backend_name: str, bits: int, steps: int = 30) -> tuple[float, float, set]:
    """``(eval loss before, eval loss after, LoRA classes)`` for LoRA r=8 on all 7 projections of a tiny Llama.

    The task is a repeated random sequence (2 x 64 tokens, period 16), 30 AdamW steps at lr 1e-3.
    """
    from peft import LoraConfig, get_peft_model

    from autoqra.models import tiny_llama

    be = get_backend(backend_name)
    model = _swap(tiny_llama(seed=0), be, lambda name: bits)
    be.prepare_for_peft(model)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJ))
    classes = {type(m) for m in pm.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (2, 16), generator=g).repeat(1, 4)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    pm.eval()
    with torch.no_grad():
        before = pm(input_ids=ids, labels=ids).loss.item()
    pm.train()
    for _ in range(steps):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    with torch.no_grad():
        after = pm(input_ids=ids, labels=ids).loss.item()
    return before, after, classes


def test_bits_and_dims_types():
    be = BnbBackend()
    import numpy as np

    assert be.weight_bytes(np.int64(64), np.int64(128), np.int64(4)) == be.weight_bytes(64, 128, 4)
    assert type(be.weight_bytes(np.int64(64), 128, 4)[0]) is int
    for bits in (1.58, 4.0, "4", None):
        with pytest.raises(ValueError, match="backend 'bnb' needs integer bits"):
            be.weight_bytes(64, 128, bits)
    for dims in ((0, 128), (64, -1), (64.0, 128), (True, 128)):
        with pytest.raises(ValueError, match="_features=.*allowed: a positive int"):
            be.weight_bytes(*dims, 4)
