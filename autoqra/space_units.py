r"""The units of a model's search space: which weight matrices are searched, how they are grouped into units,
and the bit options of the embedding / head units (:meth:`autoqra.space.SearchSpace.from_model`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from autoqra.quant_backends import UNQUANTIZED_BITS, get_backend
from autoqra.units import Coverage, Unit, WeightTensor, coverage, discover, embedding_units, matches

log = logging.getLogger("autoqra.space")  # the space's messages (coverage warning, embedding options)

#: Quantized bit options of embedding / head units (each where the backend stores it; 16 is always an option).
EMBEDDING_BITS = (4, 8)


def model_units(model: nn.Module, bits_t: tuple[int, ...], granularity: str, target_modules: Sequence[str] | None,
                backend: Any, embeddings: str) -> tuple[tuple[Unit, ...], Coverage, list[tuple[str, tuple[int, ...]]]]:
    """``(units, coverage, own bit options)`` of ``model``'s space on the (validated) bit ladder ``bits_t``;
    the arguments are those of :meth:`~autoqra.space.SearchSpace.from_model`."""
    found = discover(model)
    targets = tuple(target_modules) if target_modules else None
    candidates = [f for f in found if f.reason is None]
    chosen = [f for f in candidates if targets is None or matches(f.tensor, targets)]
    if not chosen:
        what = f"named {list(targets)} " if targets else ""
        raise ValueError(
            f"no weight matrix {what}inside the decoder blocks was found in {type(model).__name__} "
            f"({len(candidates)} candidates); pass target_modules= with the last names of your model's "
            "linear/experts modules (e.g. ['q_proj', 'v_proj'])"
        )
    if backend is not None:
        get_backend(backend).check_bits(bits_t)
    groups: dict[str, list[WeightTensor]] = {}
    for f in chosen:
        groups.setdefault(unit_key(f.block, f.tensor.module, granularity), []).append(f.tensor)
    units = tuple(Unit.of(k, v) for k, v in groups.items())
    cov = coverage(found, [f.tensor for f in chosen])
    warn = cov.warning()
    if warn:
        log.warning("%s", warn)
    own: list[tuple[str, tuple[int, ...]]] = []
    if embeddings == "search":
        first: list[Unit] = []
        last: list[Unit] = []
        for eu in embedding_units(model):
            opts = embedding_options(eu, backend, len(bits_t))
            if len(opts) < 2:
                continue
            own.append((eu.name, opts))
            (first if eu.kind == "embedding" else last).append(eu)
        units = (*first, *units, *last)
    return units, cov, own


def unit_key(block: str, module: str, granularity: str) -> str:
    """The unit a weight of ``module`` inside decoder block ``block`` belongs to at ``granularity``
    (:data:`autoqra.unit_types.GRANULARITIES`): the block, the block's child that holds the module (``model.layers.3.self_attn``,
    ``model.layers.3.mlp``; the module itself when it sits directly in the block), or the module."""
    if granularity == "block":
        return block
    if granularity == "sublayer" and module.startswith(block + "."):
        return f"{block}.{module[len(block) + 1:].split('.')[0]}"
    return module


def embedding_options(unit: Unit, backend: Any, width: int) -> tuple[int, ...]:
    """The bit options of an embedding / head unit: 16 and each of :data:`EMBEDDING_BITS` the backend stores
    for it (:meth:`~autoqra.quant_backends.QuantBackend.embedding_bits`; default backend HQQ), the lowest
    dropped while there are more than ``width`` (the ladder's width)."""
    from autoqra.quant_backends import get_backend as _get

    try:
        be = _get(backend if backend is not None else "hqq") if not hasattr(backend, "embedding_bits") else backend
    except ImportError:  # no backend named and hqq missing: offer the options, apply checks them
        return tuple(sorted({*EMBEDDING_BITS, UNQUANTIZED_BITS}))[-width:]
    stored = set(be.embedding_bits(unit))
    opts = tuple(sorted({b for b in EMBEDDING_BITS if b in stored} | {UNQUANTIZED_BITS}))
    if len(opts) < len(EMBEDDING_BITS) + 1:
        log.info("%s (%s): backend %r stores only bits %s for it", unit.name, unit.kind, be.name, list(opts))
    return opts[-width:] if width > 0 else opts

