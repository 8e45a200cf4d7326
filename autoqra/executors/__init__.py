r"""Executors evaluate batches of trials: ``"local"`` (sequential, this process) or ``"ray"`` (one trial per worker)."""

from autoqra.executors.base import EXECUTORS, Done, Executor, LocalExecutor, make_executor

__all__ = ["EXECUTORS", "Done", "Executor", "LocalExecutor", "make_executor"]
