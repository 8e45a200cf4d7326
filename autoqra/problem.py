r"""The search problem, one object shared by the optimizer and every searcher.

A :class:`Problem` says *what* is searched (the space), *what it costs* (the memory model, in bytes on
``target``), the hard budget, and what is known about the units before any trial: the importance
priors (per unit, in [0, 1]) and, with the cost model, the predicted score of each unit's option
(``cost_table``, nats). It also carries the repair that makes any assignment fit, so searchers never
re-implement feasibility. Built once by :func:`autoqra.optimize` (``prepare``); searchers receive it
through :meth:`Searcher.bind`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import numpy as np

from autoqra.guidance.repair import make_repair
from autoqra.memory.budget import TARGETS
from autoqra.memory.model import MemoryModel
from autoqra.space import Assignment, SearchSpace


@attrs.define
class Problem:
    """Space × memory × budget, plus what is known about the units.

    Attributes:
        space: the search space.
        memory: the memory model (``memory.predict(a)`` gives a :class:`MemoryBreakdown`).
        budget_bytes: the hard budget, in bytes, on ``target``.
        target: ``"model"`` (``model_bytes``) or ``"train"`` (``train_bytes``).
        importance_q: per-unit quantization sensitivity in [0, 1] (length = n_units), or None.
        importance_r: per-unit adaptation demand in [0, 1], or None.
        repair: ``repair(a) -> Assignment`` making ``a`` feasible (least predicted damage per byte).
        seed: the run's seed.
        cost_table: ``(n_units, len(bits), len(ranks))`` predicted score (nats) of each unit's option
            from the calibrated cost model (:meth:`autoqra.guidance.costmodel.CostModel.table`), or None
            (priors-guided search).
        seed_tables: further tables (the same cost model under other calibrations) whose exact
            knapsack optima join the first generation as seeds: the calibration is uncertain, real
            trials decide between bits and adapters.
    """

    space: SearchSpace
    memory: MemoryModel
    budget_bytes: int
    target: str = attrs.field(default="model")
    importance_q: np.ndarray | None = None
    importance_r: np.ndarray | None = None
    repair: Callable[[Assignment], Assignment] | None = None
    seed: int = 0
    cost_table: np.ndarray | None = None
    seed_tables: list = attrs.Factory(list)

    @target.validator
    def _target(self, att: attrs.Attribute, v: str) -> None:
        if v not in TARGETS:
            raise ValueError(f"target={v!r} is not allowed; choose one of {list(TARGETS)}")

    def bytes_of(self, a: Assignment) -> int:
        """Footprint of ``a`` on the budget's target, in bytes."""
        return self.memory.predict(a).bytes_for(self.target)

    def feasible(self, a: Assignment) -> bool:
        """Whether ``a`` fits the budget."""
        return self.bytes_of(a) <= self.budget_bytes

    def make_feasible(self, a: Assignment) -> Assignment:
        """``a`` repaired to fit the budget (``a`` itself when it fits)."""
        if self.repair is None:
            raise RuntimeError("this Problem has no repair function")
        return self.repair(a)

    @classmethod
    def build(cls, space: SearchSpace, memory: MemoryModel, budget_bytes: int, *, target: str = "model",
              importance: Any = None, seed: int = 0, cost_table: np.ndarray | None = None) -> Problem:
        """A problem whose repair is :func:`autoqra.guidance.repair.make_repair` on the same memory model,
        budget, importance priors (``importance.q`` / ``importance.r``, or None) and cost table."""
        q = None if importance is None else importance.q
        r = None if importance is None else importance.r
        rep = make_repair(memory, budget_bytes, q, r, target, cost_table=cost_table)
        return cls(space=space, memory=memory, budget_bytes=int(budget_bytes), target=target, importance_q=q,
                   importance_r=r, repair=rep, seed=seed, cost_table=cost_table)

    def set_cost_table(self, table: np.ndarray | None, seed_tables: list | None = None) -> None:
        """Replace the cost table (after calibration) here and in the repair that reads it."""
        self.cost_table = table
        if hasattr(self.repair, "cost_table"):
            self.repair.cost_table = table  # type: ignore[union-attr]
        if seed_tables is not None:
            self.seed_tables = list(seed_tables)

    def predict(self, a: Assignment) -> float:
        """Additive predicted score of ``a`` from ``cost_table`` (nats; 0 without one)."""
        if self.cost_table is None:
            return 0.0
        x = self.space.encode(a)
        n = self.space.n_units
        return float(self.cost_table[np.arange(n), x[:n], x[n:]].sum())
