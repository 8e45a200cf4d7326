r"""``apply_assignment``: quantize each unit at its bits and wrap LoRA at its rank.

The source model is never modified: the result is a structural copy whose frozen,
unquantized tensors share storage with the source (no extra bytes), while quantized
layers come from a per-source-model cache keyed by ``(module, bits, backend spec, device, dtype)``
so the next candidate re-quantizes only the units whose bits changed. The cache is LRU-capped in
bytes (:class:`QuantCache`; ``AUTOQRA_QUANT_CACHE_BYTES``, :func:`set_quant_cache_limit`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any

import attrs
import torch
from peft import get_peft_model
from torch import nn

from autoqra.memory.budget import parse_size
from autoqra.quant_backends import UNQUANTIZED_BITS, QuantBackend, get_backend
from autoqra.quant_backends._experts import as_linear, dense_experts, quantize_experts, quiet_pattern_warnings
from autoqra.quant_backends._experts import lora_custom_modules as experts_lora_modules
from autoqra.space import Assignment, SearchSpace
from autoqra.units import expert_params, is_linear_like

log = logging.getLogger(__name__)

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


def _placement(t: torch.Tensor) -> tuple[str, str]:
    """``(device, dtype)`` of a tensor as strings, e.g. ``("cuda:0", "bfloat16")``."""
    return str(t.device), str(t.dtype).removeprefix("torch.")


def _spec_key(backend: QuantBackend) -> str:
    return json.dumps(backend.spec(), sort_keys=True, default=str)


def shared_copy(model: nn.Module) -> nn.Module:
    """Deep-copy module structure while sharing every parameter/buffer storage (frozen copies).

    New ``Parameter`` objects are made (``requires_grad=False``) so that freezing or training
    the copy never changes the source's parameter flags.
    """
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            memo[id(t)] = nn.Parameter(t.detach(), requires_grad=False) if isinstance(t, nn.Parameter) else t
    return copy.deepcopy(model, memo)


def calibration_key(calib_ids: torch.Tensor) -> str:
    return hashlib.sha1(calib_ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def quantized_layers(
    model: nn.Module,
    module_bits: dict[str, int],
    backend: str | QuantBackend = "hqq",
    calib_ids: torch.Tensor | None = None,
    module_names: list[str] | None = None,
) -> dict[str, nn.Module]:
    """The quantized layer of each ``{module name: bits}`` (16 bits are skipped), from the cache.

    Args:
        model: the unquantized source model (layers are quantized from its linears).
        module_bits: bits per module; modules at 16 bits are left out of the result.
        backend: quantization backend name or instance.
        calib_ids: calibration token ids for backends that need them.
        module_names: every module calibration covers (default: the keys of ``module_bits``); the
            calibration statistics are cached under this list's model placement.
    """
    be = get_backend(backend)
    be.check_bits(module_bits.values())
    cache = quant_cache(model)
    spec = _spec_key(be)
    stats: dict[str, Any] = {}
    to_quant = [m for m, b in module_bits.items() if b != UNQUANTIZED_BITS]
    if be.needs_calibration and to_quant:
        if calib_ids is None:
            raise ValueError(
                f"backend {be.name!r} needs calibration data: pass calib_ids=(n_seq, seq_len) token ids "
                "(the optimizer passes batches from the task's training split)"
            )
        p0 = next(iter(model.parameters()), None)
        where = "|".join(_placement(p0)) if p0 is not None else "none"
        ckey = f"{spec}|{calibration_key(calib_ids)}|{where}"
        if ckey not in cache.calib:
            t0 = time.perf_counter()
            names = module_names or list(module_bits)
            cache.calib[ckey] = be.calibrate(model, names, calib_ids)
            log.info("calibrated %d modules for %s in %.1f s", len(names), be.name, time.perf_counter() - t0)
        stats = cache.calib[ckey]
    src_mods = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    tied = _tied_heads(src_mods, to_quant)
    for name in to_quant:
        if name in tied:
            continue
        bits = module_bits[name]
        src = src_mods[name]
        key = (name, bits, spec, *_placement(next(src.parameters())))
        q = cache.get(key)
        if q is None:
            with torch.no_grad():
                q = quantize_module(be, src, bits, calib=stats.get(name))
            q.requires_grad_(False)
            cache.put(key, q, be)
        out[name] = q
    for head, emb in tied.items():
        if module_bits[head] != module_bits[emb]:
            raise ValueError(f"{head} is tied to {emb}: both need the same bits, got {module_bits[head]} and "
                             f"{module_bits[emb]}")
        out[head] = be.tied_head(out[emb])  # the embedding's own quantized storage, no bytes of its own
    return out


def _tied_heads(mods: dict[str, nn.Module], names: list[str]) -> dict[str, str]:
    """``{head module: embedding module}`` among ``names`` where a linear's weight is an embedding's tensor."""
    embs = {id(mods[n].weight): n for n in names if isinstance(mods[n], nn.Embedding)}
    return {n: embs[id(mods[n].weight)] for n in names
            if isinstance(mods[n], nn.Linear) and id(mods[n].weight) in embs}


def quantize_module(backend: QuantBackend, module: nn.Module, bits: int, calib: Any = None) -> nn.Module:
    """The quantized replacement of one module of the space: an ``nn.Linear`` or GPT-2 ``Conv1D`` through
    ``backend.quantize``, a mixture-of-experts module per expert slice (:func:`quantize_experts`), a token
    embedding through ``backend.quantize_embedding``."""
    if expert_params(module):
        return quantize_experts(backend, module, bits, calib=calib)
    if isinstance(module, nn.Embedding):
        return backend.quantize_embedding(module, bits)
    if not is_linear_like(module):
        raise ValueError(f"cannot quantize {type(module).__name__}: not a linear, Conv1D or experts module")
    return backend.quantize(as_linear(module), bits, calib=calib)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` of ``model`` with ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(
    model: nn.Module,
    space: SearchSpace,
    assignment: Assignment,
    backend: str | QuantBackend = "hqq",
    calib_ids: torch.Tensor | None = None,
) -> nn.Module:
    """Return a copy of ``model`` with each unit's linears quantized at the assigned bits (no LoRA)."""
    mm = space.module_map(assignment)
    layers = quantized_layers(model, {m: b for m, (b, _) in mm.items()}, backend, calib_ids, space.module_names)
    new = shared_copy(model)
    for name, q in layers.items():
        set_module(new, name, q)
    return new


def apply_assignment(
    model: nn.Module,
    assignment: Assignment,
    backend: str | QuantBackend = "hqq",
    seed: int = 0,
    *,
    space: SearchSpace | None = None,
    alpha_ratio: float = 2.0,
    alpha: float | None = None,
    dropout: float = 0.0,
    calib_ids: torch.Tensor | None = None,
) -> nn.Module:
    """Quantize every unit at its bits and add LoRA at its rank; return a new PEFT model.

    Args:
        model: the unquantized source model (left untouched).
        assignment: per-unit bits and ranks.
        backend: quantization backend name or instance.
        seed: torch seed set right before the LoRA weights are created.
        space: the search space ``assignment`` belongs to (rebuilt at module granularity if
            omitted and the assignment names modules, else at block granularity).
        alpha_ratio: LoRA α = ratio · r (when ``alpha`` is None).
        alpha: one LoRA α for every module (scaling α/r), see :meth:`SearchSpace.lora_config`.
        dropout: LoRA dropout.
        calib_ids: ``(n_seq, seq_len)`` token ids for backends that need calibration (GPTQ).

    Returns:
        A ``peft.PeftModel`` whose only trainable parameters are LoRA weights. If every
        unit has rank 0 there is nothing to adapt and the quantized model is returned unwrapped.
    """
    space = space or space_for(model, assignment)
    space.validate(assignment)
    be = get_backend(backend)
    qmodel = quantize_model(model, space, assignment, be, calib_ids=calib_ids)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    if not any(r > 0 for r in assignment.ranks):
        return qmodel
    for name, (b, r) in space.module_map(assignment).items():
        if b == UNQUANTIZED_BITS and r > 0 and expert_params(qmodel.get_submodule(name)):
            set_module(qmodel, name, dense_experts(qmodel.get_submodule(name)))  # LoRA through autoqra's wrapper
    be.prepare_for_peft(qmodel)
    cfg = space.lora_config(assignment, alpha_ratio=alpha_ratio, dropout=dropout, alpha=alpha)
    cfg._register_custom_module(lora_custom_modules(be))
    torch.manual_seed(seed)
    with quiet_pattern_warnings():
        peft_model = get_peft_model(qmodel, cfg)
    bad = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    if bad:  # pragma: no cover - guards against a peft behaviour change
        raise RuntimeError(f"non-LoRA parameters are trainable after wrapping: {bad[:5]}")
    return peft_model


def lora_custom_modules(backend: QuantBackend) -> dict[type[nn.Module], type[nn.Module]]:
    """The backend's custom LoRA layer classes plus the one for mixture-of-experts modules."""
    return {**backend.lora_custom_modules(), **experts_lora_modules()}


def space_for(model: nn.Module, assignment: Assignment) -> SearchSpace:
    """Rebuild the search space an assignment was made in (granularity inferred from unit names; embedding /
    head units when the assignment names them)."""
    from autoqra.units import embedding_units

    emb = {u.name: u for u in embedding_units(model)}
    named = [n for n in assignment.units if n in emb]
    bits = sorted(set(assignment.bits))
    ranks = sorted(set(assignment.ranks))
    if named:  # their options: every bit-width they use, on a ladder wide enough to hold them
        own = {n: sorted({b for n2, b in zip(assignment.units, assignment.bits) if n2 == n} | {UNQUANTIZED_BITS})
               for n in named}
        width = max(len(v) for v in own.values())
        bits = sorted(set(bits) | {b for v in own.values() for b in v}) if len(bits) < width else bits
    for gran in ("block", "module"):
        space = SearchSpace.from_model(model, bits=bits, ranks=ranks, granularity=gran)
        if named:
            first = tuple(emb[n] for n in named if emb[n].kind == "embedding")
            last = tuple(emb[n] for n in named if emb[n].kind != "embedding")
            space = attrs.evolve(space, units=(*first, *space.units, *last), own_bits=own)
        if space.unit_names == assignment.units:
            return space
    keep = set(assignment.units)
    units = tuple(u for u in space.units if u.name in keep)
    if tuple(u.name for u in units) != assignment.units:
        raise ValueError("the assignment's units do not match this model; pass space= explicitly")
    return attrs.evolve(space, units=units)
