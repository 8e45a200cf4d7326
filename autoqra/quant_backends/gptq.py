r"""The ``gptq`` backend: pure-torch GPTQ (Frantar et al., 2023) into a real packed int32 format.

Calibration is **one-shot**: :meth:`GPTQBackend.calibrate` runs the *unquantized* model once and
collects every linear's Hessian ``H = 2/n X^T X`` from unquantized block inputs. The reference
GPTQ is sequential (block ``l``'s inputs come from the already-quantized blocks ``< l``); the
one-shot variant makes a quantized layer a function of ``(module, bits)`` only, so it can be
cached and reused across every candidate bit assignment of a search.

LoRA: peft does not know :class:`GPTQLinear`, so a ``LoraConfig`` must map it to peft's
``GPTQLoraLinear`` (a base-layer-agnostic LoRA wrapper without merging)::

    cfg = LoraConfig(target_modules=[...], rank_pattern={...})
    GPTQBackend.register_lora(cfg)            # cfg._register_custom_module({GPTQLinear: GPTQLoraLinear})
    peft_model = get_peft_model(qmodel, cfg)

The mapping is not serialized with the adapter; register it again before loading an adapter.

The Hessian collection of :meth:`GPTQBackend.calibrate` (and :class:`ExpertHessians`) is in
:mod:`autoqra.quant_backends._gptq_calib`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft.tuners.lora.gptq import GPTQLoraLinear
from torch import nn

from autoqra._optional import available, require
from autoqra.quant_backends._gptq_calib import ExpertHessians, collect_hessians
from autoqra.quant_backends._gptq_layer import GPTQLinear, gptq_solve, n_words
from autoqra.quant_backends.base import UNQUANTIZED_BITS, QuantBackend, register_backend

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@register_backend("gptq")
class GPTQBackend(QuantBackend):
    """GPTQ with per-group asymmetric (or symmetric) min/max grids, stored packed like GPTQ checkpoints.

    Args:
        group_size: input columns sharing one scale/zero (must divide every quantized layer's ``in_features``).
        block_size: GPTQ's lazy-batch column block (speed only; rounded up to a multiple of ``group_size``).
        damp: Hessian dampening, as a fraction of ``mean(diag(H))`` (raised automatically if needed).
        act_order: quantize columns by descending ``diag(H)``; stores ``g_idx`` (4 bytes per input column).
        sym: symmetric grid (zero point fixed at ``2**(bits-1)``; still stored in ``qzeros``).
        use_gptqmodel: solve with ``gptqmodel``'s GPTQ implementation instead (optional library,
            experimental; the stored format is the same). Default: pure torch.
        dtype: compute dtype of scales, bias and the dequantized weight (``"float32"`` on CPU).
        calib_batch_size: sequences per forward pass in :meth:`calibrate` (bounds activation memory).
    """

    supported_bits = (2, 3, 4, 8)
    #: fp32, measured: SmolLM2 LoRA step, batch 4x128, dropout 0 (tiny Llama: -5.1)
    activation_delta = {b: -6.48 for b in (2, 3, 4, 8)}
    needs_calibration = True
    install_hint = "pip install gptqmodel  (only needed for use_gptqmodel=True)"

    def __init__(
        self,
        group_size: int = 64,
        block_size: int = 128,
        damp: float = 0.01,
        act_order: bool = False,
        sym: bool = False,
        use_gptqmodel: bool = False,
        dtype: str = "float32",
        calib_batch_size: int = 4,
    ) -> None:
        for field, v in (
            ("group_size", group_size),
            ("block_size", block_size),
            ("calib_batch_size", calib_batch_size),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{field}={v!r} is invalid; allowed: a positive integer")
        if not 0.0 < float(damp) < 1.0:
            raise ValueError(f"damp={damp!r} is invalid; allowed: a float in (0, 1)")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is invalid; allowed: {sorted(_DTYPES)}")
        self.group_size, self.block_size, self.damp = group_size, block_size, float(damp)
        self.act_order, self.sym, self.use_gptqmodel = bool(act_order), bool(sym), bool(use_gptqmodel)
        self.dtype, self.calib_batch_size = dtype, calib_batch_size

    def is_available(self) -> bool:
        """Always true for the pure-torch path; with ``use_gptqmodel`` whether ``gptqmodel`` is installed."""
        return not self.use_gptqmodel or available("gptqmodel")

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name, "group_size": self.group_size, "block_size": self.block_size, "damp": self.damp,
            "act_order": self.act_order, "sym": self.sym, "use_gptqmodel": self.use_gptqmodel, "dtype": self.dtype,
        }  # fmt: skip

    def _check_shape(self, in_features: int) -> None:
        if in_features % self.group_size:
            raise ValueError(
                f"in_features={in_features} is not divisible by group_size={self.group_size}; "
                "choose a group_size that divides every quantized layer's in_features"
            )

    # ---------------------------------------------------------------- bytes
    def weight_bytes(self, out_features: int, in_features: int, bits: int) -> tuple[int, int]:
        """Exact bytes of one :class:`GPTQLinear`, bias excluded.

        ``packed = 4 * out * ceil(in * bits / 32)``;
        ``meta = n_groups * out * itemsize(dtype) + 4 * n_groups * ceil(out * bits / 32) (+ 4 * in with act_order)``,
        with ``n_groups = in / group_size``.
        """
        self.check_bits([bits])
        if bits == UNQUANTIZED_BITS:
            return 0, 0
        self._check_shape(in_features)
        n_groups = in_features // self.group_size
        packed = 4 * out_features * n_words(in_features, bits)
        meta = n_groups * out_features * _DTYPES[self.dtype].itemsize + 4 * n_groups * n_words(
            out_features, bits
        )
        return packed, meta + (4 * in_features if self.act_order else 0)

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, GPTQLinear)

    def module_tensors(
        self, module: nn.Module
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        meta = [module.scales, module.qzeros] + ([module.g_idx] if module.g_idx is not None else [])
        return [module.qweight], meta, ([module.bias] if module.bias is not None else [])

    # ---------------------------------------------------------------- serialization
    def export_module(self, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The packed GPTQ buffers (``qweight``, ``qzeros``, ``scales``, ``g_idx``) and the bias."""
        tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        meta = {"in_features": module.in_features, "out_features": module.out_features, "bits": module.bits,
                "group_size": module.group_size, "bias": module.bias is not None, "act_order": module.g_idx is not None,
                "dtype": str(module.scales.dtype).removeprefix("torch.")}
        return tensors, meta

    def load_module(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: str = "cpu") -> nn.Module:
        dtype = str(meta["dtype"])
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported GPTQ dtype {dtype!r}")
        bits = int(meta["bits"])
        self.check_bits([bits])
        m = GPTQLinear(int(meta["in_features"]), int(meta["out_features"]), bits, int(meta["group_size"]),
                       bool(meta["bias"]), bool(meta["act_order"]), _DTYPES[dtype], device="meta")
        m.load_state_dict({k: v.to(device) for k, v in tensors.items()}, assign=True)
        if m.bias is not None:
            m.bias.requires_grad_(False)
        return m

    # ---------------------------------------------------------------- calibration
    @torch.no_grad()
    def calibrate(
        self, model: nn.Module, module_names: list[str], calib_ids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One forward pass of the unquantized ``model`` collecting ``H = 2/n X^T X`` per named linear.

        One-shot variant (see the module docstring): inputs come from the unquantized model, so each
        result depends only on the module, and ``quantize(module, bits, calib=H)`` can be cached per
        ``(module, bits)``. Runs ``calib_batch_size`` sequences at a time; linears fed the very same
        input tensor (q/k/v, gate/up) share one ``H`` object. The model is not modified: hooks are
        removed and every submodule's train/eval flag is restored.

        Args:
            model: the unquantized source model (HF causal LM or any module taking ``input_ids``).
            module_names: full names of ``nn.Linear`` modules.
            calib_ids: ``(n_seq, seq_len)`` token ids (no padding).

        Sums are accumulated on the activations' device (fast), and each finished ``H`` is moved to
        the CPU: all Hessians of an 8B model are ~33 GB, too much to keep on a GPU next to it.
        :meth:`quantize` moves one ``H`` at a time to the linear's device while solving.

        Returns:
            ``{name: H}``; ``H`` is fp32 ``(in_features, in_features)`` on the **CPU** (aliased
            linears share one tensor).
        """
        return collect_hessians(model, module_names, calib_ids, self.calib_batch_size)

    # ---------------------------------------------------------------- quantization
    def quantize(self, linear: nn.Linear, bits: int, calib: torch.Tensor | None = None) -> nn.Module:
        """GPTQ-quantize ``linear`` (not modified) into a new :class:`GPTQLinear`.

        Args:
            linear: a frozen ``nn.Linear``.
            bits: 2, 3, 4 or 8 (16 returns ``linear`` itself, unquantized).
            calib: this module's Hessian from :meth:`calibrate` (on the CPU, or any device: it is
                copied to ``linear.weight``'s device for the solve and not modified).
                ``torch.eye(in_features)`` gives exactly round-to-nearest with the same grouping.
        """
        self.check_bits([bits])
        if bits == UNQUANTIZED_BITS:
            return linear
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"GPTQ quantizes nn.Linear modules, got {type(linear).__name__}")
        self._check_shape(linear.in_features)
        if calib is None:
            raise ValueError(
                "the gptq backend needs calibration: pass calib=<Hessian from GPTQBackend.calibrate>"
            )
        if tuple(calib.shape) != (linear.in_features, linear.in_features):
            raise ValueError(
                f"calib Hessian has shape {tuple(calib.shape)}, expected ({linear.in_features},) * 2"
            )
        if self.use_gptqmodel:
            codes, scales, zeros, g_idx = self._solve_gptqmodel(linear, bits, calib)
        else:
            codes, scales, zeros, g_idx = gptq_solve(
                linear.weight,
                calib,
                bits,
                self.group_size,
                self.block_size,
                self.damp,
                self.act_order,
                self.sym,
            )
        return GPTQLinear.from_codes(
            codes, scales, zeros, g_idx, bits, self.group_size, linear.bias, dtype=_DTYPES[self.dtype]
        )

    def _solve_gptqmodel(self, linear: nn.Linear, bits: int, H: torch.Tensor):
        """Experimental: run ``gptqmodel``'s GPTQ solver, then recover integer codes from its grid."""
        feature = "backend 'gptq' with use_gptqmodel=True"
        QuantizeConfig = require("gptqmodel", feature).QuantizeConfig
        GPTQ = require("gptqmodel.quantization.gptq", feature).GPTQ

        lin = copy.deepcopy(linear).float()
        cfg = QuantizeConfig(bits=bits, group_size=self.group_size, sym=self.sym, desc_act=self.act_order)
        g = GPTQ(lin, qcfg=cfg)
        g.H, g.nsamples = H.detach().to(device=lin.weight.device, dtype=torch.float32, copy=True), 1
        scale, zero, g_idx, *_ = g.hf_quantize(
            blocksize=self.block_size, percdamp=self.damp, group_size=self.group_size, actorder=self.act_order
        )
        n_groups, out_f = linear.in_features // self.group_size, linear.out_features
        scale = scale.reshape(-1, n_groups).t() if scale.shape[0] == out_f else scale.reshape(n_groups, out_f)
        zero = zero.reshape(-1, n_groups).t() if zero.shape[0] == out_f else zero.reshape(n_groups, out_f)
        gi = g_idx.long() if self.act_order else torch.arange(linear.in_features) // self.group_size
        WT = lin.weight.detach().t()
        codes = torch.round(WT / scale[gi] + zero[gi]).clamp(0, 2**bits - 1)
        if not torch.allclose((codes - zero[gi]) * scale[gi], WT, atol=1e-5, rtol=1e-4):
            raise RuntimeError(
                "gptqmodel returned a grid this backend cannot represent; use use_gptqmodel=False"
            )
        gidx = g_idx.to(torch.int32) if self.act_order else None
        return codes.to(torch.int32), scale.float(), zero.round().to(torch.int32), gidx

    # ---------------------------------------------------------------- peft
    @staticmethod
    def lora_custom_modules() -> dict[type[nn.Module], type[nn.Module]]:
        """The ``{GPTQLinear: LoRA layer class}`` mapping for ``LoraConfig._register_custom_module``."""
        return {GPTQLinear: GPTQLoraLinear}

    @classmethod
    def register_lora(cls, lora_config: Any) -> Any:
        """Register :class:`GPTQLinear` on a peft ``LoraConfig`` (in place) so ``get_peft_model`` can wrap it."""
        lora_config._register_custom_module(cls.lora_custom_modules())
        return lora_config


__all__ = ["ExpertHessians", "GPTQBackend", "GPTQLinear"]
