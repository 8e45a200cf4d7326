r"""The evaluator interface, fidelities, results and the evaluator registry."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import attrs

from autoqra.registry import Registry
from autoqra.space import Assignment

STATUSES = ("ok", "failed", "oom", "nan")

#: Evaluators by name (``evaluator=``); ``@register_evaluator("name")`` adds one.
EVALUATORS: Registry[Evaluator] = Registry("evaluator")


def register_evaluator(name: str) -> Callable[[type[Evaluator]], type[Evaluator]]:
    """Class decorator registering an evaluator under ``name`` (later registrations win)."""
    return EVALUATORS.register(name)


def available_evaluators() -> list[str]:
    """Names of all registered evaluators."""
    return EVALUATORS.names()


def evaluator_class(name: str) -> type[Evaluator]:
    """The evaluator class registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
    """
    return EVALUATORS.get(name)


@attrs.frozen
class Fidelity:
    """How much training one evaluation gets, in **optimizer steps**.

    Attributes:
        steps: optimizer steps of LoRA training before scoring (0 = score without training).
        name: label used in histories and reports (``"low"``, ``"high"``, ``"final"``...).
    """

    steps: int = attrs.field()
    name: str = ""

    @steps.validator
    def _check(self, att: attrs.Attribute, v: int) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"Fidelity.steps={v!r} is not allowed; it must be an integer >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fidelity:
        return cls(int(d["steps"]), d.get("name", ""))


@attrs.define
class EvalResult:
    """Outcome of one evaluation.

    Attributes:
        score: higher is better (``-inf`` unless status is ``"ok"``).
        metrics: named metrics (e.g. ``loss``, ``ppl``, ``accuracy``).
        status: ``"ok" | "failed" | "oom" | "nan"``.
        error: message when status is not ``"ok"``.
        seconds: wall time of the evaluation.
        memory: measured bytes (``model_bytes`` of live tensors, ``peak_bytes`` of the step...).
    """

    score: float = -math.inf
    metrics: dict[str, float] = attrs.Factory(dict)
    status: str = "ok"
    error: str = ""
    seconds: float = 0.0
    memory: dict[str, int] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"EvalResult.status={self.status!r} is not allowed; choose one of {list(STATUSES)}")

    @property
    def ok(self) -> bool:
        return self.status == "ok" and math.isfinite(self.score)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        return cls(**d)


@attrs.define
class FitStats:
    """What one training run reports (:meth:`autoqra.evaluators.finetune.FinetuneEvaluator.fit`).

    Attributes:
        train_loss_first / train_loss_last: the first and the last optimizer step's training loss (nan: no step).
        peak_bytes: the measured memory peak of the first step (0: not measured).
        optimizer: the AdamW optimizer after training (its state counts in the measured memory), or None.
        steps_run: optimizer steps this run took (fewer than asked when it continued a saved state).
    """

    train_loss_first: float = math.nan
    train_loss_last: float = math.nan
    peak_bytes: int = 0
    optimizer: Any = attrs.field(default=None, repr=False)
    steps_run: int = 0

    def metrics(self) -> dict[str, float]:
        """The run's trial metrics: its first and last losses and the steps it took (``steps_run``: what its wall
        time paid for)."""
        return {"train_loss_first": float(self.train_loss_first), "train_loss_last": float(self.train_loss_last),
                "steps_run": float(self.steps_run)}


class Evaluator(abc.ABC):
    """Scores an assignment at a fidelity. Must never raise for a bad candidate: it returns a
    result with status ``"failed" | "oom" | "nan"`` instead, so a search survives bad points."""

    name: str = "base"
    #: ``score(model)`` runs the same forward passes (same inputs, same order) on every call, so the cost
    #: model may replay an unchanged prefix of decoder layers between calls (:mod:`autoqra.guidance.prefix`).
    replayable_score: bool = False

    @abc.abstractmethod
    def evaluate(self, assignment: Assignment, fidelity: Fidelity) -> EvalResult:
        """Quantize + wrap the model at ``assignment``, train ``fidelity.steps`` steps, and score."""

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able identity (data, task, hyper-parameters, seed) used in trial-store keys."""
