r"""``HQQLinear`` with a forward that is correct under autocast (imported only when hqq is installed).

hqq's PyTorch-backprop forward (``HQQMatmulNoCacheMul``) multiplies the bf16 output gradient of an
autocast forward by the fp32 dequantized weight in backward and fails. :class:`HQQLinear` here keeps
hqq's storage, quantizer and state dict unchanged and only replaces ``forward`` with
:func:`~autoqra.quant_backends._matmul.dequant_linear` (dequantize in forward and again in backward,
one matmul dtype for both). peft still wraps it as ``HqqLoraLinear`` (it checks ``isinstance``).
"""

from __future__ import annotations

import torch

from autoqra._optional import require
from autoqra.quant_backends._matmul import dequant_linear

_hqq = require("hqq.core.quantize", "backend 'hqq'")


class HQQLinear(_hqq.HQQLinear):
    """An ``hqq.core.quantize.HQQLinear`` whose forward runs through :func:`dequant_linear`.

    It keeps the class name ``HQQLinear`` because peft recognises hqq layers partly by class name
    (``_get_in_out_features``) and warns "Unsupported layer type" for any other name.
    """

    @classmethod
    def set_backend(cls, backend) -> None:  # noqa: ANN001 - hqq's signature
        """Keep this class's forward (hqq's ``__init__`` calls this and would replace ``cls.forward``)."""

    def _dequant_t(self) -> torch.Tensor:
        return self.dequantize().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return dequant_linear(x, self._dequant_t, self.compute_dtype, self.bias)


class HQQEmbedding(HQQLinear):
    """A token embedding whose ``(vocab, hidden)`` weight is an HQQ-quantized matrix (``axis=1``).

    ``forward(ids)`` gathers only the packed rows it looks up (4 or 8 bits) and dequantizes those:
    no dequantized copy of the table is kept or built. The same storage serves a tied output head
    (:meth:`head`): an ``HQQLinear`` sharing ``W_q`` and the scales/zeros, i.e. the dequantize-matmul.
    """

    padding_idx: int | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return embed_rows(self, ids)

    def head(self) -> HQQLinear:
        """An ``HQQLinear`` over this embedding's storage (the tied output head)."""
        h = HQQLinear.__new__(HQQLinear)
        h.__dict__.update(self.__dict__)
        h._parameters = dict(self._parameters)
        h._buffers = dict(self._buffers)
        h._modules = dict(self._modules)
        h.__dict__.pop("padding_idx", None)
        return h


def embed_rows(q: HQQLinear, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the dequantized ``(vocab, hidden)`` weight of ``q`` (``axis=1`` grouping, 4 or 8 bits)."""
    meta = q.meta
    nbits, g = int(meta["nbits"]), int(meta["group_size"])
    vocab, hidden = meta["shape"]
    k = hidden // g  # groups per row
    flat = ids.reshape(-1).long()
    gi = flat[:, None] * k + torch.arange(k, device=flat.device)  # (N, k) group indices
    w = q.W_q
    if nbits == 8:
        vals = w[gi]
    elif nbits == 4:
        half = w.shape[0]
        packed = w[gi % half]
        vals = torch.where((gi < half)[..., None], packed >> 4, packed & 0xF)
    else:  # pragma: no cover - the backend offers 4 and 8 bits only
        raise ValueError(f"quantized embedding lookup supports 4 and 8 bits, not {nbits}")
    scale = meta["scale"].reshape(-1)[gi][..., None]
    zero = meta["zero"].reshape(-1)[gi][..., None]
    rows = (vals.to(scale.dtype) - zero) * scale
    return rows.reshape(*ids.shape, hidden).to(q.compute_dtype)
