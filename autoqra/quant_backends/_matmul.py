r"""``x @ W^T`` for quantized layers that dequantize on the fly, correct under autocast.

A quantized layer keeps packed codes and dequantizes ``W`` in its *compute dtype* for every matmul.
Under ``torch.autocast`` (bf16/fp16 training) the forward matmul runs in the autocast dtype, but
``backward()`` runs outside the autocast block: multiplying the (bf16) output gradient by an fp32
dequantized weight fails with "expected m1 and m2 to have the same dtype" (hqq's own
``HQQMatmulNoCacheMul`` does exactly that). :func:`dequant_linear` fixes the dtype once, in forward:

* the matmul dtype is the autocast dtype when autocast is on for ``x``'s device, else the
  layer's compute dtype;
* forward and backward both run with autocast off, on ``x`` / the gradient cast to that dtype
  and on ``W`` dequantized and cast to it;
* the input gradient comes back in ``x``'s dtype (what autograd expects); the output is in the
  matmul dtype under autocast (like ``nn.Linear``) and in ``x``'s dtype otherwise.

Nothing but the packed buffers is kept between forward and backward: ``W`` is dequantized again in
backward, so training never holds a dequantized copy of every layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Dequant = Callable[[], torch.Tensor]  # returns W^T, (in_features, out_features)


def matmul_dtype(x: torch.Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype if autocast is on for ``x``'s device type, else ``compute_dtype``."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return compute_dtype


class _DequantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dequant_t: Dequant, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        ctx.dequant_t, ctx.dtype, ctx.x_dtype = dequant_t, dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return x.to(dtype) @ dequant_t().to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        with torch.autocast(grad.device.type, enabled=False):
            gi = grad.to(ctx.dtype) @ ctx.dequant_t().to(ctx.dtype).t()
        return gi.to(ctx.x_dtype), None, None


def dequant_linear(
    x: torch.Tensor, dequant_t: Dequant, compute_dtype: torch.dtype, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W^T + bias`` with ``W^T = dequant_t()``; see the module docstring for dtypes.

    Args:
        x: input ``(..., in_features)``.
        dequant_t: returns the dequantized transposed weight ``(in_features, out_features)``.
        compute_dtype: the layer's dtype (used when autocast is off).
        bias: optional ``(out_features,)``.
    """
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = matmul_dtype(x, compute_dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        y = _DequantMatmul.apply(x, dequant_t, dtype)
    else:
        with torch.autocast(x.device.type, enabled=False):
            y = x.to(dtype) @ dequant_t().to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y if autocast else y.to(x.dtype)
