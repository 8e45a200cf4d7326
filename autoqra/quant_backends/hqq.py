r"""The ``hqq`` backend: Half-Quadratic Quantization (calibration-free), one ``HQQLinear`` per layer.

Layers are swapped by hand (``nn.Linear`` -> ``hqq.core.quantize.HQQLinear``) because transformers 5.x
has no working ``HqqConfig`` and ``HqqConfig`` cannot set bits per layer index anyway.

Byte accounting (exact, checked by the tests against ``untyped_storage().nbytes()``): with
``n = out_features * in_features``, ``G = n / group_size`` groups and ``g = group_size``, hqq reshapes
the weight to ``(G, g)`` (``axis=1``) or ``(g, G)`` (``axis=0``) and bit-packs along dim 0, whose
length we call ``P`` (``G`` or ``g``); the other dim is ``Q``.

=========  ====================  ==============================================
bits       storage               packed bytes
=========  ====================  ==============================================
8, 6, 5    ``uint8``, 1 value    ``P * Q``  (5/6 bits are stored as 8 bits: no saving)
4          ``uint8``, 2 values   ``P / 2 * Q``   (``P`` must be even)
3          ``int32``, 10 values  ``ceil(P / 10) * Q * 4``   (rows zero-padded to a multiple of 10)
2          ``uint8``, 4 values   ``P / 4 * Q``   (``P`` must be a multiple of 4)
1          ``uint8``, 8 values   ``P / 8 * Q``   (``P`` must be a multiple of 8)
=========  ====================  ==============================================

Metadata is one scale and one zero per group in the compute dtype: ``2 * G * itemsize(compute_dtype)``
bytes. Nothing is shared between layers.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import nn

from autoqra._optional import available, require
from autoqra.quant_backends.base import UNQUANTIZED_BITS, QuantBackend, register_backend
from autoqra.quant_backends.base import positive_int as _positive_int
from autoqra.quant_backends.base import unique_storages as _unique_storages

log = logging.getLogger(__name__)

_FEATURE = "backend 'hqq'"
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: bits -> (values per storage element, bytes per storage element)
_PACKING: dict[int, tuple[int, int]] = {8: (1, 1), 6: (1, 1), 5: (1, 1), 4: (2, 1), 3: (10, 4), 2: (4, 1), 1: (8, 1)}


DEFAULT_GROUP_SIZE = 64


def _group_sizes(group_size: Any, supported: tuple[int, ...]) -> dict[int, int]:
    """``{bits: group size}`` of every supported bit-width from an int or a ``{bits: group_size}`` mapping
    (keys may be strings, as in a JSON spec)."""
    def ok(g: Any) -> bool:
        return not isinstance(g, bool) and isinstance(g, int) and g > 0 and g % 8 == 0

    if isinstance(group_size, Mapping):
        out = {b: DEFAULT_GROUP_SIZE for b in supported}
        for k, g in group_size.items():
            try:
                b = int(k)
            except (TypeError, ValueError):
                b = None
            if b not in supported or not ok(g):
                raise ValueError(f"group_size={dict(group_size)!r} is invalid; allowed: a positive int multiple of "
                                 f"8, or {{bits: such an int}} with bits in {list(supported)}")
            out[b] = g
        return out
    if not ok(group_size):
        raise ValueError(f"group_size={group_size!r} is invalid; allowed: a positive int multiple of 8, or "
                         "{bits: such an int}")
    return {b: group_size for b in supported}


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    """All tensors in a (possibly nested) dict such as HQQ's ``meta``."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_in(v)]
    return []


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its storage holds exactly its elements, else a tight contiguous copy."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.contiguous().clone()


def _layer_class() -> type[nn.Module]:
    """autoqra's :class:`~autoqra.quant_backends._hqq_layer.HQQLinear` (a subclass of hqq's).

    Its module subclasses an hqq class at import time, so it is imported here, on first use, after
    checking that hqq is installed (``import autoqra`` must work without hqq).
    """
    require("hqq.core.quantize", _FEATURE)
    from autoqra.quant_backends._hqq_layer import HQQLinear

    return HQQLinear


@register_backend("hqq")
class HQQBackend(QuantBackend):
    """HQQ quantization of single linears (1-8 bits, PyTorch kernels, CPU friendly).

    Args:
        group_size: weights per scale/zero group (a positive multiple of 8), or one per bit-width as a mapping
            ``{bits: group_size}`` (bit-widths not named take 64), e.g. ``{4: 32}`` for a model whose weights
            were stored at 4 bits in groups of 32 (a Q4_0 / Q4_1 GGUF): hqq then finds that grid again.
        compute_dtype: dtype of the scales, zeros, bias and the dequantized matmul
            (``torch.float32``, ``torch.float16`` or ``torch.bfloat16``; fp32 is fastest on CPU).
        axis: grouping axis of hqq (``1``: consecutive weights of a row; ``0``: hqq's column grouping).

    Raises:
        ValueError: a bad option, naming the field, the value and what is allowed.
    """

    supported_bits = (1, 2, 3, 4, 5, 6, 8)
    #: fp32, measured: SmolLM2 LoRA step, batch 4x128, dropout 0, autoqra's dequantize-matmul (which keeps
    #: no input for backward; hqq's own kept it: -3.4)
    activation_delta = {b: -7.27 for b in (1, 2, 3, 4, 5, 6, 8)}
    install_hint = "pip install hqq"
    dtype_option = "compute_dtype"

    def __init__(self, group_size: int | Mapping[int | str, int] = DEFAULT_GROUP_SIZE,
                 compute_dtype: torch.dtype = torch.float32, axis: int = 1) -> None:
        self.group_sizes = _group_sizes(group_size, self.supported_bits)
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={compute_dtype!r} is invalid; allowed: {list(_COMPUTE_DTYPES)}")
        if axis not in (0, 1) or isinstance(axis, bool):
            raise ValueError(f"axis={axis!r} is invalid; allowed: 0 or 1")
        sizes = set(self.group_sizes.values())
        #: the group size of every bit-width when they are all the same, else None (see :meth:`group_size_of`)
        self.group_size = sizes.pop() if len(sizes) == 1 else None
        self.compute_dtype = compute_dtype
        self.axis = axis

    def is_available(self) -> bool:
        """Whether the ``hqq`` package is installed."""
        return available("hqq")

    def spec(self) -> dict[str, Any]:
        """JSON-able identity: name, group_size (an int, or ``{bits: group_size}`` with string keys), axis,
        compute dtype and the hqq version."""
        try:
            lib = version("hqq")
        except PackageNotFoundError:
            lib = None
        return {
            "name": self.name,
            "group_size": self.group_size if self.group_size is not None else {
                str(b): g for b, g in sorted(self.group_sizes.items())},
            "axis": self.axis,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "hqq_version": lib,
        }

    def with_group_sizes(self, group_sizes: Mapping[int, int]) -> HQQBackend:
        """The same backend (compute dtype, axis) with these group sizes (``{bits: size}``; unnamed: 64)."""
        return HQQBackend(dict(group_sizes), compute_dtype=self.compute_dtype, axis=self.axis)

    def group_size_of(self, bits: int) -> int:
        """The group size hqq uses at ``bits``."""
        return self.group_sizes.get(int(bits), DEFAULT_GROUP_SIZE)

    # ----------------------------------------------------------------- accounting
    def _bits(self, bits: int) -> int:
        """``bits`` as a plain int (numpy ints welcome), validated by :meth:`check_bits`."""
        try:
            b = operator.index(bits)
        except TypeError:
            raise ValueError(f"backend 'hqq' needs integer bits, got {bits!r}") from None
        self.check_bits([b])
        return b

    @staticmethod
    def _check_dims(out_features: int, in_features: int) -> tuple[int, int]:
        return _positive_int("out_features", out_features), _positive_int("in_features", in_features)

    def _layout(self, out_features: int, in_features: int, bits: int) -> tuple[int, int, int]:
        """``(groups, pack_dim, other_dim)`` for a layer, validating that hqq can pack it."""
        n, g = out_features * in_features, self.group_size_of(bits)
        if n % g:
            raise ValueError(
                f"backend 'hqq' cannot quantize a {out_features}x{in_features} weight: its {n} elements "
                f"are not a multiple of group_size={g} (at {bits} bits)"
            )
        groups = n // g
        pack, other = (groups, g) if self.axis == 1 else (g, groups)
        per = _PACKING[bits][0]
        if per in (2, 4, 8) and pack % per:
            raise ValueError(
                f"backend 'hqq' cannot pack a {out_features}x{in_features} weight at {bits} bits with "
                f"group_size={g}, axis={self.axis}: the packed dimension ({pack}) must be a "
                f"multiple of {per}; use other bits, a group_size dividing {n // per}, or leave the layer at 16 bits"
            )
        return groups, pack, other

    def weight_bytes(self, out_features: int, in_features: int, bits: int) -> tuple[int, int]:
        """Exact ``(packed_bytes, metadata_bytes)`` of one quantized layer (bias excluded).

        Args:
            out_features: rows of the weight.
            in_features: columns of the weight.
            bits: bit-width (``16`` = unquantized, counted elsewhere: ``(0, 0)``).

        Returns:
            Bytes (not bits): the packed ``W_q`` storage and the scale+zero storage.

        Raises:
            ValueError: unsupported bits, or a shape hqq cannot group/pack (see :meth:`quantize`).
        """
        bits = self._bits(bits)
        out_features, in_features = self._check_dims(out_features, in_features)
        if bits == UNQUANTIZED_BITS:
            return 0, 0
        groups, pack, other = self._layout(out_features, in_features, bits)
        per, elem = _PACKING[bits]
        packed = math.ceil(pack / per) * other * elem
        meta = 2 * groups * self.compute_dtype.itemsize
        return packed, meta

    # --------------------------------------------------------------- quantization
    def quantize(self, linear: nn.Linear, bits: int, calib: torch.Tensor | None = None) -> nn.Module:
        """Return an ``HQQLinear`` computing ``linear`` at ``bits`` (``linear`` is not modified).

        The layer lives on ``linear``'s device; bits ``16`` returns ``linear`` itself. It is an
        :class:`autoqra.quant_backends._hqq_layer.HQQLinear`: hqq's storage, with a forward
        that trains under fp32, bf16 and fp16 autocast (pure PyTorch, no CUDA extension needed).

        Raises:
            ValueError: unsupported bits, or a shape hqq cannot group/pack.
        """
        bits = self._bits(bits)
        if bits == UNQUANTIZED_BITS:
            return linear
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"backend 'hqq' quantizes nn.Linear modules, got {type(linear).__name__}")
        self._layout(linear.out_features, linear.in_features, bits)
        hqq_quantize = require("hqq.core.quantize", _FEATURE)
        layer_cls = _layer_class()

        # HQQLinear deletes its source's parameters (del_orig): hand it a throw-away shell that
        # points at the same (read-only used) tensors, so the caller's linear keeps its weights.
        shell = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        shell.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        if linear.bias is not None:
            shell.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        cfg = hqq_quantize.BaseQuantizeConfig(nbits=bits, group_size=self.group_size_of(bits), axis=self.axis)
        q = layer_cls(
            shell, cfg, del_orig=True, compute_dtype=self.compute_dtype, device=str(linear.weight.device)
        )
        q.W_q.data = _compact(q.W_q.data)
        for key in ("scale", "zero"):
            q.meta[key] = _compact(q.meta[key])
        return q

    # ------------------------------------------------------------ embedding / head
    def embedding_bits(self, unit: Any) -> tuple[int, ...]:
        """4 and 8 bits for an embedding (its rows are looked up in the packed storage: ``axis=1`` and a
        ``group_size`` dividing the hidden size) and for a head (tied or not: the dequantize-matmul)."""
        t = unit.tensors[0]
        return tuple(b for b in (4, 8) if self._shape_ok(t.out_features, t.in_features, b) and not (
            unit.kind == "embedding" and (self.axis != 1 or t.in_features % self.group_size_of(b))))

    def quantize_embedding(self, embedding: nn.Embedding, bits: int) -> nn.Module:
        """An :class:`~autoqra.quant_backends._hqq_layer.HQQEmbedding` of ``embedding`` at 4 or 8 bits
        (its bytes are :meth:`weight_bytes` of ``(vocab, hidden)``)."""
        bits = self._bits(bits)
        if bits == UNQUANTIZED_BITS:
            return embedding
        vocab, hidden = embedding.weight.shape
        if bits not in (4, 8) or self.axis != 1 or hidden % self.group_size_of(bits):
            raise ValueError(f"backend 'hqq' quantizes embeddings at 4 or 8 bits with axis=1 and a group_size "
                             f"dividing the hidden size ({hidden}); got bits={bits}, axis={self.axis}, "
                             f"group_size={self.group_size_of(bits)}")
        require("hqq.core.quantize", _FEATURE)
        from autoqra.quant_backends._experts import linear_shell
        from autoqra.quant_backends._hqq_layer import HQQEmbedding

        q = self.quantize(linear_shell(embedding.weight), bits)
        q.__class__ = HQQEmbedding
        q.padding_idx = embedding.padding_idx
        return q

    def tied_head(self, embedding: nn.Module) -> nn.Module:
        """The tied output head over a quantized embedding's own storage (no bytes of its own)."""
        return embedding.head()

    # ------------------------------------------------------------------ inspection
    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is an ``HQQLinear``."""
        if not self.is_available():
            return False
        return isinstance(module, require("hqq.core.quantize", _FEATURE).HQQLinear)

    def module_tensors(self, module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``([W_q], [meta tensors: scale, zero, ...], [bias, any other parameter/buffer])``.

        The bias is a copy in the compute dtype (``out_features * itemsize`` bytes).
        """
        packed = _unique_storages([module.W_q])
        meta = _unique_storages(_tensors_in(module.meta))
        rest = ([module.bias] if isinstance(module.bias, torch.Tensor) else []) + [
            t for n, t in [*module.named_parameters(), *module.named_buffers()] if n not in ("W_q", "bias")
        ]
        seen = {t.untyped_storage().data_ptr() for t in packed + meta}
        other = [t for t in _unique_storages(rest) if t.untyped_storage().data_ptr() not in seen]
        return packed, meta, other

    # -------------------------------------------------------------- serialization
    def export_module(self, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """hqq's own safetensors-compatible state (``W_q``, scale, zero, encoded config fields, bias)."""
        tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
        meta: dict[str, Any] = {"compute_dtype": str(module.compute_dtype).removeprefix("torch.")}
        if hasattr(module, "head"):  # an HQQEmbedding
            meta["embedding"] = {"padding_idx": module.padding_idx}
        return tensors, meta

    def load_module(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: str = "cpu") -> nn.Module:
        layer_cls = _layer_class()

        dtype = getattr(torch, str(meta.get("compute_dtype", "float32")))
        if dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"unsupported hqq compute dtype {meta.get('compute_dtype')!r}")
        q = layer_cls(None, quant_config=None, compute_dtype=dtype, device=str(device), initialize=False)
        state = {k: v.to(device) for k, v in tensors.items()}
        q.load_state_dict(state)
        q.W_q = nn.Parameter(_compact(q.W_q.data), requires_grad=False)
        for key in ("scale", "zero"):
            q.meta[key] = _compact(q.meta[key])
        if q.bias is not None:
            q.bias = q.bias.to(dtype)
        q.ready = True
        q.in_gpu = str(device).startswith("cuda")
        if "embedding" in meta:
            from autoqra.quant_backends._hqq_layer import HQQEmbedding

            q.__class__ = HQQEmbedding
            q.padding_idx = meta["embedding"].get("padding_idx")
        return q

    def prepare_for_peft(self, model: nn.Module) -> None:
        """Nothing to do: peft's ``dispatch_hqq`` wraps every ``HQQLinear`` as ``HqqLoraLinear`` by type."""
