"""autoqra: joint per-layer quantization bit-width and LoRA rank search under a hard memory budget.

One call: ``autoqra.optimize(model, budget)`` → :class:`Result` (``.best``, ``.train()``, ``.export()``,
``.report()``); ``autoqra.load_artifact(folder)`` loads an export, ``autoqra.load_result(folder)`` a saved
search. Plug-ins register by name: :data:`quant_backends.BACKENDS`, :data:`evaluators.EVALUATORS`,
:data:`searchers.SEARCHERS`, :data:`executors.EXECUTORS`.
"""

from autoqra import evaluators, executors, models, quant_backends, searchers
from autoqra.api import optimize
from autoqra.apply import apply_assignment, quantize_model
from autoqra.artifact import Artifact, ArtifactError, load, load_artifact  # load: deprecated name
from autoqra.config import OptimizeConfig, TrainSpec
from autoqra.memory import (
    MemoryBreakdown,
    MemoryModel,
    measure_memory,
    measure_peak,
    parse_size,
    resolve_budget,
)
from autoqra.problem import Problem
from autoqra.result import Result, load_result
from autoqra.space import Assignment, SearchSpace
from autoqra.trial import Trial

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "ArtifactError",
    "Assignment",
    "MemoryBreakdown",
    "MemoryModel",
    "OptimizeConfig",
    "Problem",
    "Result",
    "SearchSpace",
    "TrainSpec",
    "Trial",
    "apply_assignment",
    "evaluators",
    "executors",
    "load",
    "load_artifact",
    "load_result",
    "measure_memory",
    "measure_peak",
    "models",
    "optimize",
    "parse_size",
    "quant_backends",
    "quantize_model",
    "resolve_budget",
    "searchers",
]

