r"""The ``bnb`` backend: bitsandbytes ``Linear4bit`` (NF4/FP4) and ``Linear8bitLt`` (LLM.int8), mixable per layer.

``BitsAndBytesConfig`` is global to a model, so per-layer bits need a hand swap: this backend builds
each layer from the source weights and quantizes it on ``.to(device)``.

Byte accounting (exact, checked by the tests against ``untyped_storage().nbytes()``), with
``n = out_features * in_features`` and ``B = ceil(n / blocksize)`` blocks:

* 4 bits: packed ``ceil(n / 2)`` bytes (``uint8``, two values a byte, any shape). Metadata:
  the 16-entry fp32 code book (64 bytes, a private copy per layer) plus

  * without double quant: ``absmax`` fp32, ``4 * B`` bytes;
  * with double quant: ``absmax`` as ``uint8`` (``B`` bytes) + fp32 ``offset`` (4 bytes) + the nested
    state's fp32 ``absmax`` (``4 * ceil(B / 256)`` bytes) + its 256-entry fp32 code book (1024 bytes).
* 8 bits: packed ``n`` bytes (``int8``); metadata: the fp32 row scales ``SCB``, ``4 * out_features`` bytes.

Every code book is a per-layer copy (checked by ``data_ptr`` in the tests), so :meth:`shared_bytes` is 0.
"""

from __future__ import annotations

import logging
import math
import operator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import nn

from autoqra._optional import available, require
from autoqra.quant_backends.base import UNQUANTIZED_BITS, QuantBackend, register_backend
from autoqra.quant_backends.base import positive_int as _positive_int
from autoqra.quant_backends.base import unique_storages as _unique_storages

log = logging.getLogger(__name__)

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_CODE4_BYTES = 16 * 4  # fp32 NF4/FP4 code book, one copy per layer
_NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed blocksize for double-quantized absmax
_CODE8_BYTES = 256 * 4  # fp32 dynamic 8-bit code book of the nested state, one copy per layer
_CAST_MSG = "MatMul8bitLt: inputs will be cast from"
_FEATURE = "backend 'bnb'"


class _DropCastWarning(logging.Filter):
    """Drops bitsandbytes' per-matmul "inputs will be cast ... to float16" log line (only that one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_CAST_MSG)


def _silence_int8_cast_warning() -> None:
    lg = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastWarning) for f in lg.filters):
        lg.addFilter(_DropCastWarning())


def _quant_state_tensors(qs: Any) -> list[torch.Tensor]:
    """All tensors of a bitsandbytes ``QuantState``, nested ``state2`` included."""
    if qs is None:
        return []
    out = [v for v in vars(qs).values() if isinstance(v, torch.Tensor)]
    return out + _quant_state_tensors(getattr(qs, "state2", None))


@register_backend("bnb")
class BnbBackend(QuantBackend):
    """bitsandbytes 4-bit (``Linear4bit``) and 8-bit (``Linear8bitLt``) layers.

    Args:
        quant_type: 4-bit data type, ``"nf4"`` or ``"fp4"``.
        double_quant: quantize the 4-bit absmax values again (``compress_statistics``).
        blocksize: weights per 4-bit absmax block (32, 64, ..., 4096).
        compute_dtype: dtype of the 4-bit matmul (fp32 is fastest on CPUs without AVX512-BF16).
        threshold: LLM.int8 outlier threshold on activations for 8 bits (``0.0`` = no decomposition).

    Raises:
        ValueError: a bad option, naming the field, the value and what is allowed.
    """

    supported_bits = (4, 8)
    #: fp32, measured: SmolLM2 LoRA step, batch 4x128, dropout 0
    activation_delta = {4: -6.57, 8: -5.87}
    install_hint = "pip install bitsandbytes"
    dtype_option = "compute_dtype"

    def __init__(
        self,
        quant_type: str = "nf4",
        double_quant: bool = False,
        blocksize: int = 64,
        compute_dtype: torch.dtype = torch.float32,
        threshold: float = 0.0,
    ) -> None:
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type={quant_type!r} is invalid; allowed: 'nf4' or 'fp4'")
        if not isinstance(double_quant, bool):
            raise ValueError(f"double_quant={double_quant!r} is invalid; allowed: True or False")
        if isinstance(blocksize, bool) or blocksize not in _BLOCKSIZES:
            raise ValueError(f"blocksize={blocksize!r} is invalid; allowed: {list(_BLOCKSIZES)}")
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={compute_dtype!r} is invalid; allowed: {list(_COMPUTE_DTYPES)}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"threshold={threshold!r} is invalid; allowed: a float >= 0.0")
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.blocksize = blocksize
        self.compute_dtype = compute_dtype
        self.threshold = float(threshold)

    def is_available(self) -> bool:
        """Whether the ``bitsandbytes`` package is installed."""
        return available("bitsandbytes")

    def spec(self) -> dict[str, Any]:
        """JSON-able identity: name, all options and the bitsandbytes version."""
        try:
            lib = version("bitsandbytes")
        except PackageNotFoundError:
            lib = None
        return {
            "name": self.name,
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "blocksize": self.blocksize,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "threshold": self.threshold,
            "bitsandbytes_version": lib,
        }

    # ----------------------------------------------------------------- accounting
    def _bits(self, bits: int) -> int:
        """``bits`` as a plain int (numpy ints welcome), validated by :meth:`check_bits`."""
        try:
            b = operator.index(bits)
        except TypeError:
            raise ValueError(f"backend 'bnb' needs integer bits, got {bits!r}") from None
        self.check_bits([b])
        return b

    def weight_bytes(self, out_features: int, in_features: int, bits: int) -> tuple[int, int]:
        """Exact ``(packed_bytes, metadata_bytes)`` of one quantized layer (bias excluded).

        Args:
            out_features: rows of the weight.
            in_features: columns of the weight.
            bits: ``4``, ``8`` or ``16`` (unquantized, counted elsewhere: ``(0, 0)``).

        Returns:
            Bytes (not bits); see the module docstring for the formulas.
        """
        bits = self._bits(bits)
        out_features = _positive_int("out_features", out_features)
        in_features = _positive_int("in_features", in_features)
        if bits == UNQUANTIZED_BITS:
            return 0, 0
        n = out_features * in_features
        if bits == 8:
            return n, 4 * out_features
        blocks = math.ceil(n / self.blocksize)
        if self.double_quant:
            meta = blocks + 4 + 4 * math.ceil(blocks / _NESTED_BLOCKSIZE) + _CODE8_BYTES
        else:
            meta = 4 * blocks
        return math.ceil(n / 2), meta + _CODE4_BYTES

    # --------------------------------------------------------------- quantization
    def quantize(self, linear: nn.Linear, bits: int, calib: torch.Tensor | None = None) -> nn.Module:
        """Return a ``Linear4bit`` (bits 4) or ``Linear8bitLt`` (bits 8) on ``linear``'s device.

        ``linear`` is not modified (its bias is copied). Bits ``16`` returns ``linear`` itself.
        """
        bits = self._bits(bits)
        if bits == UNQUANTIZED_BITS:
            return linear
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"backend 'bnb' quantizes nn.Linear modules, got {type(linear).__name__}")
        bnb = require("bitsandbytes", _FEATURE)

        device = linear.weight.device
        w = linear.weight.detach()
        has_bias = linear.bias is not None
        if bits == 4:
            q = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                compute_dtype=self.compute_dtype,
                compress_statistics=self.double_quant,
                quant_type=self.quant_type,
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                w,
                requires_grad=False,
                blocksize=self.blocksize,
                compress_statistics=self.double_quant,
                quant_type=self.quant_type,
                module=q,
            )
        else:
            _silence_int8_cast_warning()
            q = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=self.threshold,
                device="meta",
            )
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        if has_bias:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if bits == 8 and device.type != "cpu":
            q.weight = q.weight._quantize(device)  # Int8Params.to() quantizes only when moving off the CPU
        else:
            q = q.to(device)  # quantizes here
        if bits == 4:
            # Keep the storage layout fixed: bnb repacks 4-bit weights for AVX512-BF16 CPUs at the first
            # no-grad eval forward, which would change the byte count measured after inference.
            q.support_avx512bf16_for_cpu = False
        return q

    # ------------------------------------------------------------------ inspection
    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``."""
        if not self.is_available():
            return False
        bnb = require("bitsandbytes", _FEATURE)

        return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))

    def module_tensors(self, module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``(packed, metadata, other)`` live tensors of one owned module.

        4 bits: ``[weight]``, every tensor of ``weight.quant_state`` (absmax, code, offset, nested
        absmax and code). 8 bits: ``[weight]`` (= ``CB``), ``[SCB]`` wherever it lives (the weight
        before the first forward, ``module.state`` after). ``other``: the bias and any transient
        tensor ``module.state`` keeps (e.g. outlier indices after an eval forward with threshold > 0).
        """
        bnb = require("bitsandbytes", _FEATURE)

        w = module.weight
        other = [module.bias] if module.bias is not None else []
        if isinstance(module, bnb.nn.Linear4bit):
            qs = getattr(w, "quant_state", None) or module.quant_state
            packed, meta = [w], _quant_state_tensors(qs)
        else:
            st = module.state
            packed = [t for t in (w, getattr(w, "CB", None), st.CB) if t is not None]
            meta = [t for t in (getattr(w, "SCB", None), st.SCB) if t is not None]
            other += [
                v for k, v in vars(st).items() if isinstance(v, torch.Tensor) and k not in ("CB", "SCB")
            ]
        packed = _unique_storages(packed)
        meta = _unique_storages(meta)
        seen = {t.untyped_storage().data_ptr() for t in packed + meta}
        return packed, meta, [t for t in _unique_storages(other) if t.untyped_storage().data_ptr() not in seen]

    # -------------------------------------------------------------- serialization
    def export_module(self, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """bitsandbytes' own state: packed weight + quant_state tensors (4 bits) or int8 weight + SCB (8 bits)."""
        bnb = require("bitsandbytes", _FEATURE)

        tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
        tensors.pop("weight_format", None)
        four = isinstance(module, bnb.nn.Linear4bit)
        meta = {"bits": 4 if four else 8, "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
        if four:
            meta["compute_dtype"] = str(module.compute_dtype).removeprefix("torch.")
        else:
            meta["threshold"] = float(module.state.threshold)
        return tensors, meta

    def load_module(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: str = "cpu") -> nn.Module:
        bnb = require("bitsandbytes", _FEATURE)

        in_f, out_f, has_bias = int(meta["in_features"]), int(meta["out_features"]), bool(meta["bias"])
        t = {k: v.to(device) for k, v in tensors.items()}
        if int(meta["bits"]) == 4:
            dtype = getattr(torch, str(meta.get("compute_dtype", "float32")))
            if dtype not in _COMPUTE_DTYPES:
                raise ValueError(f"unsupported bitsandbytes compute dtype {meta.get('compute_dtype')!r}")
            stats = {k.removeprefix("weight."): v for k, v in t.items() if k.startswith("weight.")}
            q = bnb.nn.Linear4bit(in_f, out_f, bias=has_bias, compute_dtype=dtype, device="meta")
            q.weight = bnb.nn.Params4bit.from_prequantized(t["weight"], stats, requires_grad=False, device=device,
                                                           module=q)
            q.support_avx512bf16_for_cpu = False
        else:
            _silence_int8_cast_warning()
            q = bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False,
                                    threshold=float(meta.get("threshold", 0.0)), device="meta")
            w = bnb.nn.Int8Params(t["weight"], requires_grad=False, has_fp16_weights=False)
            w.CB, w.SCB = w.data, t["SCB"]
            q.weight = w
        if has_bias:
            q.bias = nn.Parameter(t["bias"], requires_grad=False)
        return q

    def prepare_for_peft(self, model: nn.Module) -> None:
        """Set the flags peft's bitsandbytes dispatch reads, so LoRA uses its bnb layer classes.

        peft (``tuners/lora/model.py``) passes ``loaded_in_4bit=model.is_loaded_in_4bit`` and
        ``loaded_in_8bit=model.is_loaded_in_8bit`` to ``dispatch_bnb_4bit`` / ``dispatch_bnb_8bit``; without
        them a hand-swapped ``Linear4bit``/``Linear8bitLt`` falls through to the generic ``lora.Linear``.
        Both dispatchers also check the layer type, so setting both flags on a mixed model is safe.
        """
        bnb = require("bitsandbytes", _FEATURE)

        mods = list(model.modules())
        if any(isinstance(m, bnb.nn.Linear4bit) for m in mods):
            model.is_loaded_in_4bit = True
        if any(isinstance(m, bnb.nn.Linear8bitLt) for m in mods):
            model.is_loaded_in_8bit = True
