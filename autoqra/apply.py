r"""``apply_assignment``: quantize each unit at its bits and wrap LoRA at its rank.

The source model is never modified: the result is a structural copy whose frozen,
unquantized tensors share storage with the source (no extra bytes), while quantized
layers come from a per-source-model cache keyed by ``(module, bits, backend spec)`` so the
next candidate re-quantizes only the units whose bits changed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
import weakref
from typing import Any

import torch
from torch import nn

from autoqra.quant_backends import UNQUANTIZED_BITS, QuantBackend, get_backend
from autoqra.space import Assignment, SearchSpace

log = logging.getLogger(__name__)

_CACHES: weakref.WeakKeyDictionary[nn.Module, QuantCache] = weakref.WeakKeyDictionary()


class QuantCache:
    """Quantized layers and calibration statistics of one source model.

    Attributes:
        hits / misses: counts of quantized-layer lookups (for reporting apply cost).
    """

    def __init__(self) -> None:
        self.layers: dict[tuple[str, int, str], nn.Module] = {}
        self.calib: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.layers.clear()
        self.calib.clear()


def quant_cache(model: nn.Module) -> QuantCache:
    """The (weakly held) quantized-layer cache attached to a source model."""
    cache = _CACHES.get(model)
    if cache is None:
        cache = _CACHES[model] = QuantCache()
    return cache


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


def quantize_model(
    model: nn.Module,
    space: SearchSpace,
    assignment: Assignment,
    backend: str | QuantBackend = "hqq",
    calib_ids: torch.Tensor | None = None,
) -> nn.Module:
    """Return a copy of ``model`` with each unit's linears quantized at the assigned bits (no LoRA)."""
    be = get_backend(backend)
    be.check_bits(assignment.bits)
    mm = space.module_map(assignment)
    cache = quant_cache(model)
    spec = _spec_key(be)
    stats: dict[str, Any] = {}
    to_quant = [m for m, (b, _) in mm.items() if b != UNQUANTIZED_BITS]
    if be.needs_calibration and to_quant:
        if calib_ids is None:
            raise ValueError(
                f"backend {be.name!r} needs calibration data: pass calib_ids=(n_seq, seq_len) token ids "
                "(the optimizer passes batches from the task's training split)"
            )
        ckey = f"{spec}|{calibration_key(calib_ids)}"
        if ckey not in cache.calib:
            t0 = time.perf_counter()
            cache.calib[ckey] = be.calibrate(model, space.module_names, calib_ids)
            log.info("calibrated %d modules for %s in %.1f s", len(space.module_names), be.name, time.perf_counter() - t0)
        stats = cache.calib[ckey]
    new = shared_copy(model)
    src_mods = dict(model.named_modules())
    for name in to_quant:
        bits = mm[name][0]
        key = (name, bits, spec)
        q = cache.layers.get(key)
        if q is None:
            cache.misses += 1
            lin = src_mods[name]
            with torch.no_grad():
                q = be.quantize(lin, bits, calib=stats.get(name))
            q.requires_grad_(False)
            cache.layers[key] = q
        else:
            cache.hits += 1
        parent_name, child = name.rsplit(".", 1)
        setattr(new.get_submodule(parent_name), child, q)
    return new


def apply_assignment(
    model: nn.Module,
    assignment: Assignment,
    backend: str | QuantBackend = "hqq",
    seed: int = 0,
    *,
    space: SearchSpace | None = None,
    alpha_ratio: float = 2.0,
    dropout: float = 0.05,
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
        alpha_ratio: LoRA α = ratio · r.
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
    from peft import get_peft_model

    be.prepare_for_peft(qmodel)
    cfg = space.lora_config(assignment, alpha_ratio=alpha_ratio, dropout=dropout)
    custom = be.lora_custom_modules()
    if custom:
        cfg._register_custom_module(custom)
    torch.manual_seed(seed)
    peft_model = get_peft_model(qmodel, cfg)
    bad = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    if bad:  # pragma: no cover - guards against a peft behaviour change
        raise RuntimeError(f"non-LoRA parameters are trainable after wrapping: {bad[:5]}")
    return peft_model


def space_for(model: nn.Module, assignment: Assignment) -> SearchSpace:
    """Rebuild the search space an assignment was made in (granularity inferred from unit names)."""
    gran = "module" if assignment.units and assignment.units[0].endswith("_proj") else "block"
    bits = sorted(set(assignment.bits))
    ranks = sorted(set(assignment.ranks))
    names = {u.rsplit(".", 1)[-1] for u in assignment.units} if gran == "module" else None
    space = SearchSpace.from_model(model, bits=bits, ranks=ranks, granularity=gran, target_modules=names)
    if space.unit_names != assignment.units:
        raise ValueError("the assignment's units do not match this model; pass space= explicitly")
    return space
