r"""The calibrated cost model: what each unit's bit-width costs and what its LoRA rank buys, in nats.

Two tables, both in **nats per token** of held-out loss, measured cheaply on the real model:

* ``quant[u, b]``: damage of unit ``u`` at bit-width ``b`` — the mean next-token
  ``KL(p_unquantized ‖ p_only-u-at-b)`` on calibration blocks of the training split (forward passes
  only; 0 at 16 bits). Measured for every rung of the bit ladder, so no unit is free: the least
  sensitive unit still pays its own measured damage (min–max normalised priors gave it 0).
* ``rank_gain[u, r]``: what unit ``u``'s adapter of rank ``r`` buys after the *final* training — measured
  by leave-one-out on trained probe models (every unit at the reference bit-width with an adapter of the
  smallest, then the largest positive rank, trained ``steps`` optimizer steps of the search's own recipe;
  each unit's adapter switched off in turn, peft ``scaling = 0``, and the held-out loss increase recorded),
  then shrunk towards the mean by the measured noise, made non-negative and non-decreasing in rank, and
  scaled to the final training's horizon by the measured growth of all adapters' gain between two horizons
  (:mod:`autoqra.guidance.rankmodel`). Leave-one-out measures each adapter's *marginal* value beside all
  the others, which is what a swap trades. ``rank_gain_probe`` keeps the previous table (the smallest
  rank's raw values for every positive rank) so benchmarks can compare the two.

The KL of a 0-step pass is not the loss a trained candidate pays: LoRA training recovers part of it
(on SmolLM2 uniform 4-bit, Σ KL ≈ 0.3 nats but the 30-step score is 78 mnat below 16-bit). The
optimizer therefore calibrates one scale ``quant_scale`` on the uniform baselines it runs anyway
(:func:`calibrate_quant_scale`, least squares of their real scores against the predicted damage)
before Phase I. The additive prediction of an assignment's score relative to the unquantized model
without adapters is ``Σ_u rank_gain[u, r_u] − quant_scale · quant[u, b_u]`` (:meth:`CostModel.predict`). Repair, fill, mutation
and the warm start compare bytes against these nats; Phase II models the residual of real scores
around it. The optimizer reports the Spearman of this prediction against its real high-fidelity
trial scores (``Result.info["cost_model"]``).

The rank probes and their leave-one-out (:func:`rank_probes`, :class:`RankProbes`, :func:`leave_one_out`,
:func:`adapters_off`, :func:`whole_gain`) are in :mod:`autoqra.guidance.probes` and re-exported here.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch
from torch import nn

from autoqra.apply import quantized_layers, set_module, shared_copy
from autoqra.guidance.importance import _logprobs, spearman
from autoqra.guidance.prefix import PrefixReplay
from autoqra.guidance.probes import (  # noqa: F401
    RankProbes,
    adapters_off,
    leave_one_out,
    probe_table,
    rank_probes,
    whole_gain,
)
from autoqra.guidance.rankmodel import rank_table
from autoqra.quant_backends import UNQUANTIZED_BITS, QuantBackend
from autoqra.space import Assignment, SearchSpace

if TYPE_CHECKING:
    from autoqra.progress import ProgressFn

log = logging.getLogger(__name__)


@attrs.define
class CostModel:
    """Per-unit option values in nats/token (see the module docstring).

    Attributes:
        bits / ranks: the ladders the tables index (bits may include 16).
        quant: ``(n_units, len(bits))`` damage, >= 0, 0 at 16 bits.
        rank_gain: ``(n_units, len(ranks))`` loss decrease bought by the adapter, 0 at rank 0.
        steps: the training horizon ``rank_gain`` was measured at (optimizer steps).
        ref_bits: the bit-width the adapters were trained on.
        seconds: measurement time.
    """

    bits: tuple[int, ...] = attrs.field(converter=lambda v: tuple(int(x) for x in v))
    ranks: tuple[int, ...] = attrs.field(converter=lambda v: tuple(int(x) for x in v))
    quant: np.ndarray = attrs.field(converter=lambda v: np.asarray(v, dtype=float))
    rank_gain: np.ndarray = attrs.field(converter=lambda v: np.asarray(v, dtype=float))
    steps: int = 0
    ref_bits: int = 0
    seconds: float = 0.0
    quant_scale: float = 1.0
    rank_gain_probe: np.ndarray | None = attrs.field(
        default=None, converter=attrs.converters.optional(lambda v: np.asarray(v, dtype=float)))
    rank_info: dict[str, Any] = attrs.Factory(dict)

    def table(self, space: SearchSpace, quant_scale: float | None = None) -> np.ndarray:
        """``(n_units, len(space.bits), len(space.ranks))``: predicted score of each unit's option
        (``quant_scale`` overrides the calibrated one, e.g. to hedge it), indexed like
        ``SearchSpace.encode``: a unit with its own options (embedding / head) fills the first
        ``len(space.unit_bits(u))`` × ``len(space.unit_ranks(u))`` entries, the rest is ``-inf`` (never chosen)."""
        c = self.quant_scale if quant_scale is None else quant_scale
        if not getattr(space, "has_own", False):
            bi = [self.bits.index(b) for b in space.bits]
            ri = [self.ranks.index(r) for r in space.ranks]
            return self.rank_gain[:, None, ri] - c * self.quant[:, bi, None]
        out = np.full((space.n_units, len(space.bits), len(space.ranks)), -np.inf)
        for u in range(space.n_units):
            q = np.array([self.quant[u, self.bits.index(b)] if b in self.bits else 0.0 for b in space.unit_bits(u)])
            g = np.array([self.rank_gain[u, self.ranks.index(r)] if r in self.ranks else 0.0
                          for r in space.unit_ranks(u)])
            out[u, :len(q), :len(g)] = g[None, :] - c * q[:, None]
        return out

    def damage(self, a: Assignment) -> float:
        """Unscaled quantization damage ``Σ_u quant[u, b_u]`` of ``a`` (16 bits: 0)."""
        return float(sum(self.quant[u, self.bits.index(b)] for u, b in enumerate(a.bits) if b in self.bits))

    def gain(self, a: Assignment) -> float:
        """Predicted adapter gain ``Σ_u rank_gain[u, r_u]`` of ``a`` (nats)."""
        return float(sum(self.rank_gain[u, self.ranks.index(r)] for u, r in enumerate(a.ranks) if r in self.ranks))

    def predict(self, a: Assignment) -> float:
        """Additive predicted score of ``a`` relative to the unquantized model without adapters (nats)."""
        return self.gain(a) - self.quant_scale * self.damage(a)

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else list(v) if isinstance(v, tuple) else v)
                for k, v in attrs.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        return cls(**d)


@torch.no_grad()
def quant_damage(model: nn.Module, space: SearchSpace, backend: QuantBackend, batches: list[torch.Tensor],
                 calib_ids: torch.Tensor | None = None, precision: str = "fp32", replay: bool = True,
                 progress: ProgressFn | None = None) -> np.ndarray:
    """``(n_units, len(space.all_bits))``: mean next-token KL(unquantized ‖ only unit u at b), 0 at 16 bits.

    Columns are every bit option of any unit (``space.all_bits``; the ladder when no unit has its own). A
    bit-width a unit does not allow (an embedding at 2 bits) gets the damage of the unit's next higher
    option (finite, never chosen: ``CostModel.table`` reads each unit's own options only).

    One structural copy of the model is made; each unit's linears are swapped for their quantized
    layers (cached: later trials reuse them), scored, and swapped back. With ``replay`` the decoder
    layers below a unit's first layer are not recomputed: their outputs on the unquantized pass are
    replayed (:mod:`~autoqra.guidance.prefix`; same table, about half the layer compute).
    ``progress``: ``fn("KL table", units done, n_units)`` (:data:`~autoqra.progress.ProgressFn`).
    """
    if progress is not None:
        progress("KL table", 0, space.n_units)
    work = shared_copy(model)
    rp = PrefixReplay.find(work, space.module_names, enabled=replay)
    with rp.record():
        ref = _logprobs(work, batches, precision)
    mods = dict(work.named_modules())
    cols = space.all_bits if hasattr(space, "all_bits") else space.bits
    out = np.zeros((space.n_units, len(cols)))
    for u, unit in enumerate(space.units):
        originals = {m: mods[m] for m in unit.modules}
        start = rp.first_layer(unit.modules)
        allowed = space.unit_bits(u) if hasattr(space, "unit_bits") else space.bits
        for j, b in enumerate(cols):
            if b == UNQUANTIZED_BITS or b not in allowed:
                continue
            layers = quantized_layers(model, dict.fromkeys(unit.modules, b), backend, calib_ids, space.module_names)
            for name, q in layers.items():
                set_module(work, name, q)
            with rp.below(start):
                logp = _logprobs(work, batches, precision)
            kl = [torch.sum(p.exp() * (p - q), -1).mean().item() for p, q in zip(ref, logp)]
            out[u, j] = max(0.0, float(np.mean(kl)))
        for name, lin in originals.items():
            set_module(work, name, lin)
        for j in reversed(range(len(cols))):  # options the unit does not have: its next higher option's damage
            if cols[j] not in allowed:
                out[u, j] = out[u, j + 1] if j + 1 < len(cols) else 0.0
        if progress is not None:
            progress("KL table", u + 1, space.n_units)
    return out


def measure_cost_model(evaluator: Any, space: SearchSpace, calib_blocks: torch.Tensor, steps: int,
                       ref_bits: int | None = None, batch_size: int = 8, rank_probes_n: int = 2,
                       loo_blocks: int | None = 8, progress: ProgressFn | None = None,
                       final_steps: int | None = None, t1: int | None = None) -> CostModel:
    """Measure both tables with a fine-tune evaluator (``build``, ``fit``, ``score``, ``backend``, ``model``).

    Args:
        evaluator: e.g. :class:`~autoqra.evaluators.finetune.FinetuneEvaluator`; its training recipe,
            precision and held-out blocks are used.
        space: the search space (bits without 16 are fine).
        calib_blocks: ``(n, seq_len)`` token ids for the KL measurements (training split).
        steps: training horizon of the rank probes (the search's high fidelity).
        ref_bits: bit-width of the rank probes (default: the median quantized bit-width).
        rank_probes_n: 2 (default: the smallest and the largest positive rank) or 1 (the smallest only).
        loo_blocks: held-out blocks per leave-one-out score (fewer than the evaluator's: n_units + 1
            scores per probe).
        progress: ``fn(step, done, total, unit)`` after each unit of the KL table, each training step of
            the rank probes and each unit of their leave-one-out (:data:`~autoqra.progress.ProgressFn`).
        final_steps: the final training's steps (the horizon the rank table is scaled to; default ``steps``).
        t1: the earlier horizon of the growth measurement (default ``steps // 3``; the search passes its mid rung).
    """
    t0 = time.perf_counter()
    quant_bits = [b for b in space.bits if b != UNQUANTIZED_BITS] or [UNQUANTIZED_BITS]
    ref_bits = ref_bits if ref_bits is not None else quant_bits[len(quant_bits) // 2]
    batches = [calib_blocks[i: i + batch_size] for i in range(0, calib_blocks.shape[0], batch_size)]
    be = evaluator.backend
    calib = evaluator.calib_ids() if hasattr(evaluator, "calib_ids") else None
    quant = quant_damage(evaluator.model, space, be, batches, calib, getattr(evaluator, "precision", "fp32"),
                         progress=progress)
    probes = rank_probes(evaluator, attrs.evolve(space, bits=tuple(sorted(set(space.bits) | {ref_bits}))), steps,
                         ref_bits, rank_probes_n, loo_blocks, t1, progress)
    gains, info = _rank_table(space, probes, steps, final_steps or steps) if probes.loo \
        else (np.zeros((space.n_units, len(space.ranks))), {})
    probe = probe_table(probes, space.ranks) if probes.loo else gains
    ranks = tuple(space.ranks)
    if 0 not in ranks and not all(u.has_rank for u in space.units):  # embedding / head units sit at rank 0
        ranks = (0, *ranks)
        gains, probe = (np.hstack([np.zeros((space.n_units, 1)), t]) for t in (gains, probe))
    cm = CostModel(getattr(space, "all_bits", space.bits), ranks, quant, gains, steps, ref_bits,
                   time.perf_counter() - t0, rank_gain_probe=probe, rank_info=info)
    log.info("cost model in %.1f s: quantization damage %.4f-%.4f nats, rank gain at r=%d %.4f-%.4f nats "
             "(horizon factor %.2f)", cm.seconds, quant.max(1).min(), quant.max(), space.ranks[-1], gains[:, -1].min(),
             gains[:, -1].max(), info.get("horizon_factor", 1.0))
    return cm


def _rank_table(space: SearchSpace, probes: RankProbes, steps: int, final_steps: int) -> tuple[np.ndarray, dict]:
    """:func:`rank_table` over the units that take a rank (embedding / head units: 0 gain, and left out of
    the table's shrinkage and noise estimates)."""
    mask = np.array([u.has_rank for u in space.units], dtype=bool)
    if mask.all():
        return rank_table(probes.loo, space.ranks, probes.whole, steps, final_steps)
    sub, info = rank_table({r: np.asarray(v)[mask] for r, v in probes.loo.items()}, space.ranks, probes.whole, steps,
                           final_steps)
    out = np.zeros((space.n_units, len(space.ranks)))
    out[mask] = sub
    return out, info


def calibrate_quant_scale(cm: CostModel, assignments: list[Assignment], scores: list[float],
                          lo: float = 0.02, hi: float = 1.0, catastrophic: float = 1.0) -> float | None:
    """Least-squares scale ``c`` of ``score ≈ a + gain − c · damage`` over real (trained) trials.

    Trials scoring more than ``catastrophic`` nats below the best are left out (a collapsed model is
    not on the line); needs two trials of different damage, else None. ``c`` is clipped to [lo, hi].
    """
    rows = [(a, s) for a, s in zip(assignments, scores) if np.isfinite(s) and all(r in cm.ranks for r in a.ranks)]
    if not rows:
        return None
    best = max(s for _, s in rows)
    keep = [(cm.damage(a), s - cm.gain(a)) for a, s in rows if s >= best - catastrophic]
    d = np.array([p[0] for p in keep])
    y = np.array([p[1] for p in keep])
    if len(keep) < 2 or np.ptp(d) <= 0:
        return None
    slope = np.polyfit(d, y, 1)[0]  # y = a - c d
    return float(np.clip(-slope, lo, hi))


def prediction_spearman(cm: CostModel, assignments: list[Assignment], scores: list[float]) -> float:
    """Spearman rank correlation of the additive prediction with real scores (nan with < 3 points)."""
    if len(scores) < 3:
        return float("nan")
    return spearman(np.array([cm.predict(a) for a in assignments]), np.asarray(scores, dtype=float))
