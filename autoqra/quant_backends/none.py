r"""The ``none`` backend: no quantization ("16-bit LoRA"); weights stay in the model's dtype."""

from __future__ import annotations

import torch
from torch import nn

from autoqra.quant_backends.base import QuantBackend, register_backend


@register_backend("none")
class NoneBackend(QuantBackend):
    """Leaves every layer unquantized. Only bits ``16`` is allowed."""

    supported_bits = ()

    def quantize(self, linear: nn.Linear, bits: int, calib=None) -> nn.Module:
        self.check_bits([bits])
        return linear

    def weight_bytes(self, out_features: int, in_features: int, bits: int) -> tuple[int, int]:
        self.check_bits([bits])
        return 0, 0  # unquantized weights are counted as unquantized parameters

    def owns(self, module: nn.Module) -> bool:
        return False

    def module_tensors(self, module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        return [], [], []
