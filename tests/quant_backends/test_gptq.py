"""Tests for the pure-torch GPTQ backend (packing, bytes, calibration, quality, peft)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import storage_bytes
from torch import nn

from autoqra.models import tiny_llama
from autoqra.quant_backends import get_backend
from autoqra.quant_backends._gptq_layer import grid
from autoqra.quant_backends._gptq_pack import pack_rows, unpack_rows
from autoqra.quant_backends.gptq import GPTQBackend, GPTQLinear

BITS = (2, 3, 4, 8)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(seed=0)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    return model, names, ids


@pytest.fixture(scope="module")
def hessians(tiny):
    model, names, ids = tiny
    return GPTQBackend().calibrate(model, names, ids)


def _h_error(lin: nn.Linear, q: GPTQLinear, H: torch.Tensor) -> float:
    """Layer-output squared error on the calibration inputs: tr(D H D^T) = 2/n ||X D^T||^2."""
    D = q.dequantize() - lin.weight
    return float(torch.trace(D @ H @ D.t()).detach())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [7, 32, 64, 100, 576])
def test_pack_unpack_roundtrip(bits, n):
    q = torch.randint(0, 2**bits, (n, 5), generator=torch.Generator().manual_seed(n))
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (-(-n * bits // 32), 5)
    assert torch.equal(unpack_rows(packed, n, bits).long(), q)


def test_three_bit_layout_matches_gptq_reference():
    """Compare with the reference GPTQ 3-bit packer (32 codes in 3 int32 words)."""
    q = torch.randint(0, 8, (64, 3), generator=torch.Generator().manual_seed(1)).numpy().astype("uint32")
    import numpy as np

    ref = np.zeros((6, 3), dtype=np.uint32)
    i = row = 0
    while row < 6:
        for j in range(i, i + 10):
            ref[row] |= q[j] << (3 * (j - i))
        i += 10
        ref[row] |= q[i] << 30
        row += 1
        ref[row] |= (q[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            ref[row] |= q[j] << (3 * (j - i) + 1)
        i += 10
        ref[row] |= q[i] << 31
        row += 1
        ref[row] |= (q[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            ref[row] |= q[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    ours = pack_rows(torch.from_numpy(q.astype("int64")), 3).numpy().view(np.uint32)
    assert (ours == ref).all()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(64, 128), (256, 128), (96, 192), (8, 64)])
def test_weight_bytes_exact(bits, shape, act_order):
    out_f, in_f = shape
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=True)
    be = GPTQBackend(act_order=act_order)
    q = be.quantize(lin, bits, calib=torch.eye(in_f))
    packed, meta, other = be.module_tensors(q)
    assert be.owns(q) and not be.owns(lin)
    assert (q.g_idx is not None) == act_order
    assert (storage_bytes(packed), storage_bytes(meta)) == be.weight_bytes(out_f, in_f, bits)
    assert storage_bytes(other) == 4 * out_f
    all_tensors = list(q.buffers()) + list(q.parameters())
    assert storage_bytes(all_tensors) == sum(be.weight_bytes(out_f, in_f, bits)) + 4 * out_f


def test_options_validated():
    for bad in (0, -64, 1.5, True):
        with pytest.raises(ValueError, match="group_size"):
            GPTQBackend(group_size=bad)
    with pytest.raises(ValueError, match="damp"):
        GPTQBackend(damp=0)
    be = GPTQBackend(group_size=64)
    with pytest.raises(ValueError, match="divisible by group_size=64"):
        be.quantize(nn.Linear(96, 8), 4, calib=torch.eye(96))
    with pytest.raises(ValueError, match="divisible"):
        be.weight_bytes(8, 96, 4)
    with pytest.raises(ValueError, match="calibration"):
        be.quantize(nn.Linear(64, 8), 4)
    with pytest.raises(ValueError, match="supported bits"):
        be.quantize(nn.Linear(64, 8), 5, calib=torch.eye(64))
    lin = nn.Linear(64, 8)
    assert be.quantize(lin, 16) is lin and be.weight_bytes(8, 64, 16) == (0, 0)


def test_gptqmodel_is_optional():
    be = GPTQBackend(use_gptqmodel=True)
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        assert not be.is_available()
        with pytest.raises(ImportError, match="gptqmodel"):
            get_backend("gptq", use_gptqmodel=True)
        with pytest.raises(ImportError, match="gptqmodel"):
            be.quantize(nn.Linear(64, 8), 4, calib=torch.eye(64))
    assert GPTQBackend().is_available() and get_backend("gptq").needs_calibration


def test_calibrate_hessian_sharing_and_model_untouched(tiny, hessians):
    model, names, ids = tiny
    assert set(hessians) == set(names)
    a = "model.layers.0.self_attn."
    assert hessians[a + "q_proj"] is hessians[a + "k_proj"] is hessians[a + "v_proj"]
    assert hessians[a + "o_proj"] is not hessians[a + "q_proj"]
    m = "model.layers.1.mlp."
    assert hessians[m + "gate_proj"] is hessians[m + "up_proj"]
    assert hessians[m + "down_proj"].shape == (256, 256)
    # H equals 2/n X^T X collected independently.
    xs = []
    h = model.get_submodule(m + "down_proj").register_forward_hook(
        lambda _m, a_, _o: xs.append(a_[0].reshape(-1, 256))
    )
    with torch.no_grad():
        model(ids)
    h.remove()
    X = torch.cat(xs).double()
    torch.testing.assert_close(
        hessians[m + "down_proj"].double(), 2 / X.shape[0] * X.T @ X, rtol=1e-4, atol=1e-6
    )
    # Model untouched: no hooks left, train flags restored, weights identical.
    model2 = copy.deepcopy(model).train()
    model2.model.layers[0].eval()
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    GPTQBackend(calib_batch_size=3).calibrate(model2, names[:3], ids[:4])
    assert model2.training and not model2.model.layers[0].training and model2.model.layers[1].training
    assert all(not mod._forward_hooks for mod in model2.modules())
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn(tiny, hessians, bits):
    model, names, _ = tiny
    be = GPTQBackend()
    for n in names:
        lin = model.get_submodule(n)
        w0 = lin.weight.clone()
        g = be.quantize(lin, bits, calib=hessians[n])
        r = be.quantize(lin, bits, calib=torch.eye(lin.in_features))
        assert _h_error(lin, g, hessians[n]) <= _h_error(lin, r, hessians[n]), n
        assert torch.equal(lin.weight, w0)  # input linear not modified


@pytest.mark.parametrize("bits", BITS)
def test_dequant_is_the_grid_and_rtn_is_exact(tiny, bits):
    lin = tiny[0].get_submodule("model.layers.0.mlp.down_proj")
    q = GPTQBackend().quantize(lin, bits, calib=torch.eye(lin.in_features))
    codes, zeros, s = q.codes().long(), q.zeros().long(), q.scales
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    gi = torch.arange(lin.in_features) // 64
    grid_w = ((codes - zeros[gi]).float() * s[gi]).t()
    assert torch.equal(q.dequantize(), grid_w)
    # H = I is round-to-nearest on the same min/max group grid.
    W = lin.weight.detach().t()
    for g in range(lin.in_features // 64):
        sc, z = grid(W[g * 64 : (g + 1) * 64], bits, sym=False)
        torch.testing.assert_close(s[g], sc, rtol=0, atol=0)
        rq = torch.clamp(torch.round(W[g * 64 : (g + 1) * 64] / sc) + z, 0, 2**bits - 1)
        assert torch.equal(codes[g * 64 : (g + 1) * 64].float(), rq)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_forward_and_input_grad(tiny, hessians, bits, act_order):
    n = "model.layers.1.mlp.down_proj"
    lin = tiny[0].get_submodule(n)
    lin2 = nn.Linear(256, 128, bias=True)  # a biased variant of the same layer
    lin2.weight.data.copy_(lin.weight.data)
    q = GPTQBackend(act_order=act_order, sym=act_order).quantize(lin2, bits, calib=hessians[n])
    assert isinstance(q, GPTQLinear) and not any(p.requires_grad for p in q.parameters())
    W = q.dequantize()
    x = torch.randn(2, 5, 256, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    # No dequantized weight is kept alive for backward (only packed buffers, if anything).
    assert all(t.dtype == torch.int32 or t.numel() < W.numel() for t in saved)
    torch.testing.assert_close(y, F.linear(x, W, q.bias), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().requires_grad_()
    (g2,) = torch.autograd.grad(F.linear(x2, W, q.bias).square().sum(), x2)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(q(x), y.detach())


def test_peft_lora_trains_on_gptq_model(tiny, hessians):
    from peft import LoraConfig, get_peft_model

    model, names, ids = tiny
    qmodel = copy.deepcopy(model)
    be = GPTQBackend()
    for n in names:
        qmodel.set_submodule(n, be.quantize(model.get_submodule(n), 4, calib=hessians[n]))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, rank_pattern={"model.layers.1.mlp.down_proj": 2}
    )
    GPTQBackend.register_lora(cfg)
    torch.manual_seed(0)
    pm = get_peft_model(qmodel, cfg)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(names)
    assert pm.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight.shape == (2, 256)
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer, GPTQLinear)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    batch = ids[:4, :32]
    pm.train()
    losses = []
    for _ in range(3):
        loss = pm(input_ids=batch, labels=batch).loss
        loss.backward()
        assert all(p.grad is not None for n, p in pm.named_parameters() if "lora_A" in n)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)
