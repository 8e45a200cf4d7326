r"""Validated configuration classes (attrs). Bad values raise ``ValueError`` naming field, value and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs


def _positive(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{att.name}={value!r} is not allowed; it must be a positive number")


def _non_negative(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{att.name}={value!r} is not allowed; it must be >= 0")


def _one_of(*allowed: Any):
    def check(inst: Any, att: attrs.Attribute, value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"{att.name}={value!r} is not allowed; choose one of {list(allowed)}")

    return check


def _probability(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{att.name}={value!r} is not allowed; it must be in [0, 1)")


@attrs.frozen
class TrainSpec:
    """How LoRA adapters are trained (used by the memory model and the fine-tune evaluator).

    Attributes:
        batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        grad_accum: micro-batches per optimizer step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lora_alpha_ratio: α = ratio · r per module (the paper uses 2).
        lora_dropout: dropout on the LoRA input.
        schedule: ``"cosine"`` (to 0 over the run, after ``warmup_steps``) or ``"constant"``.
        warmup_steps: linear warm-up optimizer steps.
        optimizer: ``"adamw"`` (fp32 moments) — the memory model counts its state exactly.
        max_grad_norm: gradient clipping (0 = off).
    """

    batch_size: int = attrs.field(default=4, validator=_positive)
    seq_len: int = attrs.field(default=128, validator=_positive)
    grad_accum: int = attrs.field(default=1, validator=_positive)
    lr: float = attrs.field(default=2e-4, validator=_positive)
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative)
    lora_alpha_ratio: float = attrs.field(default=2.0, validator=_positive)
    lora_dropout: float = attrs.field(default=0.05, validator=_probability)
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
        return cls(**_known(cls, d, "TrainSpec"))


def _known(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    names = {a.name for a in attrs.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; allowed: {sorted(names)}")
    return dict(d)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (safe loaders only)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping at top level, got {type(data).__name__}")
    return data
