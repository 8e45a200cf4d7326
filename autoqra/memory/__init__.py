r"""Memory, to the byte: what a configuration occupies and what a budget allows.

* :mod:`~autoqra.memory.model` — :class:`MemoryModel` predicts a :class:`MemoryBreakdown` (bytes per
  category) for any assignment without building it; :func:`measure_memory` counts live tensors
  (the two agree to the byte for model bytes).
* :mod:`~autoqra.memory.budget` — budgets as bytes, size strings (``"3.5GB"``) or references
  (``"4bit"``), resolved and checked against the smallest reachable footprint.
* :mod:`~autoqra.memory.activations` — the fitted activation estimate per training precision.
* :mod:`~autoqra.memory.trace` — :func:`measure_peak`, the measured storage peak of one training step.

Units: bytes (ints) everywhere; 1 MB = 10^6 bytes in messages.
"""

from autoqra.memory.activations import activation_table
from autoqra.memory.budget import TARGETS, parse_size, reference_bytes, resolve_budget
from autoqra.memory.model import ActivationEstimator, MemoryBreakdown, MemoryModel, measure_memory
from autoqra.memory.trace import StorageTracker, measure_peak

__all__ = ["TARGETS", "ActivationEstimator", "MemoryBreakdown", "MemoryModel", "StorageTracker", "activation_table",
           "measure_memory", "measure_peak", "parse_size", "reference_bytes", "resolve_budget"]
