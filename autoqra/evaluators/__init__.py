"""Evaluators: score an assignment after a real LoRA fine-tune (``"finetune"``, ``"lm_eval"``).

``@register_evaluator("name")`` adds one, selectable by name (``evaluator="name"``);
:func:`~autoqra.evaluators.build.build_evaluator` builds the one a config names.
"""

from autoqra.evaluators.base import (
    EVALUATORS,
    EvalResult,
    Evaluator,
    Fidelity,
    available_evaluators,
    evaluator_class,
    register_evaluator,
)
from autoqra.evaluators.build import build_evaluator
from autoqra.evaluators.finetune import FinetuneEvaluator
from autoqra.evaluators.lm_eval import LMEvalEvaluator

__all__ = [
    "EVALUATORS",
    "EvalResult",
    "Evaluator",
    "Fidelity",
    "FinetuneEvaluator",
    "LMEvalEvaluator",
    "available_evaluators",
    "build_evaluator",
    "evaluator_class",
    "register_evaluator",
]
