r"""The searcher interface (ask/tell) and its registry.

A searcher proposes assignments and learns from results. It does not evaluate, repair or
store anything: the optimizer owns budget repair, fidelity and the trial store. Every
searcher receives a :class:`SearchContext` describing the problem.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from autoqra.space import Assignment, SearchSpace

if TYPE_CHECKING:
    from autoqra.evaluators.base import EvalResult
    from autoqra.memory import MemoryModel

_SEARCHERS: dict[str, type[Searcher]] = {}


def register_searcher(name: str) -> Callable[[type[Searcher]], type[Searcher]]:
    """Class decorator registering a searcher under ``name`` (later registrations win)."""

    def deco(cls: type[Searcher]) -> type[Searcher]:
        cls.name = name
        _SEARCHERS[name] = cls
        return cls

    return deco


def available_searchers() -> list[str]:
    return sorted(_SEARCHERS)


def get_searcher(searcher: str | Searcher, ctx: SearchContext, **kwargs: Any) -> Searcher:
    """Resolve a searcher name to an instance bound to ``ctx`` (instances get ``bind(ctx)``).

    ``kwargs`` are optional settings (e.g. ``pop_size``); those the searcher's constructor does
    not take are dropped, so simple user searchers need not accept them.
    """
    if isinstance(searcher, Searcher):
        searcher.bind(ctx)
        return searcher
    if searcher not in _SEARCHERS:
        raise ValueError(f"searcher={searcher!r} is not registered; registered searchers: {available_searchers()}")
    cls = _SEARCHERS[searcher]
    inst = cls(**_accepted(cls, kwargs))
    inst.bind(ctx)
    return inst


def _accepted(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``cls.__init__`` accepts (all of them if it takes ``**kwargs``)."""
    import inspect

    if cls.__init__ is object.__init__:
        return {}
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


@attrs.define
class SearchContext:
    """What a searcher knows about the problem.

    Attributes:
        space: the search space.
        memory: the memory model (``memory.predict(a)`` gives a :class:`MemoryBreakdown`).
        budget_bytes: the hard budget, in bytes, on ``target``.
        target: ``"model"`` (``model_bytes``) or ``"train"`` (``train_bytes``).
        importance_q: per-unit quantization sensitivity in [0, 1] (length = n_units).
        importance_r: per-unit adaptation demand in [0, 1].
        repair: ``repair(a) -> Assignment`` making ``a`` feasible (least predicted damage per byte).
        seed: the run's seed.
        cost_table: ``(n_units, len(bits), len(ranks))`` predicted score (nats) of each unit's option
            from the calibrated cost model (:meth:`autoqra.costmodel.CostModel.table`), or None
            (priors-guided search).
        seed_tables: further tables (the same cost model under other calibrations) whose exact
            knapsack optima join the first generation as seeds: the calibration is uncertain, real
            trials decide between bits and adapters.
    """

    space: SearchSpace
    memory: MemoryModel
    budget_bytes: int
    target: str = "model"
    importance_q: np.ndarray | None = None
    importance_r: np.ndarray | None = None
    repair: Callable[[Assignment], Assignment] | None = None
    seed: int = 0
    cost_table: np.ndarray | None = None
    seed_tables: list = attrs.Factory(list)

    def predict(self, a: Assignment) -> float:
        """Additive predicted score of ``a`` from ``cost_table`` (nats; 0 without one)."""
        if self.cost_table is None:
            return 0.0
        x = self.space.encode(a)
        n = self.space.n_units
        return float(self.cost_table[np.arange(n), x[:n], x[n:]].sum())

    def bytes_of(self, a: Assignment) -> int:
        bd = self.memory.predict(a)
        return bd.model_bytes if self.target == "model" else bd.train_bytes

    def feasible(self, a: Assignment) -> bool:
        return self.bytes_of(a) <= self.budget_bytes

    def make_feasible(self, a: Assignment) -> Assignment:
        if self.repair is None:
            raise RuntimeError("this SearchContext has no repair function")
        return self.repair(a)


class Searcher(abc.ABC):
    """Proposes assignments (``ask``) and learns from results (``tell``).

    Lifecycle: ``bind(ctx)`` once, then alternate ``ask(n)`` / ``tell(assignments, results)``.
    ``state_dict()`` / ``load_state_dict()`` must capture everything needed to resume
    (JSON-able values only). ``done`` turns True when the searcher's own stopping rule fires.
    """

    name: str = "base"

    def bind(self, ctx: SearchContext) -> None:
        self.ctx = ctx
        self.rng = np.random.default_rng(ctx.seed)

    @property
    def done(self) -> bool:
        """True once the searcher's own stopping rule has fired."""
        return False

    @abc.abstractmethod
    def ask(self, n: int) -> list[Assignment]:
        """Propose up to ``n`` assignments (may return fewer, or none when done)."""

    @abc.abstractmethod
    def tell(self, assignments: Sequence[Assignment], results: Sequence[EvalResult]) -> None:
        """Report results for assignments returned by :meth:`ask` (same order)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional
        pass
