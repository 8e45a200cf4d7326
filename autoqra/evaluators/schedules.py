r"""Learning-rate multiplier schedules of the ``finetune`` evaluator: the recipe's warm-up + cosine (or constant)
(:func:`lr_lambda`) and the warmup-stable-decay rungs (:func:`wsd_lambda`, :func:`decay_steps`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autoqra.config import TrainSpec


def lr_lambda(train: TrainSpec, total_steps: int):
    """Multiplier schedule: linear warm-up, then cosine to 0 (or constant)."""

    def f(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        if train.schedule == "constant" or total_steps <= train.warmup_steps:
            return 1.0
        prog = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))

    return f


def decay_steps(steps: int, fraction: float) -> int:
    """Length of a warmup-stable-decay rung's final decay: ``max(1, round(fraction * steps))`` (0 for 0 steps)."""
    return 0 if steps <= 0 else min(steps, max(1, round(fraction * steps)))


def wsd_lambda(stable: int, total: int, warmup: int = 0):
    """Rung schedule: the recipe's linear warm-up, multiplier 1 up to step ``stable``, then a linear decay
    over the rest (step ``stable + i`` of ``d = total - stable`` decay steps gets ``(d - i) / (d + 1)``)."""
    d = max(1, total - stable)

    def f(step: int) -> float:
        if step >= stable:
            return max(0.0, (d - (step - stable)) / (d + 1))
        return (step + 1) / (warmup + 1) if step < warmup else 1.0

    return f
