r"""Measured peak memory of a training step.

CUDA: ``torch.cuda.max_memory_allocated`` (isolated in :func:`_cuda_peak`). CPU (and any
device): :class:`StorageTracker`, a ``TorchDispatchMode`` that sees every tensor an op
returns, counts each new storage once while it is alive (weak references), and records
the peak of the sum. This is the measurement the activation estimate is checked with.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class StorageTracker(TorchDispatchMode):
    """Tracks bytes of storages created by ops run under the mode (forward and backward).

    Attributes:
        current: live bytes allocated under the mode.
        peak: the maximum of ``current``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for t in flat:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0 or key in self._live:
                continue
            nbytes = st.nbytes()
            try:
                ref = weakref.ref(st, lambda _r, k=key, n=nbytes: self._release(k, n))
            except TypeError:  # pragma: no cover - storage not weak-referenceable
                continue
            self._live[key] = ref
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """Run ``fn`` and return ``(result, peak bytes above the start)`` on a CUDA device."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    res = fn()
    torch.cuda.synchronize(device)
    return res, int(torch.cuda.max_memory_allocated(device) - start)


def measure_peak(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """Run ``fn`` (e.g. one forward+backward) and return ``(result, peak new bytes)``.

    The peak counts tensors allocated while ``fn`` runs (activations, temporaries, gradients
    created during backward), not those that already existed.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    tracker = StorageTracker()
    with tracker:
        res = fn()
    return res, tracker.peak
