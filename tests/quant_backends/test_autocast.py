"""Quantized layers train under CPU autocast (bf16, fp16): forward and backward in one dtype."""

import pytest
import torch
from torch import nn

from autoqra.quant_backends import get_backend
from autoqra.quant_backends._matmul import dequant_linear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_linear_grad_matches_dense_reference(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g)
    x = torch.randn(3, 16, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = dequant_linear(x, lambda: w.t(), torch.float32)
    assert y.dtype == dtype  # like nn.Linear under autocast
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32  # the input's dtype
    ref = torch.ones(3, 24).to(dtype) @ w.to(dtype)
    torch.testing.assert_close(x.grad, ref.float())


def test_dequant_linear_without_autocast_keeps_input_dtype():
    w = torch.randn(8, 4, dtype=torch.bfloat16)
    x = torch.randn(2, 4, requires_grad=True)
    y = dequant_linear(x, lambda: w.t(), torch.bfloat16)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["hqq", "gptq", "bnb"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_layer_backward_under_autocast(backend, dtype):
    be = get_backend(backend)
    lin = nn.Linear(128, 64, bias=False)
    calib = torch.eye(128) * 2.0 if be.needs_calibration else None  # GPTQ: the layer's Hessian
    q = be.quantize(lin, 4, calib=calib)
    x = torch.randn(2, 5, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = q(x)
    y.float().pow(2).mean().backward()  # raised "expected m1 and m2 to have the same dtype" for hqq/gptq
    assert x.grad is not None and x.grad.dtype == x.dtype and torch.isfinite(x.grad).all()
