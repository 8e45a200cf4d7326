r"""GPTQ internals: the GPTQ solver and the packed :class:`GPTQLinear` module.

The storage format (``qweight``, ``scales``, ``qzeros``, ``g_idx``) and its exact bit packing are
described in :mod:`autoqra.quant_backends._gptq_pack`. Dequantization:
``W[o, k] = (q[k, o] - z[g(k), o]) * s[g(k), o]``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from autoqra.quant_backends._gptq_pack import n_words, pack_rows, unpack_rows
from autoqra.quant_backends._matmul import dequant_linear

log = logging.getLogger(__name__)


def grid(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column min/max quantization grid of a group ``x`` ``(group, out)``.

    Returns:
        ``(scale, zero)``, each ``(out,)``; ``zero`` holds integer codes in ``[0, 2**bits - 1]``
        (as floats). The range always contains 0 (as in GPTQ); all-zero columns get range [-1, 1].
    """
    maxq = 2**bits - 1
    xmin = x.amin(0).clamp(max=0)
    xmax = x.amax(0).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _inverse_hessian_chol(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising ``damp`` until it factors."""
    H = H.to(torch.float64)
    mean = H.diagonal().mean().clamp(min=1e-12)
    d = damp
    while True:
        H2 = H.clone()
        H2.diagonal().add_(d * mean)
        # chol(J H J) = M M^T (J reverses the order) gives H = R R^T with R = J M J upper
        # triangular, so H^-1 = U^T U with U = R^-1 = J M^-1 J: one Cholesky plus one triangular
        # solve (torch.cholesky_inverse is pathologically slow on some CPU builds).
        M, info = torch.linalg.cholesky_ex(H2.flip(0, 1))
        if int(info) == 0:
            eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            U = torch.linalg.solve_triangular(M, eye, upper=False).flip(0, 1)
            if bool(torch.isfinite(U).all()):
                return U.to(torch.float32)
        if d >= 1.0:
            raise RuntimeError(f"GPTQ: Hessian is not positive definite even with damp={d}")
        log.warning("GPTQ: Hessian not positive definite with damp=%g; retrying with %g", d, d * 10)
        d = min(d * 10, 1.0)


@torch.no_grad()
def gptq_solve(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    sym: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ (Frantar et al. 2023) for one weight matrix.

    Columns (input features) are quantized in order (by descending ``diag(H)`` with ``act_order``);
    each column's rounding error is spread over the not-yet-quantized columns through the upper
    Cholesky factor of the damped inverse Hessian, lazily batched in blocks of ``block_size``
    columns. A group's min/max grid is computed when its first column is reached, from the already
    error-corrected weights. ``block_size`` is rounded up to a multiple of ``group_size`` so a
    group never straddles a block (the lazy batching only changes speed, not the math).
    Dead input columns (``H[k, k] == 0``) get ``H[k, k] = 1`` and plain round-to-nearest; unlike the
    reference code their weights are kept rather than zeroed, so inputs unseen in calibration are
    still served. With ``H = I`` the result is exactly round-to-nearest with the same grouping.

    Args:
        weight: ``(out, in)`` float weight (not modified).
        H: ``(in, in)`` Hessian ``2/n X^T X`` (not modified).
        bits: code width. group_size: input columns per scale/zero group (divides ``in``).

    Returns:
        ``(codes (in, out) int32, scales (n_groups, out) fp32, zeros (n_groups, out) int32,
        g_idx (in,) int32 or None)``, with ``codes`` in the original column order.
    """
    out_f, in_f = weight.shape
    maxq = 2**bits - 1
    # (in, out), always a private copy: a weight column is a contiguous row.
    WT = weight.detach().t().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    H = H.detach().to(device=WT.device, dtype=torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        WT, H = WT[perm], H[perm][:, perm]
    Hinv = _inverse_hessian_chol(H, damp)
    del H
    n_groups = in_f // group_size
    scales = torch.empty(n_groups, out_f, dtype=torch.float32, device=WT.device)
    zeros = torch.empty_like(scales)
    Q = torch.empty(in_f, out_f, dtype=torch.float32, device=WT.device)
    blk = max(group_size, (block_size + group_size - 1) // group_size * group_size)
    # Row k of Hinv divided by Hinv[k, k]: errors then need no per-column division.
    Hs = Hinv / Hinv.diagonal()[:, None]
    del Hinv
    s = z = None
    for i1 in range(0, in_f, blk):
        i2 = min(i1 + blk, in_f)
        W1 = WT[i1:i2].clone()
        E1 = torch.empty_like(W1)
        w_rows, e_rows, q_rows = W1.unbind(0), E1.unbind(0), Q[i1:i2].unbind(0)
        h_rows = Hs[i1:i2, i1:i2].unbind(0)
        for i in range(i2 - i1):
            if (i1 + i) % group_size == 0:
                g = (i1 + i) // group_size
                s, z = grid(W1[i : i + group_size], bits, sym)
                scales[g], zeros[g] = s, z
            q, e, w = q_rows[i], e_rows[i], w_rows[i]
            torch.div(w, s, out=q).round_().add_(z).clamp_(0, maxq)
            torch.addcmul(w, torch.sub(z, q, out=e), s, out=e)  # e = w - (q - z) * s
            if i + 1 < i2 - i1:
                W1[i + 1 :].addr_(h_rows[i][i + 1 :], e, alpha=-1.0)
        if i2 < in_f:
            WT[i2:].addmm_(Hs[i1:i2, i2:].t(), E1, alpha=-1.0)
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[inv]
        g_idx = (inv // group_size).to(torch.int32)
    return Q.to(torch.int32), scales, zeros.to(torch.int32), g_idx


class GPTQLinear(nn.Module):
    """A linear layer stored in the packed GPTQ format (see the module docstring).

    The forward dequantizes with plain torch ops and runs a dense matmul, so it works on any
    device and is differentiable w.r.t. its input (the packed weights are frozen buffers).
    Nothing is cached: the dequantized weight exists only during a forward/backward call.

    Args:
        in_features, out_features: layer shape. bits: 2, 3, 4 or 8. group_size: divides ``in_features``.
        bias: whether the layer has a bias (a frozen ``Parameter`` in the compute dtype).
        act_order: allocate ``g_idx`` (columns quantized in activation order).
        dtype: compute dtype (scales, bias, dequantized weight). device: where buffers live.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        act_order: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not divisible by group_size={group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n_groups = in_features // group_size
        kw = {"device": device}
        self.register_buffer(
            "qweight", torch.zeros(n_words(in_features, bits), out_features, dtype=torch.int32, **kw)
        )
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=dtype, **kw))
        self.register_buffer(
            "qzeros", torch.zeros(n_groups, n_words(out_features, bits), dtype=torch.int32, **kw)
        )
        self.g_idx: torch.Tensor | None
        if act_order:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        else:
            self.g_idx = None
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None
        )

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor | None,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> GPTQLinear:
        """Build a layer from solver output (``codes (in, out)``, ``scales``/``zeros (n_groups, out)``)."""
        in_f, out_f = codes.shape
        m = cls(in_f, out_f, bits, group_size, bias is not None, g_idx is not None, dtype, codes.device)
        m.qweight.copy_(pack_rows(codes, bits))
        m.scales.copy_(scales)
        m.qzeros.copy_(pack_rows(zeros.t(), bits).t())
        if g_idx is not None:
            m.g_idx.copy_(g_idx)
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    @property
    def infeatures(self) -> int:
        """Alias of ``in_features`` (auto-gptq's QuantLinear name; peft then recognizes the shape silently)."""
        return self.in_features

    @property
    def outfeatures(self) -> int:
        """Alias of ``out_features``."""
        return self.out_features

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of the dequantized weight (peft reads this to place LoRA adapters)."""
        return self.scales.dtype

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes ``(in, out)`` (int32)."""
        return unpack_rows(self.qweight, self.in_features, self.bits)

    def zeros(self) -> torch.Tensor:
        """Unpacked zero points ``(n_groups, out)`` (int32)."""
        return unpack_rows(self.qzeros.t(), self.out_features, self.bits).t()

    def dequantize_t(self) -> torch.Tensor:
        """Dequantized transposed weight ``W^T`` ``(in, out)`` in the compute dtype (a fresh tensor)."""
        dt = self.scales.dtype
        q = self.codes().to(dt)
        z, s = self.zeros().to(dt), self.scales
        if self.g_idx is not None:
            gi = self.g_idx.long()
            return q.sub_(z[gi]).mul_(s[gi])
        gs = self.group_size
        return q.view(-1, gs, self.out_features).sub_(z[:, None]).mul_(s[:, None]).view(self.in_features, -1)

    def dequantize(self) -> torch.Tensor:
        """Dequantized weight ``(out, in)`` in the compute dtype, laid out like ``nn.Linear.weight``."""
        return self.dequantize_t().t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequant_linear(x, self.dequantize_t, self.scales.dtype, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, act_order={self.g_idx is not None}"
        )


__all__ = ["GPTQLinear", "gptq_solve", "grid", "n_words", "pack_rows", "unpack_rows"]
