r"""The quantization-backend interface and its registry.

A backend turns one frozen ``nn.Linear`` into a quantized module and says, exactly and
analytically, how many bytes that module will hold. The memory model relies on the
second half of that contract: ``weight_bytes`` must equal what ``quantize`` allocates, to
the byte, for every supported bit-width.
"""

from __future__ import annotations

import abc
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
from peft.tuners.lora.gptq import GPTQLoraLinear
from torch import nn

from autoqra.precision import compute_dtype
from autoqra.registry import Registry

#: Bit-width meaning "leave this module unquantized" (kept in the model's own dtype).
UNQUANTIZED_BITS = 16

#: Backends by name (``backend=``); ``@register_backend("name")`` adds one.
BACKENDS: Registry[QuantBackend] = Registry("backend")


def register_backend(name: str) -> Callable[[type[QuantBackend]], type[QuantBackend]]:
    """Class decorator that registers a backend under ``name`` (later registrations win)."""
    return BACKENDS.register(name)


def available_backends() -> list[str]:
    """Names of all registered backends (installed or not)."""
    return BACKENDS.names()


def get_backend(backend: str | QuantBackend, **kwargs: Any) -> QuantBackend:
    """Resolve a backend name (or pass an instance through).

    Raises:
        ValueError: unknown name, naming the registered ones.
        ImportError: the backend's library is not installed.
    """
    if isinstance(backend, QuantBackend):
        if kwargs:
            raise ValueError("backend options can only be given with a backend name, not an instance")
        return backend
    inst = BACKENDS.get(backend)(**kwargs)
    if not inst.is_available():
        raise ImportError(f"backend {backend!r} needs a library that is not installed: {inst.install_hint}")
    return inst


def backend_for_precision(name: str | QuantBackend, precision: str, options: dict[str, Any] | None = None) -> QuantBackend:
    """The backend ``name`` computing in ``precision``'s dtype, unless ``options`` set its dtype explicitly.

    An instance is passed through unchanged (its own compute dtype stands).

    Raises:
        ValueError / ImportError: as :func:`get_backend`.
    """
    if isinstance(name, QuantBackend):
        return name
    kw = {**BACKENDS.get(name).dtype_kwargs(compute_dtype(precision)), **(options or {})}
    return get_backend(name, **kw)


def backend_from_spec(spec: dict[str, Any]) -> QuantBackend:
    """Rebuild a backend from its :meth:`QuantBackend.spec` (library versions are ignored here).

    Raises:
        ValueError: unknown backend or an invalid option (the backend's own validation).
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"not a backend spec: {spec!r}")
    kw = {k: v for k, v in spec.items() if k != "name" and not k.endswith("_version")}
    if isinstance(kw.get("compute_dtype"), str):
        dt = getattr(torch, kw["compute_dtype"], None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"compute_dtype={kw['compute_dtype']!r} is not a torch dtype")
        kw["compute_dtype"] = dt
    try:
        return get_backend(spec["name"], **kw)
    except TypeError as e:
        raise ValueError(f"invalid options for backend {spec['name']!r}: {e}") from None


def unique_storages(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` without repeats of the same underlying storage (first occurrence kept)."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def positive_int(field: str, v: int) -> int:
    """``v`` as an int (numpy ints welcome) if it is a positive integer, else ``ValueError``."""
    try:
        i = operator.index(v)
    except TypeError:
        i = 0
    if isinstance(v, bool) or i <= 0:
        raise ValueError(f"{field}={v!r} is invalid; allowed: a positive int")
    return i


def generic_lora_class() -> type[nn.Module]:
    """A peft LoRA layer that wraps any quantized module exposing ``in_features``/``out_features``.

    It is peft's ``GPTQLoraLinear``: ``base(x) + lora_B(lora_A(dropout(x))) * scaling``, no
    merging, nothing GPTQ-specific. Return ``{YourLayer: generic_lora_class()}`` from
    :meth:`QuantBackend.lora_custom_modules` for layers peft does not know.
    """
    return GPTQLoraLinear


class QuantBackend(abc.ABC):
    """Quantizes single linear layers and accounts their bytes exactly.

    Subclasses set ``name`` (via :func:`register_backend`), ``supported_bits`` and
    implement :meth:`quantize`, :meth:`weight_bytes` and :meth:`module_tensors`.
    Optional libraries are imported inside methods, through :func:`autoqra._optional.require`, so
    that ``import autoqra`` never fails when one is missing.
    """

    name: str = "base"
    #: Bit-widths :meth:`quantize` accepts, besides 16 (= unquantized) which every backend accepts.
    supported_bits: tuple[int, ...] = ()
    #: True when :meth:`quantize` needs calibration inputs (GPTQ).
    needs_calibration: bool = False
    install_hint: str = ""
    #: Activation bytes per token per input feature that one quantized layer saves (negative) or adds
    #: relative to an unquantized ``nn.Linear`` in a LoRA training step, by bits (see ``_activations``).
    activation_delta: dict[int, float] = {}
    #: the constructor option that sets the compute dtype (``None``: the backend has none)
    dtype_option: str | None = None

    @classmethod
    def dtype_kwargs(cls, dtype: torch.dtype) -> dict[str, Any]:
        """Constructor options that make this backend compute in ``dtype`` (``{}`` without such an option)."""
        return {} if cls.dtype_option is None else {cls.dtype_option: dtype}

    def is_available(self) -> bool:
        """Whether the backend's library imports on this machine."""
        return True

    def spec(self) -> dict[str, Any]:
        """JSON-able identity of this backend and its options (for caching and artifacts)."""
        return {"name": self.name}

    def check_bits(self, bits: Iterable[int]) -> None:
        """Raise ``ValueError`` naming the backend and its supported bits if any is unsupported."""
        allowed = set(self.supported_bits) | {UNQUANTIZED_BITS}
        bad = sorted({int(b) for b in bits} - allowed)
        if bad:
            raise ValueError(
                f"backend {self.name!r} does not support bits {bad}; supported bits: "
                f"{sorted(allowed)} (16 = unquantized)"
            )

    @abc.abstractmethod
    def quantize(self, linear: nn.Linear, bits: int, calib: torch.Tensor | None = None) -> nn.Module:
        """Return a new quantized module computing ``linear`` at ``bits``.

        Args:
            linear: a frozen ``nn.Linear`` (not modified).
            bits: one of ``supported_bits``.
            calib: this module's entry of :meth:`calibrate`'s result, for backends that need it.
        """

    @abc.abstractmethod
    def weight_bytes(self, out_features: int, in_features: int, bits: int) -> tuple[int, int]:
        """Exact ``(packed_weight_bytes, metadata_bytes)`` :meth:`quantize` allocates for one layer.

        Bias and anything kept unquantized are *not* included (they count as unquantized
        parameters). ``metadata_bytes`` covers scales, zero points, absmax and similar.
        """

    # ------------------------------------------------------------ embedding / head
    def embedding_bits(self, unit: Any) -> tuple[int, ...]:
        """Quantized bit-widths this backend stores for an embedding / head unit (:mod:`autoqra.units`).

        Default: an untied output head (an ``nn.Linear``) takes every supported bit-width whose
        :meth:`weight_bytes` accepts its shape; an embedding (with or without its tied head) none — a
        backend that can look rows up in its quantized storage overrides this (HQQ).
        """
        if unit.kind != "head":
            return ()
        t = unit.tensors[0]
        return tuple(b for b in self.supported_bits if self._shape_ok(t.out_features, t.in_features, b))

    def _shape_ok(self, out_features: int, in_features: int, bits: int) -> bool:
        try:
            self.weight_bytes(out_features, in_features, bits)
        except (ValueError, TypeError):
            return False
        return True

    def quantize_embedding(self, embedding: nn.Embedding, bits: int) -> nn.Module:
        """A module computing ``embedding`` (lookup of token rows) from quantized storage at ``bits``."""
        raise ValueError(
            f"backend {self.name!r} cannot quantize a token embedding (it has no quantized row lookup); "
            "use backend 'hqq' for embeddings, or embeddings='keep'"
        )

    def tied_head(self, embedding: nn.Module) -> nn.Module:
        """The output head computing ``x @ Wᵀ`` from the quantized embedding's own storage (tied weights)."""
        raise ValueError(f"backend {self.name!r} cannot serve a tied output head from a quantized embedding")

    def shared_bytes(self, bits_used: Iterable[int]) -> int:
        """Bytes of tensors shared by all quantized layers (allocated once per model), e.g. a codebook."""
        return 0

    @abc.abstractmethod
    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is a layer this backend produced."""

    @abc.abstractmethod
    def module_tensors(self, module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Live tensors of one owned module: ``(packed_weights, metadata, other)``.

        Includes tensors held outside ``parameters()``/``buffers()`` (HQQ's meta dict,
        bitsandbytes' quant_state). ``other`` holds e.g. the bias.
        """

    def calibrate(self, model: nn.Module, module_names: list[str], calib_ids: torch.Tensor) -> dict[str, Any]:
        """Collect per-module calibration statistics for :meth:`quantize` (backends that need them).

        Args:
            model: the unquantized source model.
            module_names: full names of the linears that will be quantized.
            calib_ids: ``(n_seq, seq_len)`` token ids.

        Returns:
            ``{module_name: stats}``; each value is passed as ``calib`` to :meth:`quantize`.
        """
        return {}

    @staticmethod
    def lora_custom_modules() -> dict[type[nn.Module], type[nn.Module]]:
        """``{quantized layer class: peft LoRA layer class}`` for layers peft does not dispatch itself.

        :func:`autoqra.apply_assignment` registers these on every ``LoraConfig``
        (``LoraConfig._register_custom_module``); loading a saved adapter needs the same.
        """
        return {}

    def prepare_for_peft(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Hook run on the quantized base model before peft wraps it (set flags peft reads)."""

    # ------------------------------------------------------------ serialization
    def export_module(self, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, meta)`` that :meth:`load_module` rebuilds ``module`` from without re-quantizing.

        ``tensors`` go to a safetensors file; ``meta`` (JSON-able) to ``autoqra.json``.
        """
        raise NotImplementedError(
            f"backend {self.name!r} cannot export quantized layers: implement export_module() and load_module()"
        )

    def load_module(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: str = "cpu") -> nn.Module:
        """Rebuild a layer written by :meth:`export_module` (its bytes equal the original's)."""
        raise NotImplementedError(
            f"backend {self.name!r} cannot load quantized layers: implement export_module() and load_module()"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"
