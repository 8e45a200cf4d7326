r"""Choosing the storage format of each bit-width before the search: the group size of its scale / zero groups.

A bit-width is not one format: 4 bits in groups of 32 cost 0.5 bit per weight more than in groups of 64
(one more scale and zero per 64 weights) and can be worth far more than those bytes — a model whose weights
were 4-bit in groups of 32 already (SmolLM2 ships as a Q4_1 GGUF) is recovered almost exactly by that grid
and damaged by the coarser one (``benchmarks/studies/group_size.py``: block 5 ``down_proj`` 0.41 % vs 7.3 %
relative reconstruction error). Whether finer (or coarser) groups pay depends on the model, so it is measured.

**The rule.** For each quantized bit-width ``b`` of the ladder except the top one, the decoder's units are all
put at ``b`` in each candidate group size ``g`` and the whole model's damage ``D(b, g)`` (mean next-token
``KL(unquantized ‖ quantized)`` on calibration blocks of the training split, forward passes only) and its
decoder weight bytes ``M(b, g)`` are measured. The bytes a format change costs (or saves) are priced at the
ladder's own exchange rate at ``b``: what moving the units from ``b`` up to the next rung ``b⁺`` buys per byte,
``λ_b = (D(b) − D(b⁺)) / (M(b⁺) − M(b))`` (both in their chosen formats, decided from the top down). The
format with the least ``D(b, g) + λ_b · (M(b, g) − M(b, g₀))`` wins when it saves at least ``min_gain`` of the
default's ``D(b, g₀)``; else the backend's default ``g₀`` stays. In words: a finer group is worth its bytes when
it removes damage more cheaply than spending those bytes on more bits would; a coarser one when the bytes it
frees buy more than the damage it adds. The top rung keeps its default (no rung above it in the ladder to
price its bytes against). A candidate is admissible at ``b`` only when every decoder weight can be stored with
it and every embedding / head unit keeps the bit options it has with the default.

The choice is one format per bit-width for the whole model (a backend option, ``group_size={bits: size}``), not
per unit: the search then trades bit-widths as before, in the chosen formats. Only backends with a settable
group size per bit-width take part (``hqq``); the others keep theirs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch
from torch import nn

from autoqra.apply import quantized_layers, set_module, shared_copy
from autoqra.guidance.importance import _logprobs
from autoqra.quant_backends import UNQUANTIZED_BITS, QuantBackend

if TYPE_CHECKING:
    from autoqra.progress import ProgressFn
    from autoqra.space import SearchSpace

log = logging.getLogger(__name__)

#: group sizes tried at each bit-width (besides the backend's own)
DEFAULT_CANDIDATES = (32, 64, 128)


def supports_formats(backend: QuantBackend) -> bool:
    """Whether ``backend`` has a group size per bit-width that :func:`choose_formats` can set."""
    return hasattr(backend, "group_sizes") and hasattr(backend, "with_group_sizes")


@attrs.frozen
class FormatChoice:
    """What :func:`choose_formats` measured and chose.

    Attributes:
        group_sizes: ``{bits: group size}`` chosen for every bit-width the backend stores (unmeasured ones keep
            the backend's).
        rows: one dict per measured (bits, group size): ``bits, group_size, kl, decoder_bytes, cost, chosen``
            (``cost`` = ``D + λ·ΔM``, the rule's figure; ``None`` at the top rung).
        rates: ``{bits: λ_b}`` in nats per byte.
        seconds: measurement time.
    """

    group_sizes: dict[int, int]
    rows: tuple[dict[str, Any], ...] = ()
    rates: dict[int, float] = attrs.Factory(dict)
    seconds: float = 0.0

    def changed(self, backend: QuantBackend) -> dict[int, int]:
        """The bit-widths whose group size differs from ``backend``'s: ``{bits: chosen size}``."""
        return {b: g for b, g in self.group_sizes.items() if backend.group_sizes.get(b) != g}

    def to_dict(self) -> dict[str, Any]:
        return {"group_sizes": {str(b): g for b, g in self.group_sizes.items()}, "rows": list(self.rows),
                "rates": {str(b): r for b, r in self.rates.items()}, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FormatChoice:
        return cls({int(b): int(g) for b, g in d["group_sizes"].items()}, tuple(d.get("rows", ())),
                   {int(b): float(r) for b, r in d.get("rates", {}).items()}, float(d.get("seconds", 0.0)))


def _decoder_bytes(space: SearchSpace, backend: QuantBackend, bits: int) -> int | None:
    """Weight bytes of every rank unit's tensors at ``bits`` (None: some tensor cannot be stored so)."""
    total = 0
    for unit in space.units:
        if not unit.has_rank:
            continue
        for t in unit.tensors:
            if t.tied:
                continue
            try:
                p, m = backend.weight_bytes(t.out_features, t.in_features, bits)
            except ValueError:
                return None
            total += t.n_experts * (p + m)
    return total


def _keeps_embedding_options(space: SearchSpace, default: QuantBackend, cand: QuantBackend) -> bool:
    return all(set(default.embedding_bits(u)) <= set(cand.embedding_bits(u)) for u in space.units if not u.has_rank)


@torch.no_grad()
def _damage(model: nn.Module, work: nn.Module, space: SearchSpace, backend: QuantBackend, bits: int,
            batches: list[torch.Tensor], ref: list[torch.Tensor], calib_ids: torch.Tensor | None, precision: str) -> float:
    """Mean next-token KL(unquantized ‖ every rank unit at ``bits`` in ``backend``'s format)."""
    names = [m for u in space.units if u.has_rank for m in u.modules]
    mods = dict(work.named_modules())
    originals = {m: mods[m] for m in names}
    layers = quantized_layers(model, dict.fromkeys(names, bits), backend, calib_ids, space.module_names)
    try:
        for name, q in layers.items():
            set_module(work, name, q)
        logp = _logprobs(work, batches, precision)
    finally:
        for name, lin in originals.items():
            set_module(work, name, lin)
    return max(0.0, float(np.mean([torch.sum(p.exp() * (p - q), -1).mean().item() for p, q in zip(ref, logp)])))


def choose_formats(model: nn.Module, space: SearchSpace, backend: QuantBackend, calib_blocks: torch.Tensor,
                   precision: str = "fp32", candidates: Sequence[int] = DEFAULT_CANDIDATES, batch_size: int = 8,
                   calib_ids: torch.Tensor | None = None, min_gain: float = 0.02,
                   progress: ProgressFn | None = None) -> FormatChoice:
    """Measure and choose each bit-width's group size (the module docstring's rule).

    Args:
        model: the unquantized model.
        space: the search space (its ladder's quantized bit-widths are measured; its rank units quantized).
        backend: a backend with ``group_sizes`` and ``with_group_sizes`` (:func:`supports_formats`).
        calib_blocks: ``(n, seq_len)`` token ids of the training split.
        precision: the forward passes' autocast precision.
        candidates: group sizes tried besides the backend's own.
        batch_size: blocks per forward pass.
        calib_ids: calibration ids for backends that need them.
        min_gain: a format other than the default must lower the rule's figure by this share of ``D(b, g₀)``.
        progress: ``fn("whole-decoder KL", done, total, "formats")`` after each measurement.
    """
    if not supports_formats(backend):
        raise ValueError(f"backend {backend.name!r} has no group size per bit-width to choose")
    t0 = time.perf_counter()
    ladder = sorted(b for b in space.bits if b != UNQUANTIZED_BITS)
    chosen = dict(backend.group_sizes)
    if len(ladder) < 2:
        return FormatChoice(chosen, seconds=time.perf_counter() - t0)
    batches = [calib_blocks[i: i + batch_size] for i in range(0, calib_blocks.shape[0], batch_size)]
    work = shared_copy(model)
    ref = _logprobs(work, batches, precision)
    plan = {b: [g for g in dict.fromkeys([backend.group_sizes[b], *candidates])
                if (cand := backend.with_group_sizes({**backend.group_sizes, b: g})) is not None
                and _decoder_bytes(space, cand, b) is not None and _keeps_embedding_options(space, backend, cand)]
            for b in ladder[:-1]}
    total, done = 1 + sum(len(v) for v in plan.values()), 0
    if progress is not None:
        progress("whole-decoder KL", 0, total, "formats")

    def measure(b: int, g: int) -> tuple[float, int]:
        nonlocal done
        be = backend.with_group_sizes({**chosen, b: g})
        out = _damage(model, work, space, be, b, batches, ref, calib_ids, precision), _decoder_bytes(space, be, b)
        done += 1
        if progress is not None:
            progress("whole-decoder KL", done, total, "formats")
        return out

    top = ladder[-1]
    d_up, m_up = measure(top, chosen[top])
    rows: list[dict[str, Any]] = [{"bits": top, "group_size": chosen[top], "kl": d_up, "decoder_bytes": m_up,
                                   "cost": None, "chosen": True}]
    rates: dict[int, float] = {}
    for b in reversed(ladder[:-1]):
        g0 = backend.group_sizes[b]
        meas = {g: measure(b, g) for g in plan[b]}
        d0, m0 = meas[g0]
        lam = max(0.0, (d0 - d_up) / (m_up - m0)) if m_up > m0 else 0.0
        cost = {g: d + lam * (m - m0) for g, (d, m) in meas.items()}
        best = min(cost, key=lambda g: (cost[g], g != g0))
        if cost[best] > cost[g0] - min_gain * d0:
            best = g0
        chosen[b], rates[b] = best, lam
        rows += [{"bits": b, "group_size": g, "kl": d, "decoder_bytes": m, "cost": cost[g], "chosen": g == best}
                 for g, (d, m) in meas.items()]
        d_up, m_up = meas[best]
    fc = FormatChoice(chosen, tuple(sorted(rows, key=lambda r: (r["bits"], r["group_size"]))), rates,
                      time.perf_counter() - t0)
    log.info("formats in %.1f s: group sizes %s (changed: %s)", fc.seconds, fc.group_sizes, fc.changed(backend))
    return fc
