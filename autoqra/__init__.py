"""autoqra: joint per-layer quantization bit-width and LoRA rank search under a hard memory budget."""

from autoqra import evaluators, models, quant_backends, searchers
from autoqra._api import optimize
from autoqra.apply import apply_assignment, quantize_model
from autoqra.artifact import Artifact, ArtifactError, load
from autoqra.budget import parse_size, resolve_budget
from autoqra.config import TrainSpec
from autoqra.memory import MemoryBreakdown, MemoryModel, measure_memory
from autoqra.memory_trace import measure_peak
from autoqra.result import Result, Trial, load_result
from autoqra.space import Assignment, SearchSpace

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "ArtifactError",
    "Assignment",
    "MemoryBreakdown",
    "MemoryModel",
    "SearchSpace",
    "TrainSpec",
    "Result",
    "Trial",
    "apply_assignment",
    "evaluators",
    "load",
    "load_result",
    "optimize",
    "searchers",
    "measure_memory",
    "measure_peak",
    "models",
    "parse_size",
    "quant_backends",
    "quantize_model",
    "resolve_budget",
]
