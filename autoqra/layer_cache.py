r"""The quantized-layer cache of a source model: :class:`QuantCache`, LRU-capped in bytes.

One cache per source model (:func:`quant_cache`, weakly held), keyed by ``(module, bits, backend spec, device,
dtype)``; the cap comes from ``AUTOQRA_QUANT_CACHE_BYTES`` or :func:`default_cache_limit` and can be changed with
:func:`set_quant_cache_limit`. :func:`autoqra.apply.quantized_layers` fills it.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from autoqra.memory.budget import parse_size
from autoqra.quant_backends import QuantBackend

_CACHES: weakref.WeakKeyDictionary[nn.Module, QuantCache] = weakref.WeakKeyDictionary()

#: Environment variable overriding the default byte cap of every new :class:`QuantCache`: bytes
#: (``"4294967296"``), a size string (``"4GiB"``, ``"900MB"``) or ``"none"`` (unlimited).
CACHE_BYTES_ENV = "AUTOQRA_QUANT_CACHE_BYTES"
#: Floor of the default cap, bytes (1 GiB): small models (SmolLM2-135M, tests) cache every layer.
MIN_DEFAULT_CACHE_BYTES = 2**30
#: Cap of a :class:`QuantCache` built without a model and without the environment variable, bytes.
DEFAULT_CACHE_BYTES = 4 * 2**30
_DEFAULT: Any = object()

#: ``(module name, bits, backend spec, weight device, weight dtype)``
LayerKey = tuple[str, int, str, str, str]


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (deduplicated by storage ``data_ptr``)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def layer_bytes(module: nn.Module, backend: QuantBackend | None = None) -> int:
    """Bytes a cached layer holds: distinct storages of its parameters, buffers and backend tensors.

    ``backend.module_tensors`` adds tensors held outside ``parameters()``/``buffers()`` (HQQ's
    ``meta`` dict, bitsandbytes' ``quant_state``); it is only asked about modules it ``owns``.
    """
    tensors = [*module.parameters(), *module.buffers()]
    if backend is not None:
        for mod in module.modules():  # the layer itself, or the per-expert layers of QuantizedExperts
            if backend.owns(mod):
                for group in backend.module_tensors(mod):
                    tensors.extend(group)
    return storage_bytes(tensors)


def _env_limit() -> int | None | Any:
    """The cap set by ``AUTOQRA_QUANT_CACHE_BYTES`` (``None`` = unlimited), or ``_DEFAULT`` if unset."""
    raw = os.environ.get(CACHE_BYTES_ENV, "").strip()
    if not raw:
        return _DEFAULT
    if raw.lower() in ("none", "unlimited", "inf"):
        return None
    try:
        return parse_size(raw)
    except ValueError:
        raise ValueError(
            f"{CACHE_BYTES_ENV}={raw!r} is invalid; allowed: bytes (e.g. 4294967296), a size string "
            "('4GiB', '900MB') or 'none' (unlimited)"
        ) from None


def _check_limit(max_bytes: int | None) -> int | None:
    if max_bytes is None:
        return None
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes={max_bytes!r} is invalid; allowed: a non-negative int (bytes) or None")
    return max_bytes


def default_cache_limit(model: nn.Module) -> int:
    """Default byte cap of ``model``'s cache: ``max(1 GiB, model bytes // 2)``.

    Why: one candidate's quantized layers at <= 8 bits take at most about half the bytes of a 16-bit
    model (a quarter of an fp32 one), so half the model always holds the candidate being built —
    LRU with a cap below that working set evicts every layer before its reuse and never hits —
    and at 4 bits about two recent candidates, which is where the hits of a search come from
    (consecutive candidates differ in a few units). It bounds the cache to 0.5x the source model
    (an 8B bf16 model: 8 GB instead of ~1.1x the model for every variant of a (2, 3, 4, 8) ladder),
    and lives where the model lives. The 1 GiB floor keeps small models fully cached.
    """
    own = storage_bytes([*model.parameters(), *model.buffers()])
    return max(MIN_DEFAULT_CACHE_BYTES, own // 2)


class QuantCache:
    """Quantized layers and calibration statistics of one source model, LRU-capped in bytes.

    Layers are keyed by ``(module name, bits, backend spec, weight device, weight dtype)`` of the
    *source* linear, so after the source model is moved (``model.cuda()``, ``model.to(torch.bfloat16)``)
    its layers are quantized afresh instead of reusing layers of the old placement. Calibration
    statistics are keyed by backend spec, calibration ids and the model's device and dtype; they are
    not counted against the cap (GPTQ keeps its Hessians on the CPU).

    A layer's bytes are the distinct storages of its parameters, buffers and backend-held tensors
    (:func:`layer_bytes`). A lookup hit makes the entry most recently used; an insertion that takes
    :attr:`bytes` above :attr:`max_bytes` evicts least-recently-used entries, never the entry just
    inserted (so one layer larger than the cap is still cached, alone). Evicted layers stay alive
    in any model that uses them; the cache only drops its reference.

    Args:
        max_bytes: byte cap, or ``None`` for no cap. Default: ``AUTOQRA_QUANT_CACHE_BYTES`` if set,
            else :data:`DEFAULT_CACHE_BYTES` (4 GiB). :func:`quant_cache` instead defaults to
            :func:`default_cache_limit` of the model (half the model's bytes, at least 1 GiB).

    Attributes:
        hits / misses: counts of quantized-layer lookups (for reporting apply cost).
        evictions: layers dropped to stay under the cap.
        bytes: bytes of the cached layers (sum of :func:`layer_bytes` over entries).
    """

    def __init__(self, max_bytes: int | None = _DEFAULT) -> None:
        if max_bytes is _DEFAULT:
            env = _env_limit()
            max_bytes = DEFAULT_CACHE_BYTES if env is _DEFAULT else env
        self._max_bytes = _check_limit(max_bytes)
        self.layers: OrderedDict[LayerKey, nn.Module] = OrderedDict()
        self.sizes: dict[LayerKey, int] = {}
        self.calib: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.bytes = 0
        self._lock = threading.RLock()

    @property
    def max_bytes(self) -> int | None:
        """The byte cap (``None`` = unlimited); setting it evicts down to the new cap at once."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        with self._lock:
            self._max_bytes = _check_limit(value)
            self._evict(keep=None)

    def get(self, key: LayerKey) -> nn.Module | None:
        """The cached layer (now most recently used) or ``None``; counts a hit or a miss."""
        with self._lock:
            q = self.layers.get(key)
            if q is None:
                self.misses += 1
            else:
                self.hits += 1
                self.layers.move_to_end(key)
            return q

    def put(self, key: LayerKey, module: nn.Module, backend: QuantBackend | None = None) -> None:
        """Insert ``module`` as most recently used, then evict LRU entries (never this one) past the cap."""
        with self._lock:
            if key in self.layers:
                self.bytes -= self.sizes.pop(key)
                del self.layers[key]
            size = layer_bytes(module, backend)
            self.layers[key] = module
            self.sizes[key] = size
            self.bytes += size
            self._evict(keep=key)

    def _evict(self, keep: LayerKey | None) -> None:
        cap = self._max_bytes
        if cap is None:
            return
        while self.bytes > cap and self.layers:
            key = next(iter(self.layers))
            if key == keep:
                break
            del self.layers[key]
            self.bytes -= self.sizes.pop(key)
            self.evictions += 1

    def clear(self) -> None:
        """Drop every layer and calibration result (counters are kept)."""
        with self._lock:
            self.layers.clear()
            self.sizes.clear()
            self.calib.clear()
            self.bytes = 0


def quant_cache(model: nn.Module) -> QuantCache:
    """The (weakly held) quantized-layer cache attached to a source model.

    Created on first use with the cap from ``AUTOQRA_QUANT_CACHE_BYTES`` if set, else
    :func:`default_cache_limit` (half the model's bytes, at least 1 GiB).
    """
    cache = _CACHES.get(model)
    if cache is None:
        env = _env_limit()
        cache = _CACHES[model] = QuantCache(default_cache_limit(model) if env is _DEFAULT else env)
    return cache


def set_quant_cache_limit(model: nn.Module, max_bytes: int | None) -> QuantCache:
    """Set the byte cap of ``model``'s cache (``None`` = unlimited), evicting LRU layers past it now."""
    cache = quant_cache(model)
    cache.max_bytes = max_bytes
    return cache
