r"""Importance priors per unit, min-max normalised to [0, 1].

* ``I_q`` (quantization sensitivity): quantize only unit u to the lowest quantized bit-width
  of the ladder (all others unquantized) and measure the mean KL divergence
  KL(p_unquantized ‖ p_quantized) of next-token distributions on calibration batches.
* ``I_r`` (adaptation demand): on the model quantized uniformly at a reference bit-width
  with LoRA (rank ``ref_rank``) on every unit, the squared norm of the loss gradient w.r.t.
  the LoRA ``B`` matrices of unit u, averaged over batches. With ``B = 0`` at init this is the
  first-order loss decrease a unit-norm step on that unit's adapter can buy: how much an
  adapter there can reduce the loss.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch
from torch import nn

from autoqra.apply import apply_assignment, quantize_model
from autoqra.precision import autocast, model_device
from autoqra.quant_backends import UNQUANTIZED_BITS, QuantBackend, get_backend
from autoqra.space import Assignment, SearchSpace

if TYPE_CHECKING:
    from autoqra.progress import ProgressFn

log = logging.getLogger(__name__)


@attrs.define
class Importance:
    """Per-unit priors. ``q`` and ``r`` are normalised to [0, 1]; ``raw_*`` keep the measured values."""

    q: np.ndarray
    r: np.ndarray
    raw_q: np.ndarray
    raw_r: np.ndarray
    seconds: float = 0.0

    @property
    def spearman(self) -> float:
        """Spearman rank correlation between I_q and I_r (the paper reports them near-orthogonal)."""
        return spearman(self.raw_q, self.raw_r)

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in attrs.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Importance:
        return cls(**{k: (np.asarray(v, dtype=float) if k != "seconds" else v) for k, v in d.items()})

    @classmethod
    def from_cost_model(cls, cm: Any, space: SearchSpace) -> Importance:
        """Priors read off a cost model: I_q = damage at the lowest quantized bit-width (the same KL
        the priors measure), I_r = the leave-one-out gain of the largest rank."""
        quant = [i for i, b in enumerate(cm.bits) if b != UNQUANTIZED_BITS]
        raw_q = cm.quant[:, quant[0]] if quant else np.zeros(space.n_units)
        raw_r = cm.rank_gain[:, -1]
        return cls(minmax(raw_q), minmax(raw_r), np.asarray(raw_q, float), np.asarray(raw_r, float), cm.seconds)

    @classmethod
    def uniform(cls, n: int) -> Importance:
        half = np.full(n, 0.5)
        return cls(half, half.copy(), half.copy(), half.copy())


def minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    span = x.max() - x.min()
    return np.full_like(x, 0.5) if span <= 0 or not np.isfinite(span) else (x - x.min()) / span


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def _logprobs(model: nn.Module, batches: list[torch.Tensor], precision: str = "fp32") -> list[torch.Tensor]:
    """Next-token log-probabilities (fp32) of each batch, on the model's device, under ``precision``'s autocast."""
    model.eval()
    dev = model_device(model)
    out = []
    for b in batches:
        with autocast(dev, precision):
            logits = model(input_ids=b.to(dev)).logits
        out.append(torch.log_softmax(logits.float(), -1))
    return out


@torch.no_grad()
def quant_sensitivity(
    model: nn.Module, space: SearchSpace, backend: QuantBackend, batches: list[torch.Tensor],
    calib_ids: torch.Tensor | None = None, precision: str = "fp32", progress: ProgressFn | None = None,
) -> np.ndarray:
    """Raw I_q: mean next-token KL(unquantized ‖ only-unit-u-at-lowest-bits), nats per token.
    ``progress``: ``fn("quantization sensitivity", units done, n_units)``."""
    low = min(b for b in space.bits if b != UNQUANTIZED_BITS)
    ref = _logprobs(model, batches, precision)
    out = np.zeros(space.n_units)
    if progress is not None:
        progress("quantization sensitivity", 0, space.n_units)
    for u in range(space.n_units):
        bits = [UNQUANTIZED_BITS] * space.n_units
        own = [b for b in space.unit_bits(u) if b != UNQUANTIZED_BITS] if hasattr(space, "unit_bits") else [low]
        bits[u] = low if low in own else min(own or [UNQUANTIZED_BITS])  # an embedding: its lowest bits
        a = Assignment(space.unit_names, bits, [0] * space.n_units)
        qm = quantize_model(model, _with_16(space), a, backend, calib_ids=calib_ids)
        kl = [
            torch.sum(p.exp() * (p - q), -1).mean().item()
            for p, q in zip(ref, _logprobs(qm, batches, precision))
        ]
        out[u] = float(np.mean(kl))
        if progress is not None:
            progress("quantization sensitivity", u + 1, space.n_units)
    return out


def adaptation_demand(
    model: nn.Module, space: SearchSpace, backend: QuantBackend, batches: list[torch.Tensor],
    ref_bits: int, ref_rank: int, seed: int = 0, calib_ids: torch.Tensor | None = None, precision: str = "fp32",
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Raw I_r: mean over batches of ‖∂loss/∂B_u‖² summed over unit u's LoRA B matrices.
    ``progress``: ``fn("adaptation demand", batches done, n_batches, "batches")``."""
    sp = _with_16(space, extra_ranks=(ref_rank,))
    a = attrs.evolve(sp, bits=tuple(sorted(set(sp.bits) | {ref_bits}))).uniform(ref_bits, ref_rank)
    pm = apply_assignment(model, a, backend, seed=seed, space=sp, dropout=0.0, calib_ids=calib_ids)
    pm.eval()
    mod_to_unit = {m: i for i, unit in enumerate(space.units) for m in unit.modules}
    b_params = []
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            # nested peft ParamWrappers (two expert tensors of one module) insert ".base_layer"
            mod = name.split(".lora_B")[0].removeprefix("base_model.model.").replace(".base_layer", "")
            b_params.append((mod_to_unit[mod], p))
    out = np.zeros(space.n_units)
    dev = model_device(pm)
    if progress is not None:
        progress("adaptation demand", 0, len(batches), "batches")
    for i, ids in enumerate(batches):
        pm.zero_grad(set_to_none=True)
        ids = ids.to(dev)
        with autocast(dev, precision):
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        for u, p in b_params:
            out[u] += float(p.grad.pow(2).sum()) / len(batches)
        if progress is not None:
            progress("adaptation demand", i + 1, len(batches), "batches")
    return out


def _with_16(space: SearchSpace, extra_ranks: tuple[int, ...] = ()) -> SearchSpace:
    return attrs.evolve(space.with_unquantized(), ranks=tuple(sorted(set(space.ranks) | {0, *extra_ranks})))


def compute_importance(
    model: nn.Module,
    space: SearchSpace,
    backend: str | QuantBackend,
    calib_blocks: torch.Tensor,
    batch_size: int = 4,
    ref_bits: int | None = None,
    ref_rank: int = 8,
    seed: int = 0,
    precision: str = "fp32",
    progress: ProgressFn | None = None,
) -> Importance:
    """Measure I_q and I_r on ``calib_blocks`` (``(n, seq_len)`` token ids from the training split).

    Forward and backward passes run on the model's device under ``precision``'s autocast.

    Args:
        ref_bits: quantization of the model I_r is measured on (default: the median quantized bits).
        ref_rank: LoRA rank used for the I_r gradient probe.
        precision: a resolved precision (``"fp32" | "bf16" | "fp16"``).
        progress: ``fn(step, done, total, unit)`` after each unit / batch (:data:`~autoqra.progress.ProgressFn`).
    """
    be = get_backend(backend)
    quant = [b for b in space.bits if b != UNQUANTIZED_BITS]
    if not quant:  # nothing to quantize (e.g. backend "none"): sensitivity is flat
        quant = [UNQUANTIZED_BITS]
    ref_bits = ref_bits if ref_bits is not None else quant[len(quant) // 2]
    batches = [calib_blocks[i : i + batch_size] for i in range(0, calib_blocks.shape[0], batch_size)]
    calib = calib_blocks if be.needs_calibration else None
    t0 = time.perf_counter()
    raw_q = (quant_sensitivity(model, space, be, batches, calib, precision, progress) if quant != [UNQUANTIZED_BITS]
             else np.zeros(space.n_units))
    raw_r = adaptation_demand(model, space, be, batches, ref_bits, ref_rank, seed, calib, precision, progress)
    imp = Importance(minmax(raw_q), minmax(raw_r), raw_q, raw_r, time.perf_counter() - t0)
    log.info("importance priors in %.1f s; Spearman(I_q, I_r) = %.2f", imp.seconds, imp.spearman)
    return imp
