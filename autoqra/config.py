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


def _opt_positive_int(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{att.name}={value!r} is not allowed; it must be a positive integer or None")


def _opt_positive(inst: Any, att: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _positive(inst, att, value)


def _int_tuple(v: Any) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise ValueError(f"expected a list of integers, got {v!r}")
    return tuple(int(x) for x in v)


WORKER_RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")


def _check_executor(cfg: Any) -> None:
    """Executor fields: ray options only with executor="ray"; worker_resources are Ray actor options."""
    if cfg.executor == "local":
        for name, bad in (("ray_address", cfg.ray_address is not None), ("workers", (cfg.workers or 1) > 1),
                          ("worker_resources", bool(cfg.worker_resources))):
            if bad:
                raise ValueError(f"{name}={getattr(cfg, name)!r} is not allowed with executor='local' (one trial at "
                                 "a time in this process); use executor='ray' (phase2_batch sets the batch size)")
    if cfg.ray_address is not None and (not isinstance(cfg.ray_address, str) or not cfg.ray_address):
        raise ValueError(f"ray_address={cfg.ray_address!r} is not allowed; it must be a non-empty string or None")
    if not isinstance(cfg.worker_resources, dict):
        raise ValueError(f"worker_resources={cfg.worker_resources!r} is not allowed; it must be a dict of Ray "
                         f"actor options {list(WORKER_RESOURCE_KEYS)}")
    for k, v in cfg.worker_resources.items():
        if k not in WORKER_RESOURCE_KEYS:
            raise ValueError(f"worker_resources key {k!r} is not allowed; choose from {list(WORKER_RESOURCE_KEYS)}")
        if k in ("num_cpus", "num_gpus", "memory") and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise ValueError(f"worker_resources[{k!r}]={v!r} is not allowed; it must be a number >= 0")


#: Named settings: fidelities in optimizer steps, search sizes, evaluation blocks.
PRESETS: dict[str, dict[str, Any]] = {
    # ~15 min on 2 CPU cores with SmolLM2 (README: demo table)
    "demo": {"low_steps": 3, "high_steps": 10, "pop_size": 6, "promote_k": 2, "max_generations": 2,
             "phase2_iterations": 3, "eval_blocks": 16, "importance_blocks": 8, "final_steps": 40},
    # seconds, for tests on the tiny model
    "tiny": {"low_steps": 2, "high_steps": 4, "pop_size": 4, "promote_k": 2, "max_generations": 2,
             "phase2_iterations": 2, "eval_blocks": 4, "importance_blocks": 4, "final_steps": 6},
    # a real search (hours on CPU; minutes per candidate on a GPU)
    "default": {"low_steps": 20, "high_steps": 60, "pop_size": 16, "promote_k": 4, "max_generations": 12,
                "phase2_iterations": 20, "eval_blocks": 64, "importance_blocks": 16, "final_steps": 300},
}


@attrs.frozen
class OptimizeConfig:
    """Everything ``autoqra.optimize`` takes besides the model (validated before any model is touched).

    Attributes:
        budget: bytes, a size string ("3.5GB") or a reference ("4bit").
        backend: quantization backend name ("hqq", "bnb", "gptq", "none").
        backend_options: keyword arguments of the backend.
        evaluator: "finetune" or "lm_eval".
        evaluator_options: extra keyword arguments of the evaluator (e.g. ``task``, ``limit``).
        phase1 / phase2: searcher names (phase2 ``None`` skips Phase II).
        bits / ranks / granularity / target_modules: the search space.
        target: the budget applies to "model" bytes or "train" bytes.
        data: "pydoc" (embedded) or a JSONL path / datasets name.
        preset: "demo", "tiny" or "default": fills fidelities and sizes not given explicitly.
        low_steps / high_steps: Phase I fidelities (optimizer steps); Phase II and baselines use high.
        pop_size / promote_k / max_generations: Phase I sizes.
        phase2_iterations: Phase II evaluations at most.
        eval_blocks: held-out blocks scored per evaluation.
        importance_blocks: calibration blocks for the priors; 0 = no priors (uniform 0.5).
        warm_start: Phase I's first generation: "anchored" (default: the highest uniform bit-width
            the budget affords, slack filled by importance per byte), "eq6" (the paper's seed from the
            importance priors) or "none" (random + repair). The default departs from the paper
            because Eq. 6 sent low-prior blocks to 2 bits on SmolLM2 (README, benchmark).
        use_surrogate: rank offspring with the learned surrogate before promotion; False (ablation)
            promotes every successful offspring to high fidelity.
        final_steps: optimizer steps of the final training (``Result.train``).
        alpha: Phase II utility weight α in α·score − (1−α)·memory, both min-max normalised over the
            feasible front (paper default 0.6).
        choose_alpha: the same utility's weight when choosing ``Result.best``; default 1.0 = the best
            score under the budget (the memory already satisfies the hard budget; with α < 1 a
            cheap, much worse point can win when a useless low-bit point stretches the score range).
        max_trials: cap on evaluations (all fidelities). time_limit: seconds.
        seed: drives everything.
        executor: "local" (trials one at a time in this process) or "ray" (one trial per Ray worker).
        ray_address: an existing Ray cluster ("auto", "ray://host:10001"); None starts a local Ray.
        workers: Ray workers (default: as many as the cluster's resources hold); "local" runs 1.
        worker_resources: Ray actor options per worker/trial, e.g. ``{"num_gpus": 1}`` (the default on
            a cluster with GPUs) or ``{"num_cpus": 1}`` (the default otherwise).
        phase2_batch: Phase-II points per ask (q, batch acquisition); default = the number of workers
            (1 locally). Set it to compare a local run with a Ray run of the same batch size.
    """

    budget: Any = "4bit"
    backend: str = "hqq"
    backend_options: dict = attrs.Factory(dict)
    evaluator: str = attrs.field(default="finetune", validator=_one_of("finetune", "lm_eval"))
    evaluator_options: dict = attrs.Factory(dict)
    phase1: str = "nsga2"
    phase2: str | None = "turbo"
    bits: tuple[int, ...] = attrs.field(default=(2, 3, 4, 8), converter=_int_tuple)
    ranks: tuple[int, ...] = attrs.field(default=(0, 4, 8, 16), converter=_int_tuple)
    granularity: str = attrs.field(default="block", validator=_one_of("block", "module"))
    target_modules: tuple[str, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))
    target: str = attrs.field(default="model", validator=_one_of("model", "train"))
    data: str = "pydoc"
    train: TrainSpec = attrs.field(factory=TrainSpec, converter=lambda v: TrainSpec.from_dict(v) if isinstance(v, dict) else v)
    preset: str = attrs.field(default="default", validator=_one_of(*PRESETS))
    low_steps: int | None = attrs.field(default=None, validator=_opt_positive_int)
    high_steps: int | None = attrs.field(default=None, validator=_opt_positive_int)
    pop_size: int | None = attrs.field(default=None, validator=_opt_positive_int)
    promote_k: int | None = attrs.field(default=None, validator=_opt_positive_int)
    max_generations: int | None = attrs.field(default=None, validator=_opt_positive_int)
    phase2_iterations: int | None = attrs.field(default=None, validator=_opt_positive_int)
    eval_blocks: int | None = attrs.field(default=None, validator=_opt_positive_int)
    importance_blocks: int | None = None
    warm_start: str = attrs.field(default="anchored", validator=_one_of("eq6", "anchored", "none"))
    use_surrogate: bool = True
    final_steps: int | None = attrs.field(default=None, validator=_opt_positive_int)
    alpha: float = attrs.field(default=0.6)
    choose_alpha: float = attrs.field(default=1.0)
    max_trials: int | None = attrs.field(default=None, validator=_opt_positive_int)
    time_limit: float | None = attrs.field(default=None, validator=_opt_positive)
    seed: int = 0
    executor: str = attrs.field(default="local", validator=_one_of("local", "ray"))
    ray_address: str | None = None
    workers: int | None = attrs.field(default=None, validator=_opt_positive_int)
    worker_resources: dict = attrs.Factory(dict)
    phase2_batch: int | None = attrs.field(default=None, validator=_opt_positive_int)

    @alpha.validator
    @choose_alpha.validator
    def _alpha(self, att: attrs.Attribute, v: float) -> None:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{att.name}={v!r} is not allowed; it must be in [0, 1]")

    def resolved(self, name: str) -> Any:
        """The explicit value of a preset-controlled field, else the preset's."""
        v = getattr(self, name)
        return PRESETS[self.preset][name] if v is None else v

    def __attrs_post_init__(self) -> None:
        lo, hi = self.resolved("low_steps"), self.resolved("high_steps")
        if lo > hi:
            raise ValueError(f"low_steps={lo} must not exceed high_steps={hi}")
        if self.resolved("promote_k") > self.resolved("pop_size"):
            raise ValueError(f"promote_k={self.resolved('promote_k')} must not exceed pop_size={self.resolved('pop_size')}")
        _check_executor(self)
        ib = self.resolved("importance_blocks")
        if isinstance(ib, bool) or not isinstance(ib, int) or ib < 0:
            raise ValueError(f"importance_blocks={ib!r} is not allowed; it must be an integer >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        d["train"] = self.train.to_dict()
        for k in ("bits", "ranks", "target_modules"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizeConfig:
        return cls(**_known(cls, d, "optimize"))

    @classmethod
    def from_file(cls, path: str | Path) -> OptimizeConfig:
        return cls.from_dict(load_config_file(path))
