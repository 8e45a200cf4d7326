r"""The searcher interface (ask/tell) and its registry.

A searcher proposes assignments and learns from results. It does not evaluate, repair or
store anything: the optimizer owns budget repair, fidelity and the trial store. Every
searcher is bound to the run's :class:`~autoqra.problem.Problem` (``self.ctx``): space, memory model,
budget, target, priors, cost table and the repair.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from autoqra.problem import Problem
from autoqra.registry import Registry, constructor_kwargs
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


#: The run's settings the optimizer offers a searcher built by name (Phase I: ``pop_size``, ``max_generations``,
#: ``warm_start``, ``objectives``, ``mutation``, ``knapsack_k``; Phase II: ``alpha``, ``batch_size``), through
#: :func:`get_searcher`'s ``offered``: each reaches the searcher only where its constructor takes it, so a simple
#: user searcher need not accept them.
RUN_SETTINGS = ("pop_size", "max_generations", "warm_start", "objectives", "mutation", "knapsack_k", "alpha",
                "batch_size")


def get_searcher(searcher: str | Searcher, ctx: Problem, *, offered: dict[str, Any] | None = None,
                 **options: Any) -> Searcher:
    """Resolve a searcher name to an instance bound to ``ctx`` (instances get ``bind(ctx)``).

    Args:
        searcher: a registered name (:data:`SEARCHERS`) or an instance.
        ctx: the problem to bind it to.
        offered: the run's settings: each is passed only where the searcher's constructor takes it (a searcher
            that has no use for ``alpha`` or ``pop_size`` simply does not declare it).
        **options: the searcher's own options: every one must be a parameter of its constructor.

    Raises:
        ValueError: an unknown name (listing the registered ones); an option the searcher does not take
            (naming the searcher and the options it takes); options given with an instance.
    """
    offered = dict(offered or {})
    if isinstance(searcher, Searcher):
        if options:
            raise ValueError(f"options {sorted(options)} can only be given with a searcher name, not with an "
                             f"instance ({type(searcher).__name__}): pass them to its constructor")
        searcher.bind(ctx)
        return searcher
    cls = SEARCHERS.get(searcher)
    inst = cls(**constructor_kwargs(cls, f"searcher {searcher!r}", options, offered))
    inst.bind(ctx)
    return inst


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
