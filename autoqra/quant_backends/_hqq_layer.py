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
