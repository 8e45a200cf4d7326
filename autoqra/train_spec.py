r"""The training recipe (:class:`TrainSpec`): the search's rungs and the final training use it alike."""

from __future__ import annotations

from typing import Any

import attrs

from autoqra.config_checks import _known, _non_negative, _one_of, _positive, _probability


@attrs.frozen
class TrainSpec:
    """How LoRA adapters are trained (used by the memory model and the fine-tune evaluator).

    Attributes:
        batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        grad_accum: micro-batches per optimizer step.
        lr: AdamW learning rate (default 3e-3, measured on SmolLM2 at 60 steps, uniform HQQ 4-bit r8,
            cosine: test loss 2.875 at 2e-4, 2.697 at 8e-4, 2.638 at 1.6e-3, 2.595 at 3.2e-3, 2.616 at
            6.4e-3; the paper's 2e-4 is meant for thousands of steps — lower it for long trainings).
        weight_decay: AdamW weight decay.
        lora_alpha: one LoRA α for every module (default 16, i.e. scaling 16/r): the size of an Adam
            update of ``scale·B·A`` then does not grow with the rank. With the paper's α = 2r a rank
            doubling acted as a learning-rate doubling (measured on SmolLM2, 60 steps: rank 4, 8 and 16
            at scaling 16/r reached the same test loss within 1.4 mnat, while at α = 2r rank 16 beat
            rank 8 by 73 mnat at lr 2e-4): the search would have been allocating learning rates.
            ``None``: the paper's α = ``lora_alpha_ratio`` · r.
        lora_alpha_ratio: α = ratio · r per module when ``lora_alpha`` is None (the paper uses 2).
        lora_dropout: dropout on the LoRA input (default 0: trials of different candidates then see
            the same random numbers — common LoRA init, same data order, no masks that shift with the
            set of adapted modules — so their score differences are paired).
        schedule: ``"cosine"`` (to 0 over the run, after ``warmup_steps``) or ``"constant"``; the
            final training's schedule (search trials with ``guidance="cost"`` train at a constant rate so
            their rungs continue each other).
        warmup_steps: linear warm-up optimizer steps.
        optimizer: ``"adamw"`` (fp32 moments) — the memory model counts its state exactly.
        max_grad_norm: gradient clipping (0 = off).
    """

    batch_size: int = attrs.field(default=4, validator=_positive)
    seq_len: int = attrs.field(default=128, validator=_positive)
    grad_accum: int = attrs.field(default=1, validator=_positive)
    lr: float = attrs.field(default=3e-3, validator=_positive)
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative)
    lora_alpha: float | None = attrs.field(default=16.0, validator=attrs.validators.optional(_positive))
    lora_alpha_ratio: float = attrs.field(default=2.0, validator=_positive)
    lora_dropout: float = attrs.field(default=0.0, validator=_probability)
    schedule: str = attrs.field(default="cosine", validator=_one_of("cosine", "constant"))
    warmup_steps: int = attrs.field(default=0, validator=_non_negative)
    optimizer: str = attrs.field(default="adamw", validator=_one_of("adamw"))
    max_grad_norm: float = attrs.field(default=1.0, validator=_non_negative)

    def optimizer_bytes(self, lora_param_bytes: int, n_tensors: int) -> int:
        """AdamW state: ``exp_avg`` + ``exp_avg_sq`` (param dtype) + a 4-byte fp32 ``step`` per tensor."""
        return 2 * lora_param_bytes + 4 * n_tensors

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainSpec:
        """From :meth:`to_dict`. A dict from before ``lora_alpha`` existed (it has ``lora_alpha_ratio``
        but no ``lora_alpha``) keeps the α = ratio · r it was made with."""
        d = dict(d)
        if "lora_alpha_ratio" in d and "lora_alpha" not in d:
            d["lora_alpha"] = None
        return cls(**_known(cls, d, "TrainSpec"))
