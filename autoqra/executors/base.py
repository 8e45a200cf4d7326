r"""Executors: where a batch of trials is evaluated (in this process, or on Ray workers).

An executor takes a batch of ``(assignment, fidelity)`` items and yields each outcome as it
finishes, in any order, tagged with the item's index. The optimizer keeps results in candidate
order and stores each one the moment it arrives, so its decisions never depend on the order
in which workers finish.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from autoqra.evaluators.base import EvalResult, Evaluator, Fidelity
from autoqra.registry import Registry, constructor_kwargs
from autoqra.space import Assignment

#: Executors by name (``OptimizeConfig.executor`` / ``--executor``): ``"local"`` here, ``"ray"`` in
#: :mod:`autoqra.executors.ray`; ``@register_executor("name")`` adds one.
EXECUTORS: Registry[Executor] = Registry("executor")


def register_executor(name: str) -> Callable[[type[Executor]], type[Executor]]:
    """Class decorator registering an executor under ``name`` (later registrations win).

    :func:`make_executor` builds it as ``cls(evaluator, address=..., workers=..., resources=...)``, passing
    each of those keywords only where the constructor takes it.
    """
    return EXECUTORS.register(name)

Item = tuple[Assignment, Fidelity]


class Done(NamedTuple):
    """One finished item of a batch.

    Attributes:
        index: position of the item in the submitted batch.
        result: its :class:`EvalResult` (status ``"failed"`` when its worker died twice).
        worker: JSON-able description of where it ran (``executor``, ``pid``, ``node``, ``attempts``...).
    """

    index: int
    result: EvalResult
    worker: dict[str, Any]


class Executor(abc.ABC):
    """Evaluates batches of trials with one evaluator. Use as a context manager or call :meth:`close`.

    An executor passed to :func:`autoqra.optimize` (``executor=instance``) is bound to the search's
    evaluator with :meth:`bind` and left open, so one pool of workers can serve several searches.

    Attributes:
        name: ``"local"``, ``"ray"``... (recorded in the run summary).
        n_workers: how many trials run at once (the optimizer's Phase II batch size by default).
    """

    name: str = "base"
    n_workers: int = 1

    @abc.abstractmethod
    def bind(self, evaluator: Evaluator) -> None:
        """Evaluate with ``evaluator`` from now on."""

    @abc.abstractmethod
    def submit_batch(self, items: Sequence[Item], may_start: Callable[[int], bool] | None = None) -> Iterator[Done]:
        """Evaluate ``items``; yield a :class:`Done` for each as it finishes (any order).

        Items start in index order. ``may_start(i)`` is called just before item ``i`` starts;
        when it returns False neither ``i`` nor any later item starts (items already running
        still finish and are yielded). Retries of a failed worker do not consult it.
        """

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release workers (idempotent)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for the run's info."""
        return {"name": self.name, "workers": self.n_workers}


@EXECUTORS.register("local")
class LocalExecutor(Executor):
    """Sequential evaluation in this process (the default; exactly the pre-batch behaviour)."""

    def __init__(self, evaluator: Evaluator | None = None) -> None:
        self.evaluator = evaluator
        self.n_workers = 1

    def bind(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def submit_batch(self, items: Sequence[Item], may_start: Callable[[int], bool] | None = None) -> Iterator[Done]:
        if self.evaluator is None:
            raise RuntimeError("this executor has no evaluator yet: call bind(evaluator) first")
        for i, (a, fidelity) in enumerate(items):
            if may_start is not None and not may_start(i):
                return
            yield Done(i, self.evaluator.evaluate(a, fidelity), {"executor": "local", "pid": os.getpid()})


def make_executor(name: str, evaluator: Evaluator, *, address: str | None = None, workers: int | None = None,
                  resources: dict[str, Any] | None = None) -> Executor:
    """Build the executor registered as ``name`` (``"local"``, ``"ray"`` or a plug-in's) around ``evaluator``:
    ``cls(evaluator, address=..., workers=..., resources=...)``, each keyword passed only where the
    constructor takes it (:class:`~autoqra.config.OptimizeConfig` refuses a given one it does not take).

    Raises:
        ValueError: an unknown name (listing the registered ones).
        ImportError: ``"ray"`` without Ray installed (``pip install 'autoqra[ray]'``).
    """
    cls = EXECUTORS.get(name)
    offered = {"address": address, "workers": workers, "resources": resources}
    return cls(evaluator, **constructor_kwargs(cls, f"executor {name!r}", offered=offered, skip=1))
