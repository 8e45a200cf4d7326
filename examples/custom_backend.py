"""A new quantization backend registered and used by name: plain round-to-nearest, stored as int8 codes.

Weights are quantized per output row (asymmetric, fp32 scale and zero per row) into uint8 codes,
so every supported width (4 and 8 bits) takes 1 byte per weight: `weight_bytes` says exactly that,
and the memory model stays byte-exact for this backend too.

    python examples/custom_backend.py        # tiny model, ~1 min
"""

import torch
from torch import nn

import autoqra
from autoqra.quant_backends import QuantBackend, generic_lora_class, register_backend


class RTNLinear(nn.Module):
    def __init__(self, linear: nn.Linear, bits: int) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
        scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
        # a frozen Parameter (not a buffer): peft looks up a layer's device through its parameters
        self.codes = nn.Parameter(torch.round((w - lo) / scale).to(torch.uint8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", lo)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return nn.functional.linear(x, self.codes.float() * self.scale + self.zero)


@register_backend("rtn8")
class RTNBackend(QuantBackend):
    supported_bits = (4, 8)

    def quantize(self, linear, bits, calib=None):
        self.check_bits([bits])
        return RTNLinear(linear, bits)

    def weight_bytes(self, out_features, in_features, bits):
        return out_features * in_features, 2 * 4 * out_features  # uint8 codes | fp32 scale + zero per row

    @staticmethod
    def lora_custom_modules():
        return {RTNLinear: generic_lora_class()}  # peft's LoRA wrapper for any quantized layer

    def owns(self, module):
        return isinstance(module, RTNLinear)

    def module_tensors(self, module):
        return [module.codes], [module.scale, module.zero], []


def main() -> None:
    model = autoqra.models.tiny_llama()
    space = autoqra.SearchSpace.from_model(model, bits=(4, 8), ranks=(0, 8))
    a = space.make([4, 8], [8, 0])
    pm = autoqra.apply_assignment(model, a, "rtn8", space=space)
    pred = autoqra.MemoryModel(model, space, "rtn8").predict(a).model_bytes
    print("predicted", pred, "measured", autoqra.measure_memory(pm).model_bytes)
    res = autoqra.optimize(model, "8bit", config={"backend": "rtn8"}, preset="tiny", bits=(4, 8), ranks=(0, 8),
                           train=autoqra.TrainSpec(batch_size=2, seq_len=32, lr=2e-3), eval_blocks=4, progress=False)
    print(res.summary())


if __name__ == "__main__":
    main()
