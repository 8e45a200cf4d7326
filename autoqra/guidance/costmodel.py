r"""The calibrated cost model: what each unit's bit-width costs and what its LoRA rank buys, in nats.

Two tables, both in **nats per token** of held-out loss, measured cheaply on the real model:

* ``quant[u, b]``: damage of unit ``u`` at bit-width ``b`` — the mean next-token
  ``KL(p_unquantized ‖ p_only-u-at-b)`` on calibration blocks of the training split (forward passes
  only; 0 at 16 bits). Measured for every rung of the bit ladder, so no unit is free: the least
  sensitive unit still pays its own measured damage (min–max normalised priors gave it 0).
* ``rank_gain[u, r]``: what unit ``u``'s adapter of rank ``r`` buys after ``steps`` optimizer steps of
  the search's own training recipe — leave-one-out on a trained model: every unit at the reference
  bit-width with an adapter of rank ``r``, trained ``steps`` steps, then each unit's adapter switched
  off in turn (peft ``scaling = 0``) and the held-out loss increase recorded. By default it is
  measured at the smallest positive rank and taken for every positive rank: with the default LoRA
  scaling α/r (``TrainSpec.lora_alpha``) ranks 4, 8 and 16 reached the same SmolLM2 test loss within
  1.4 mnat at 60 steps, so a larger rank buys bytes, not quality, at these horizons. With
  ``rank_probes=2`` it is also measured at the largest rank and interpolated linearly in
  ``log2(r)`` (for long trainings, where capacity may count). Leave-one-out measures each adapter's
  *marginal* value beside all the others, which is what a swap trades.

The KL of a 0-step pass is not the loss a trained candidate pays: LoRA training recovers part of it
(on SmolLM2 uniform 4-bit, Σ KL ≈ 0.3 nats but the 30-step score is 78 mnat below 16-bit). The
optimizer therefore calibrates one scale ``quant_scale`` on the uniform baselines it runs anyway
(:func:`calibrate_quant_scale`, least squares of their real scores against the predicted damage)
before Phase I. The additive prediction of an assignment's score relative to the unquantized model
without adapters is ``Σ_u rank_gain[u, r_u] − quant_scale · quant[u, b_u]`` (:meth:`CostModel.predict`). Repair, fill, mutation
and the warm start compare bytes against these nats; Phase II models the residual of real scores
around it. The optimizer reports the Spearman of this prediction against its real high-fidelity
trial scores (``Result.info["cost_model"]``).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch
from torch import nn

from autoqra.apply import quantized_layers, set_module, shared_copy
from autoqra.guidance.importance import _logprobs, spearman
from autoqra.guidance.prefix import PrefixReplay
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

    def table(self, space: SearchSpace, quant_scale: float | None = None) -> np.ndarray:
        """``(n_units, len(space.bits), len(space.ranks))``: predicted score of each unit's option
        (``quant_scale`` overrides the calibrated one, e.g. to hedge it)."""
        bi = [self.bits.index(b) for b in space.bits]
        ri = [self.ranks.index(r) for r in space.ranks]
        c = self.quant_scale if quant_scale is None else quant_scale
        return self.rank_gain[:, None, ri] - c * self.quant[:, bi, None]

    def damage(self, a: Assignment) -> float:
        """Unscaled quantization damage ``Σ_u quant[u, b_u]`` of ``a`` (16 bits: 0)."""
        return float(sum(self.quant[u, self.bits.index(b)] for u, b in enumerate(a.bits) if b in self.bits))

    def gain(self, a: Assignment) -> float:
        """Predicted adapter gain ``Σ_u rank_gain[u, r_u]`` of ``a`` (nats)."""
        return float(sum(self.rank_gain[u, self.ranks.index(r)] for u, r in enumerate(a.ranks)))

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
    """``(n_units, len(space.bits))``: mean next-token KL(unquantized ‖ only unit u at b), 0 at 16 bits.

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
    out = np.zeros((space.n_units, len(space.bits)))
    for u, unit in enumerate(space.units):
        originals = {m: mods[m] for m in unit.modules}
        start = rp.first_layer(unit.modules)
        for j, b in enumerate(space.bits):
            if b == UNQUANTIZED_BITS:
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
        if progress is not None:
            progress("KL table", u + 1, space.n_units)
    return out


def _unit_layers(pm: nn.Module, space: SearchSpace) -> list[list[nn.Module]]:
    """The peft LoRA layers of each unit (by module name)."""
    mods = dict(pm.named_modules())
    out = []
    for unit in space.units:
        layers = []
        for m in unit.modules:
            layer = mods.get(f"base_model.model.{m}")
            if layer is not None and hasattr(layer, "scaling"):
                layers.append(layer)
        out.append(layers)
    return out


@torch.no_grad()
def leave_one_out(evaluator: Any, pm: nn.Module, space: SearchSpace, progress: ProgressFn | None = None) -> np.ndarray:
    """Held-out loss increase when each unit's adapters are switched off in turn (nats/token).

    When the evaluator's score is replayable, layers below a unit are not recomputed (their outputs
    with every adapter on are replayed; :mod:`~autoqra.guidance.prefix`). ``progress``:
    ``fn("leave-one-out", units done, n_units)``."""
    if progress is not None:
        progress("leave-one-out", 0, space.n_units)
    rp = PrefixReplay.find(pm, space.module_names, enabled=getattr(evaluator, "replayable_score", False))
    with rp.record():
        base, _ = evaluator.score(pm)
    out = np.zeros(space.n_units)
    for u, layers in enumerate(_unit_layers(pm, space)):
        saved = [dict(layer.scaling) for layer in layers]
        for layer in layers:
            for k in layer.scaling:
                layer.scaling[k] = 0.0
        with rp.below(rp.first_layer(space.units[u].modules)):
            s, _ = evaluator.score(pm)
        for layer, sc in zip(layers, saved):
            layer.scaling.update(sc)
        out[u] = base - s  # score = -loss: switching a useful adapter off lowers the score
        if progress is not None:
            progress("leave-one-out", u + 1, space.n_units)
    return out


def rank_gains(evaluator: Any, space: SearchSpace, steps: int, ref_bits: int, probes: int = 1,
               loo_blocks: int | None = None, progress: ProgressFn | None = None) -> np.ndarray:
    """``(n_units, len(space.ranks))``: leave-one-out gains (trained ``steps`` steps at ``ref_bits``)
    at the smallest positive rank (``probes=1``: the same for every positive rank) or at the smallest
    and the largest, interpolated in log2(rank) (``probes=2``); 0 at rank 0. ``loo_blocks``: held-out
    blocks scored per switch-off (default: the evaluator's). ``progress``: each probe's training steps
    (``fn("rank probe r8 training", step, steps, "steps")``) and leave-one-out units."""
    pos = [r for r in space.ranks if r > 0]
    out = np.zeros((space.n_units, len(space.ranks)))
    if not pos or steps < 1:
        return out
    probes_r = sorted({pos[0], pos[-1]}) if probes >= 2 else [pos[0]]
    measured: dict[int, np.ndarray] = {}
    saved = getattr(evaluator, "eval_blocks", None)
    try:
        if loo_blocks is not None and saved is not None:
            evaluator.eval_blocks = min(loo_blocks, saved)
        for r in probes_r:
            a = Assignment(space.unit_names, [ref_bits] * space.n_units, [r] * space.n_units)
            pm = evaluator.build(a)
            if progress is not None and "on_step" in inspect.signature(evaluator.fit).parameters:
                what = f"rank probe r{r} training"
                progress(what, 0, steps, "steps")
                evaluator.fit(pm, steps, on_step=lambda i, _loss, w=what: progress(w, i + 1, steps, "steps"))
            else:
                evaluator.fit(pm, steps)
            measured[r] = leave_one_out(evaluator, pm, space, progress)
            del pm
    finally:
        if saved is not None:
            evaluator.eval_blocks = saved
    lo, hi = probes_r[0], probes_r[-1]
    for j, r in enumerate(space.ranks):
        if r == 0:
            continue
        if hi == lo:
            out[:, j] = measured[hi]
            continue
        t = (math.log2(r) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
        out[:, j] = (1 - t) * measured[lo] + t * measured[hi]
    return out


def measure_cost_model(evaluator: Any, space: SearchSpace, calib_blocks: torch.Tensor, steps: int,
                       ref_bits: int | None = None, batch_size: int = 8, rank_probes: int = 1,
                       loo_blocks: int | None = 8, progress: ProgressFn | None = None) -> CostModel:
    """Measure both tables with a fine-tune evaluator (``build``, ``fit``, ``score``, ``backend``, ``model``).

    Args:
        evaluator: e.g. :class:`~autoqra.evaluators.finetune.FinetuneEvaluator`; its training recipe,
            precision and held-out blocks are used.
        space: the search space (bits without 16 are fine).
        calib_blocks: ``(n, seq_len)`` token ids for the KL measurements (training split).
        steps: training horizon of the rank probes (the search's high fidelity).
        ref_bits: bit-width of the rank probes (default: the median quantized bit-width).
        rank_probes: 1 (the smallest positive rank stands for all) or 2 (also the largest; see
            :func:`rank_gains`).
        loo_blocks: held-out blocks per leave-one-out score (fewer than the evaluator's: n_units + 1
            scores per probe).
        progress: ``fn(step, done, total, unit)`` after each unit of the KL table, each training step of
            the rank probe and each unit of its leave-one-out (:data:`~autoqra.progress.ProgressFn`).
    """
    t0 = time.perf_counter()
    quant_bits = [b for b in space.bits if b != UNQUANTIZED_BITS] or [UNQUANTIZED_BITS]
    ref_bits = ref_bits if ref_bits is not None else quant_bits[len(quant_bits) // 2]
    batches = [calib_blocks[i: i + batch_size] for i in range(0, calib_blocks.shape[0], batch_size)]
    be = evaluator.backend
    calib = evaluator.calib_ids() if hasattr(evaluator, "calib_ids") else None
    quant = quant_damage(evaluator.model, space, be, batches, calib, getattr(evaluator, "precision", "fp32"),
                         progress=progress)
    gains = rank_gains(evaluator, attrs.evolve(space, bits=tuple(sorted(set(space.bits) | {ref_bits}))), steps, ref_bits,
                       rank_probes, loo_blocks, progress)
    cm = CostModel(space.bits, space.ranks, quant, gains, steps, ref_bits, time.perf_counter() - t0)
    log.info("cost model in %.1f s: quantization damage %.4f-%.4f nats, rank gain at r=%d %.4f-%.4f nats",
             cm.seconds, quant.max(1).min(), quant.max(), space.ranks[-1], gains[:, -1].min(), gains[:, -1].max())
    return cm


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
