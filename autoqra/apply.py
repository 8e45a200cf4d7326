r"""``apply_assignment``: quantize each unit at its bits and wrap LoRA at its rank.

The source model is never modified: the result is a structural copy whose frozen,
unquantized tensors share storage with the source (no extra bytes), while quantized
layers come from a per-source-model cache keyed by ``(module, bits, backend spec, device, dtype)``
so the next candidate re-quantizes only the units whose bits changed. The cache is LRU-capped in
bytes (:class:`QuantCache`; ``AUTOQRA_QUANT_CACHE_BYTES``, :func:`set_quant_cache_limit`); the cache lives
in :mod:`autoqra.layer_cache` and its names are re-exported here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from typing import Any

import attrs
import torch
from peft import get_peft_model
from torch import nn

from autoqra.layer_cache import (  # noqa: F401
    CACHE_BYTES_ENV,
    DEFAULT_CACHE_BYTES,
    MIN_DEFAULT_CACHE_BYTES,
    LayerKey,
    QuantCache,
    default_cache_limit,
    layer_bytes,
    quant_cache,
    set_quant_cache_limit,
    storage_bytes,
)
from autoqra.quant_backends import UNQUANTIZED_BITS, QuantBackend, get_backend
from autoqra.quant_backends._experts import as_linear, dense_experts, quantize_experts, quiet_pattern_warnings
from autoqra.quant_backends._experts import lora_custom_modules as experts_lora_modules
from autoqra.space import Assignment, SearchSpace
from autoqra.unit_types import GRANULARITIES
from autoqra.units import expert_params, is_linear_like

log = logging.getLogger(__name__)


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
    for gran in GRANULARITIES:
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
