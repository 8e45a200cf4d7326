r"""The peft ``LoraConfig`` that realises the ranks of an assignment (:meth:`autoqra.space.SearchSpace.lora_config`)."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig

from autoqra.unit_types import WeightTensor


def lora_config(tm: dict[str, tuple[WeightTensor, int, int]], alpha_ratio: float = 2.0, dropout: float = 0.0,
                alpha: float | None = None, **kw: Any) -> LoraConfig:
    """The ``LoraConfig`` of a :meth:`~autoqra.space.SearchSpace.tensor_map` ``{tensor name: (tensor, bits,
    rank)}``: rank-0 linears excluded, per-module ranks and α in ``rank_pattern`` / ``alpha_pattern``, expert
    tensors as ``target_parameters`` (see :meth:`~autoqra.space.SearchSpace.lora_config`)."""
    lin = {t.module: r for t, _, r in tm.values() if t.kind == "linear"}  # embedding / head: never adapted
    par = {n: r for n, (t, _, r) in tm.items() if t.kind == "experts"}
    adapted = {m: r for m, r in lin.items() if r > 0}
    params = {n: r for n, r in par.items() if r > 0}
    if not adapted and not params:
        raise ValueError("every unit has rank 0: there is nothing to fine-tune")
    pattern = {**adapted, **params}
    base_r = max(pattern.values())
    extra: dict[str, Any] = {"target_parameters": sorted(params)} if params else {}
    return LoraConfig(
        r=base_r,
        lora_alpha=alpha if alpha is not None else alpha_ratio * base_r,
        lora_dropout=dropout,
        target_modules=sorted(adapted),
        exclude_modules=sorted(m for m, r in lin.items() if r == 0) or None,
        rank_pattern=dict(pattern),
        alpha_pattern={m: alpha if alpha is not None else alpha_ratio * r for m, r in pattern.items()},
        bias="none",
        task_type="CAUSAL_LM",
        **extra,
        **kw,
    )
