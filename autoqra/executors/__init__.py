r"""Executors evaluate batches of trials: ``"local"`` (sequential, this process) or ``"ray"`` (one trial per worker).

Both are registered in :data:`EXECUTORS` (``@register_executor("name")`` adds one, selectable by name); Ray
itself is imported only when a :class:`RayExecutor` is built.
"""

from autoqra.executors.base import EXECUTORS, Done, Executor, LocalExecutor, make_executor, register_executor
from autoqra.executors.ray import RayExecutor, require_ray

__all__ = ["EXECUTORS", "Done", "Executor", "LocalExecutor", "RayExecutor", "make_executor", "register_executor",
           "require_ray"]
