r"""The rank probes: trained probe models whose adapters are switched off one unit at a time.

:func:`rank_probes` trains a probe model per probed rank (every unit at the reference bit-width with an adapter
of that rank) and measures each unit's leave-one-out gain (:func:`leave_one_out`: peft ``scaling = 0`` for
one unit's adapters, :func:`adapters_off`) and the gain of all adapters together (:func:`whole_gain`); the
result (:class:`RankProbes`) is the input of :func:`autoqra.guidance.rankmodel.rank_table`, which the cost
model (:mod:`autoqra.guidance.costmodel`) turns into its ``rank_gain`` table.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch
from torch import nn

from autoqra.guidance.prefix import PrefixReplay
from autoqra.space import SearchSpace

if TYPE_CHECKING:
    from autoqra.progress import ProgressFn


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


@contextlib.contextmanager
def adapters_off(layers: list[nn.Module]) -> Iterator[None]:
    """Switch the LoRA adapters of ``layers`` off (peft ``scaling = 0``) and restore their scalings after."""
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for k in layer.scaling:
            layer.scaling[k] = 0.0
    try:
        yield
    finally:
        for layer, sc in zip(layers, saved):
            layer.scaling.update(sc)


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
        if not layers:  # no adapter in this unit (an embedding / head unit): nothing to switch off
            if progress is not None:
                progress("leave-one-out", u + 1, space.n_units)
            continue
        with adapters_off(layers), rp.below(rp.first_layer(space.units[u].modules)):
            s, _ = evaluator.score(pm)
        out[u] = base - s  # score = -loss: switching a useful adapter off lowers the score
        if progress is not None:
            progress("leave-one-out", u + 1, space.n_units)
    return out


@torch.no_grad()
def whole_gain(evaluator: Any, pm: nn.Module) -> float:
    """The gain of all adapters together: score with every adapter on minus with every adapter off (nats)."""
    layers = [m for m in pm.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)]
    on, _ = evaluator.score(pm)
    with adapters_off(layers):
        off, _ = evaluator.score(pm)
    return float(on - off)


@attrs.frozen
class RankProbes:
    """What the rank probes measured (input of :func:`autoqra.guidance.rankmodel.rank_table`).

    Attributes:
        loo: probed rank -> per-unit leave-one-out gains after ``steps`` steps.
        whole: steps -> all-adapter gain of the smallest rank's probe (at ``t1`` and ``steps``).
        steps: the probes' training steps (the top rung).
    """

    loo: dict[int, np.ndarray]
    whole: dict[int, float]
    steps: int


def rank_probes(evaluator: Any, space: SearchSpace, steps: int, ref_bits: int, probes: int = 2,
                loo_blocks: int | None = None, t1: int | None = None,
                progress: ProgressFn | None = None) -> RankProbes:
    """Train a probe model per probed rank (every unit at ``ref_bits`` with that rank, ``steps`` steps of the
    search's constant rate) and measure each unit's leave-one-out gain at the end; on the smallest rank's probe
    also the gain of all adapters together after ``t1`` and ``steps`` steps (the growth with the horizon).

    ``probes=2`` probes the smallest and the largest positive rank, ``1`` the smallest only. ``loo_blocks``:
    held-out blocks scored per switch-off (default: the evaluator's). ``progress``: each probe's training
    steps (``fn("rank probe r8 training", step, steps, "steps")``) and leave-one-out units.
    """
    pos = sorted(r for r in space.ranks if r > 0)
    if not pos or steps < 1:
        return RankProbes({}, {}, steps)
    probed = sorted({pos[0], pos[-1]}) if probes >= 2 else [pos[0]]
    t1 = t1 if t1 is not None and 0 < t1 < steps else max(1, steps // 3)
    loo: dict[int, np.ndarray] = {}
    whole: dict[int, float] = {}
    saved = getattr(evaluator, "eval_blocks", None)
    try:
        if loo_blocks is not None and saved is not None:
            evaluator.eval_blocks = min(loo_blocks, saved)
        for r in probed:
            a = space.uniform(ref_bits, r)  # embedding / head units: 16 bits, no rank
            pm = evaluator.build(a)
            what = f"rank probe r{r} training"

            def on_step(i: int, _loss: float, r=r, pm=pm, what=what) -> None:
                if r == probed[0] and i + 1 == t1 and t1 < steps:
                    whole[t1] = whole_gain(evaluator, pm)
                if progress is not None:
                    progress(what, i + 1, steps, "steps")

            if progress is not None:
                progress(what, 0, steps, "steps")
            if "on_step" in inspect.signature(evaluator.fit).parameters:
                evaluator.fit(pm, steps, on_step=on_step)
            else:
                evaluator.fit(pm, steps)
            if r == probed[0]:
                whole[steps] = whole_gain(evaluator, pm)
            loo[r] = leave_one_out(evaluator, pm, space, progress)
            del pm
    finally:
        if saved is not None:
            evaluator.eval_blocks = saved
    return RankProbes(loo, whole, steps)


def probe_table(probes: RankProbes, ranks: tuple[int, ...]) -> np.ndarray:
    """The previous rank table: the smallest rank's raw leave-one-out gains for every positive rank (kept to
    compare the rank model against, ``CostModel.rank_gain_probe``)."""
    n = len(next(iter(probes.loo.values()))) if probes.loo else 0
    out = np.zeros((n, len(ranks)))
    if n:
        lo = min(probes.loo)
        for j, r in enumerate(ranks):
            if r > 0:
                out[:, j] = probes.loo[lo]
    return out
