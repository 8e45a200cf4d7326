r"""Validated configuration classes (attrs). Bad values raise ``ValueError`` naming field, value and what is allowed.

:class:`OptimizeConfig` and the presets live here; the training recipe :class:`~autoqra.train_spec.TrainSpec`, the
field checks, the registry look-ups and the config-file reader in :mod:`autoqra.train_spec` and
:mod:`autoqra.config_checks` (re-exported here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from autoqra.config_checks import (  # noqa: F401 - re-exported
    WORKER_RESOURCE_KEYS,
    _bool,
    _check_executor,
    _int_tuple,
    _known,
    _non_negative,
    _one_of,
    _opt_non_negative_int,
    _opt_positive,
    _opt_positive_int,
    _positive,
    _registered,
    load_config_file,
    registry_for,
)
from autoqra.precision import PRECISIONS
from autoqra.train_spec import TrainSpec  # noqa: F401 - re-exported
from autoqra.unit_types import GRANULARITIES

#: Named settings: fidelities in optimizer steps, search sizes, evaluation blocks.
PRESETS: dict[str, dict[str, Any]] = {
    # a SmolLM2 search with its final rung in <= 25 min on 2 CPU cores with native bf16 (README: demo section; the
    # top rung 24 steps, one Phase II proposal and one search candidate in the final rung: 30 steps, 2 and 2 took
    # 29 min on AMD EPYC bf16)
    "demo": {"low_steps": 0, "mid_steps": 10, "high_steps": 24, "pop_size": 10, "promote_k": 2,
             "max_generations": 2, "phase2_iterations": 1, "eval_blocks": 16, "importance_blocks": 8,
             "final_steps": 60, "final_seeds": 1, "final_eval_blocks": 0, "final_candidates": 1},
    # seconds, for tests on the tiny model
    "tiny": {"low_steps": 0, "mid_steps": 2, "high_steps": 4, "pop_size": 4, "promote_k": 1, "max_generations": 2,
             "phase2_iterations": 2, "eval_blocks": 4, "importance_blocks": 4, "final_steps": 6, "final_seeds": 1,
             "final_eval_blocks": 4, "final_candidates": 3},
    # a real search (hours on CPU; minutes per candidate on a GPU)
    "default": {"low_steps": 0, "mid_steps": 20, "high_steps": 60, "pop_size": 24, "promote_k": 4,
                "max_generations": 12, "phase2_iterations": 20, "eval_blocks": 64, "importance_blocks": 16,
                "final_steps": 300, "final_seeds": 2, "final_eval_blocks": 0, "final_candidates": 3},
}


@attrs.frozen
class OptimizeConfig:
    """Everything ``autoqra.optimize`` takes besides the model (validated before any model is touched).

    Attributes:
        budget: bytes, a size string ("3.5GB") or a reference ("4bit").
        backend: quantization backend name: a registered one (``"hqq"``, ``"bnb"``, ``"gptq"``, ``"none"`` or a
            plug-in's ``@register_backend`` name).
        backend_options: keyword arguments of the backend.
        evaluator: a registered evaluator name: ``"finetune"``, ``"lm_eval"`` or a plug-in's
            ``@register_evaluator`` name (built by :func:`autoqra.evaluators.build.build_evaluator`).
        evaluator_options: extra keyword arguments of the evaluator (e.g. ``task``, ``limit``); each must be a
            parameter of its constructor.
        phase1 / phase2: registered searcher names (``@register_searcher``; phase2 ``None`` skips Phase II).
            Names are checked against the registries when the config is built: a plug-in's module must be
            imported first (the CLI: ``--plugin MODULE``).
        bits: the bit ladder; ``None`` (default): the backend's own subset of :data:`autoqra.space.DEFAULT_BITS`
            (2, 3, 4, 8 on HQQ and GPTQ; 4, 8 on bitsandbytes; see :meth:`bits_for`). Explicit bits the backend
            does not support raise a ``ValueError`` naming the supported ones.
        ranks / granularity / target_modules: the search space. ``ranks`` defaults to (4, 8, 16): an
            adapter on every block. With rank 0 allowed the search sold adapters for 8-bit blocks and lost after
            the final training every time it was compared on SmolLM2 (README, "Choosing for the training you
            will run"); pass ``ranks=(0, 4, 8, 16)`` for the paper's ladder.
        embeddings: ``"search"`` (default: the token embedding and the output head are units with bits
            16 / 8 / 4 where the backend stores them, no rank; one unit when tied) or ``"keep"`` (16-bit,
            outside the space: the paper's space). Budget references (``"4bit"``) keep them 16-bit either way.
        formats: ``"choose"`` (default: before the search, each bit-width's group size is measured and chosen
            for this model, :mod:`autoqra.guidance.formats`; only backends with a group size per bit-width,
            and only when ``backend_options`` names no ``group_size``) or ``"fixed"`` (the backend's).
        target: the budget applies to "model" bytes or "train" bytes.
        data: "pydoc" (embedded) or a JSONL path / datasets name.
        preset: "demo", "tiny" or "default": fills fidelities and sizes not given explicitly.
        low_steps / high_steps: Phase I fidelities (optimizer steps); Phase II and baselines use high.
            ``low_steps=0`` is a screen: apply + held-out loss, no training.
        mid_steps: an optional rung between low and high (successive halving: the better half of the
            mid-rung trials continue to high; with ``guidance="cost"`` rungs continue each other).
        guidance: ``"cost"`` (default: the calibrated cost model in nats per byte drives repair, the
            anchored warm start, byte-neutral mutations, knapsack seeds, promotion from the screen,
            score-aligned selection and stop, and Phase II's prior; :mod:`autoqra.guidance.costmodel`) or
            ``"priors"`` (the landed search: min–max normalised importance priors, the paper's
            operators, Pareto selection and hypervolume stop; use it with ``phase2="turbo"``).
        knapsack_k: with ``guidance="cost"``, the k best distinct assignments of the additive
            prediction (exact knapsack) join Phase I's first generation after the warm-start seed.
        pop_size / promote_k / max_generations: Phase I sizes.
        phase2_iterations: Phase II evaluations at most.
        eval_blocks: held-out blocks scored per evaluation.
        importance_blocks: calibration blocks for the priors / the cost model's KL table; 0 = no
            priors (uniform 0.5; with ``guidance="cost"`` it falls back to ``"priors"``).
        warm_start: Phase I's first generation: "anchored" (default: the highest uniform bit-width
            the budget affords, slack filled by importance per byte), "eq6" (the paper's seed from the
            importance priors) or "none" (random + repair). The default departs from the paper
            because Eq. 6 sent low-prior blocks to 2 bits on SmolLM2 (README, benchmark).
        use_surrogate: rank offspring with the learned surrogate before promotion; False (ablation)
            promotes every successful offspring to high fidelity.
        final_steps: optimizer steps of the final training (``Result.train``) and of the final rung.
        final_rung: end the search with the final rung (:mod:`autoqra.stages.final_rung`, default True): the
            best ``final_candidates`` distinct feasible candidates and the fitting uniform baselines near the
            best of them are trained with exactly the final recipe (``train``, ``final_steps``), paired, once
            per training seed, and the best mean validation score is the answer; ``Result.train()`` reads
            that training back. ``False``: choose on the top rung's score (the previous behaviour).
        final_candidates: search candidates entered in the final rung (preset: 2 in demo, 3 otherwise).
        final_seeds: training seeds of the final rung (``seed``, ``seed + 1``, ...; preset: 1 in demo/tiny,
            2 in default).
        final_eval_blocks: validation blocks the final rung scores (0 = the whole validation split).
        final_uniform_margin: fitting uniform baselines enter the final rung when their top-rung score is
            within this many nats of the best fitting uniform's.
        rung_schedule: how the search's rungs train (``guidance="cost"``): ``"wsd"`` (default:
            warmup-stable-decay, every rung ends with a short linear decay so that its score is that of a
            finished training; rungs continue each other's stable phase) or ``"constant"`` (the previous
            constant rate, scored mid-training).
        decay_fraction: share of a ``"wsd"`` rung's steps spent in its decay.
        alpha: Phase II utility weight α in α·score − (1−α)·memory, both min-max normalised over the
            feasible front (paper default 0.6).
        choose_alpha: the same utility's weight when choosing ``Result.best``; default 1.0 = the best
            score under the budget (the memory already satisfies the hard budget; with α < 1 a
            cheap, much worse point can win when a useless low-bit point stretches the score range).
        max_trials: cap on evaluations (all fidelities). time_limit: seconds.
        seed: drives everything.
        executor: "local" (trials one at a time in this process), "ray" (one trial per Ray worker) or a
            plug-in's ``@register_executor`` name (given ``address`` / ``workers`` / ``resources`` where its
            constructor takes them).
        ray_address: an existing Ray cluster ("auto", "ray://host:10001"); None starts a local Ray.
        workers: Ray workers (default: as many as the cluster's resources hold); "local" runs 1.
        worker_resources: Ray actor options per worker/trial, e.g. ``{"num_gpus": 1}`` (the default on
            a cluster with GPUs) or ``{"num_cpus": 1}`` (the default otherwise).
        phase2_batch: Phase-II points per ask (q, batch acquisition); default = the number of workers
            (1 locally). Set it to compare a local run with a Ray run of the same batch size.
        device: where trials train: ``None`` (default) = where the model is, ``"auto"`` (a GPU when
            one is visible) or a torch device string; the model is moved there (its weights unchanged).
        precision: ``"auto"`` (default), ``"fp32"``, ``"bf16"`` or ``"fp16"``: the autocast dtype of
            training and scoring and the quantized layers' compute dtype (:mod:`autoqra.precision`;
            ``auto`` = bf16 where the GPU/CPU computes it natively, fp16 on older GPUs, else fp32).
    """

    budget: Any = "4bit"
    backend: str = attrs.field(default="hqq", validator=_registered("backend"))
    backend_options: dict = attrs.Factory(dict)
    evaluator: str = attrs.field(default="finetune", validator=_registered("evaluator"))
    evaluator_options: dict = attrs.Factory(dict)
    phase1: str = attrs.field(default="nsga2", validator=_registered("searcher"))
    phase2: str | None = attrs.field(default="local", validator=_registered("searcher", optional=True))
    bits: tuple[int, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(_int_tuple))
    ranks: tuple[int, ...] = attrs.field(default=(4, 8, 16), converter=_int_tuple)
    granularity: str = attrs.field(default="block", validator=_one_of(*GRANULARITIES))
    target_modules: tuple[str, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))
    embeddings: str = attrs.field(default="search", validator=_one_of("search", "keep"))
    formats: str = attrs.field(default="choose", validator=_one_of("choose", "fixed"))
    target: str = attrs.field(default="model", validator=_one_of("model", "train"))
    data: str = "pydoc"
    train: TrainSpec = attrs.field(factory=TrainSpec, converter=lambda v: TrainSpec.from_dict(v) if isinstance(v, dict) else v)
    preset: str = attrs.field(default="default", validator=_one_of(*PRESETS))
    low_steps: int | None = attrs.field(default=None, validator=_opt_non_negative_int)
    high_steps: int | None = attrs.field(default=None, validator=_opt_positive_int)
    mid_steps: int | None = attrs.field(default=None, validator=_opt_positive_int)
    pop_size: int | None = attrs.field(default=None, validator=_opt_positive_int)
    promote_k: int | None = attrs.field(default=None, validator=_opt_positive_int)
    max_generations: int | None = attrs.field(default=None, validator=_opt_positive_int)
    phase2_iterations: int | None = attrs.field(default=None, validator=_opt_positive_int)
    eval_blocks: int | None = attrs.field(default=None, validator=_opt_positive_int)
    importance_blocks: int | None = None
    warm_start: str = attrs.field(default="anchored", validator=_one_of("eq6", "anchored", "none"))
    use_surrogate: bool = True
    guidance: str = attrs.field(default="cost", validator=_one_of("cost", "priors"))
    knapsack_k: int = attrs.field(default=3, validator=_non_negative)
    final_steps: int | None = attrs.field(default=None, validator=_opt_positive_int)
    final_rung: bool = attrs.field(default=True, validator=_bool)
    final_candidates: int | None = attrs.field(default=None, validator=_opt_positive_int)
    final_seeds: int | None = attrs.field(default=None, validator=_opt_positive_int)
    final_eval_blocks: int | None = attrs.field(default=None, validator=_opt_non_negative_int)
    final_uniform_margin: float = attrs.field(default=0.1, validator=_non_negative)
    rung_schedule: str = attrs.field(default="wsd", validator=_one_of("wsd", "constant"))
    decay_fraction: float = attrs.field(default=0.2, validator=_positive)
    alpha: float = attrs.field(default=0.6)
    choose_alpha: float = attrs.field(default=1.0)
    max_trials: int | None = attrs.field(default=None, validator=_opt_positive_int)
    time_limit: float | None = attrs.field(default=None, validator=_opt_positive)
    seed: int = 0
    executor: str = attrs.field(default="local", validator=_registered("executor"))
    ray_address: str | None = None
    workers: int | None = attrs.field(default=None, validator=_opt_positive_int)
    worker_resources: dict = attrs.Factory(dict)
    phase2_batch: int | None = attrs.field(default=None, validator=_opt_positive_int)
    device: str | None = attrs.field(default=None)
    precision: str = attrs.field(default="auto", validator=_one_of(*PRECISIONS))

    @device.validator
    def _device(self, att: attrs.Attribute, v: Any) -> None:
        if v is None or v == "auto":
            return
        try:
            torch.device(v)
        except (RuntimeError, TypeError):
            raise ValueError(f"device={v!r} is not allowed; use None, 'auto', 'cpu', 'cuda' or 'cuda:N'") from None

    @alpha.validator
    @choose_alpha.validator
    def _alpha(self, att: attrs.Attribute, v: float) -> None:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{att.name}={v!r} is not allowed; it must be in [0, 1]")

    def resolved(self, name: str) -> Any:
        """The explicit value of a preset-controlled field, else the preset's.

        A preset's ``mid_steps`` applies only where it lies strictly between the resolved low and
        high fidelities (an explicit ``low_steps=3, high_steps=10`` drops a preset mid rung of 10).
        """
        v = getattr(self, name)
        if v is not None:
            return v
        v = PRESETS[self.preset].get(name)
        if name == "mid_steps" and v is not None and not self.resolved("low_steps") < v < self.resolved("high_steps"):
            return None
        return v

    def bits_for(self, backend: Any) -> tuple[int, ...]:
        """The bit ladder of the search on ``backend`` (an instance or class, or its name): ``bits`` when given,
        else the backend's own subset of :data:`autoqra.space.DEFAULT_BITS` (16 = unquantized alone for a
        backend that quantizes none of them, e.g. ``"none"``)."""
        if self.bits is not None:
            return self.bits
        from autoqra.quant_backends import UNQUANTIZED_BITS
        from autoqra.space import DEFAULT_BITS

        cls = registry_for("backend").get(backend) if isinstance(backend, str) else backend
        supported = set(getattr(cls, "supported_bits", ()))
        return tuple(b for b in DEFAULT_BITS if b in supported) or (UNQUANTIZED_BITS,)

    def __attrs_post_init__(self) -> None:
        lo, hi = self.resolved("low_steps"), self.resolved("high_steps")
        if lo > hi:
            raise ValueError(f"low_steps={lo} must not exceed high_steps={hi}")
        if self.mid_steps is not None and not lo < self.mid_steps < hi:
            raise ValueError(f"mid_steps={self.mid_steps} must lie strictly between low_steps={lo} and high_steps={hi}")

        if self.resolved("promote_k") > self.resolved("pop_size"):
            raise ValueError(f"promote_k={self.resolved('promote_k')} must not exceed pop_size={self.resolved('pop_size')}")
        _check_executor(self)
        self._check_evaluator_options()
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction={self.decay_fraction!r} is not allowed; it must be in (0, 1]")
        ib = self.resolved("importance_blocks")
        if isinstance(ib, bool) or not isinstance(ib, int) or ib < 0:
            raise ValueError(f"importance_blocks={ib!r} is not allowed; it must be an integer >= 0")

    def _check_evaluator_options(self) -> None:
        """Every ``evaluator_options`` key is a parameter of the evaluator's constructor."""
        if not isinstance(self.evaluator_options, dict):
            raise ValueError(f"evaluator_options={self.evaluator_options!r} is not allowed; it must be a dict")
        from autoqra.registry import check_options

        check_options(registry_for("evaluator").get(self.evaluator), f"evaluator {self.evaluator!r}",
                      self.evaluator_options, skip=3)

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
