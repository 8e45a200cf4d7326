r"""The search problem, one object shared by the optimizer and every searcher.

A :class:`Problem` says *what* is searched (the space), *what it costs* (the memory model, in bytes on
``target``), the hard budget, and what is known about the units before any trial: the importance
priors (per unit, in [0, 1]) and, with the cost model, the predicted score of each unit's option
(``cost_table``, nats). It also carries the repair that makes any assignment fit, so searchers never
re-implement feasibility. Built once by :func:`autoqra.optimize` (``prepare``); searchers receive it
through :meth:`Searcher.bind`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

from autoqra.guidance.repair import Repairer, make_repair
from autoqra.memory.budget import TARGETS
from autoqra.memory.model import MemoryBreakdown, MemoryModel
from autoqra.space import Assignment, SearchSpace


@attrs.frozen
class Problem:
    """Space × memory × budget, plus what is known about the units. Frozen: a calibration makes a new
    problem (:meth:`with_cost_table`), so a searcher's problem never changes under it.

    Attributes:
        space: the search space.
        memory: the memory model over ``space`` (searchers encode against its ladder).
        budget_bytes: the hard budget, in bytes, on ``target``.
        target: ``"model"`` (``model_bytes``) or ``"train"`` (``train_bytes``).
        importance_q: per-unit quantization sensitivity in [0, 1] (length = n_units), or None.
        importance_r: per-unit adaptation demand in [0, 1], or None.
        repair: ``repair(a) -> Assignment`` making ``a`` feasible (least predicted damage per byte); required.
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
    budget_bytes: int = attrs.field(converter=int)
    repair: Callable[[Assignment], Assignment] = attrs.field(kw_only=True)
    target: str = attrs.field(default="model")
    importance_q: np.ndarray | None = None
    importance_r: np.ndarray | None = None
    seed: int = 0
    cost_table: np.ndarray | None = None
    seed_tables: tuple = attrs.field(default=(), converter=tuple)
    #: the memory model over ``space`` with 16 bits added: the one footprint of any assignment (the 16-bit
    #: reference included)
    _memory16: MemoryModel = attrs.field(init=False, repr=False, eq=False)

    @target.validator
    def _target(self, att: attrs.Attribute, v: str) -> None:
        if v not in TARGETS:
            raise ValueError(f"target={v!r} is not allowed; choose one of {list(TARGETS)}")

    @repair.validator
    def _repair(self, att: attrs.Attribute, v: Any) -> None:
        if not callable(v):
            raise ValueError("a Problem needs a repair function (Problem.build makes one)")

    def __attrs_post_init__(self) -> None:
        s16 = self.space.with_unquantized()
        object.__setattr__(self, "_memory16", self.memory if s16.bits == self.space.bits else self.memory.with_space(s16))

    # -------------------------------------------------------------- footprint
    def footprint(self, a: Assignment) -> MemoryBreakdown:
        """The memory model's breakdown of ``a`` (any ladder bits or 16): the one footprint function."""
        return self._memory16.predict(a)

    def bytes_of(self, a: Assignment) -> int:
        """Footprint of ``a`` on the budget's target, in bytes."""
        return self.footprint(a).bytes_for(self.target)

    def bytes_encoded(self, x: np.ndarray) -> int:
        """:meth:`bytes_of` of an encoded assignment of ``space`` (the searchers' fast path)."""
        if isinstance(self.repair, Repairer):
            return self.repair.bytes_encoded(x)
        return self.memory.predict_encoded(x).bytes_for(self.target)

    def repair_encoded(self, x: np.ndarray) -> np.ndarray:
        """The repair of an encoded assignment of ``space``."""
        if isinstance(self.repair, Repairer):
            return self.repair.repair_encoded(x)
        return self.space.encode(self.repair(self.space.decode(x)))

    def feasible(self, a: Assignment) -> bool:
        """Whether ``a`` fits the budget."""
        return self.bytes_of(a) <= self.budget_bytes

    def make_feasible(self, a: Assignment) -> Assignment:
        """``a`` repaired to fit the budget (``a`` itself when it fits)."""
        return self.repair(a)

    @classmethod
    def build(cls, space: SearchSpace, memory: MemoryModel, budget_bytes: int, *, target: str = "model",
              importance: Any = None, seed: int = 0, cost_table: np.ndarray | None = None,
              seed_tables: Sequence[np.ndarray] = ()) -> Problem:
        """A problem whose repair is :func:`autoqra.guidance.repair.make_repair` on the same memory model,
        budget, importance priors (``importance.q`` / ``importance.r``, or None) and cost table."""
        q = None if importance is None else importance.q
        r = None if importance is None else importance.r
        rep = make_repair(memory, budget_bytes, q, r, target, cost_table=cost_table)
        return cls(space, memory, budget_bytes, repair=rep, target=target, importance_q=q, importance_r=r,
                   seed=seed, cost_table=cost_table, seed_tables=seed_tables)

    def with_cost_table(self, table: np.ndarray | None, seed_tables: Sequence[np.ndarray] | None = None) -> Problem:
        """A new problem with ``table`` (after calibration) in it and in a new repair that reads it."""
        rep = self.repair
        if isinstance(rep, Repairer):
            rep = make_repair(rep.memory, rep.budget_bytes, rep.importance_q, rep.importance_r, rep.target, rep.eps,
                              rep.max_lowbit_fraction, cost_table=table)
        return attrs.evolve(self, repair=rep, cost_table=table,
                            seed_tables=self.seed_tables if seed_tables is None else tuple(seed_tables))

    def predict(self, a: Assignment) -> float:
        """Additive predicted score of ``a`` from ``cost_table`` (nats; 0 without one)."""
        if self.cost_table is None:
            return 0.0
        x = self.space.encode(a)
        n = self.space.n_units
        return float(self.cost_table[np.arange(n), x[:n], x[n:]].sum())
