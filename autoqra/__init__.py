"""autoqra: joint per-layer quantization bit-width and LoRA rank search under a hard memory budget.

One call: ``autoqra.optimize(model, budget)`` → :class:`Result` (``.best``, ``.train()``, ``.export()``,
``.report()``); ``autoqra.load_artifact(folder)`` loads an export, ``autoqra.load_result(folder)`` a saved
search. Plug-ins register by name: :data:`quant_backends.BACKENDS`, :data:`evaluators.EVALUATORS`,
:data:`searchers.SEARCHERS`, :data:`executors.EXECUTORS`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are imported on first use (see __getattr__)
    from autoqra import evaluators, executors, models, quant_backends, searchers
    from autoqra.api import optimize
    from autoqra.apply import apply_assignment, quantize_model
    from autoqra.artifact import Artifact, ArtifactError, load_artifact
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

#: Public name -> the module that defines it. ``import autoqra`` imports none of them (torch, peft and
#: bitsandbytes take seconds and some print on import); the first attribute access imports its module.
_EXPORTS = {
    **{name: f"autoqra.{name}" for name in ("evaluators", "executors", "models", "quant_backends", "searchers")},
    "optimize": "autoqra.api",
    "apply_assignment": "autoqra.apply",
    "quantize_model": "autoqra.apply",
    **{name: "autoqra.artifact" for name in ("Artifact", "ArtifactError", "load_artifact")},
    "OptimizeConfig": "autoqra.config",
    "TrainSpec": "autoqra.config",
    **{name: "autoqra.memory" for name in ("MemoryBreakdown", "MemoryModel", "measure_memory", "measure_peak",
                                           "parse_size", "resolve_budget")},
    "Problem": "autoqra.problem",
    "Result": "autoqra.result",
    "load_result": "autoqra.result",
    "Assignment": "autoqra.space",
    "SearchSpace": "autoqra.space",
    "Trial": "autoqra.trial",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autoqra' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module == f"autoqra.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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

