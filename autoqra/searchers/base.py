r"""The searcher interface (ask/tell) and its registry.

A searcher proposes assignments and learns from results. It does not evaluate, repair or
store anything: the optimizer owns budget repair, fidelity and the trial store. Every
searcher is bound to the run's :class:`~autoqra.problem.Problem` (``self.ctx``): space, memory model,
budget, target, priors, cost table and the repair.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from autoqra.problem import Problem
from autoqra.registry import Registry
from autoqra.space import Assignment

if TYPE_CHECKING:
    from autoqra.evaluators.base import EvalResult

#: Searchers by name (``phase1=`` / ``phase2=``); ``@register_searcher("name")`` adds one.
SEARCHERS: Registry[Searcher] = Registry("searcher")


def register_searcher(name: str) -> Callable[[type[Searcher]], type[Searcher]]:
    """Class decorator registering a searcher under ``name`` (later registrations win)."""
    return SEARCHERS.register(name)


def available_searchers() -> list[str]:
    return SEARCHERS.names()


def get_searcher(searcher: str | Searcher, ctx: Problem, **kwargs: Any) -> Searcher:
    """Resolve a searcher name to an instance bound to ``ctx`` (instances get ``bind(ctx)``).

    ``kwargs`` are optional settings (e.g. ``pop_size``); those the searcher's constructor does
    not take are dropped, so simple user searchers need not accept them.
    """
    if isinstance(searcher, Searcher):
        searcher.bind(ctx)
        return searcher
    cls = SEARCHERS.get(searcher)
    inst = cls(**_accepted(cls, kwargs))
    inst.bind(ctx)
    return inst


def _accepted(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``cls.__init__`` accepts (all of them if it takes ``**kwargs``)."""
    if cls.__init__ is object.__init__:
        return {}
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


#: The problem a searcher is bound to (:class:`autoqra.problem.Problem`); ``SearchContext`` is its
#: former name, kept so user searchers written against it keep working.
SearchContext = Problem


class Searcher(abc.ABC):
    """Proposes assignments (``ask``) and learns from results (``tell``).

    Lifecycle: ``bind(ctx)`` once, then alternate ``ask(n)`` / ``tell(assignments, results)``.
    ``state_dict()`` / ``load_state_dict()`` must capture everything needed to resume
    (JSON-able values only). ``done`` turns True when the searcher's own stopping rule fires.
    """

    name: str = "base"

    def bind(self, ctx: Problem) -> None:
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
