r"""Training rungs that continue each other, and common random numbers across candidates.

* :class:`RungStates`: an in-memory, byte-capped LRU of training states (LoRA weights, AdamW state,
  scheduler, RNG, first loss, step peak) keyed by ``(assignment, steps)``. When a candidate is
  promoted from a 10-step rung to a 30-step one, its 30-step training *continues* the 10-step state
  instead of starting again. With the constant learning-rate schedule the search trains under, the
  continued run is the same computation as a fresh 30-step run (same data order, same RNG), so a
  trial's score does not depend on whether its state was still cached (tested bit for bit).
* :func:`common_lora_init`: every ``lora_A`` matrix drawn from a generator seeded by
  ``(seed, module name)``, with the same bound as peft's default (``U(-1/sqrt(in), 1/sqrt(in))``).
  The draw fills rows in order, so a rank-4 adapter's ``A`` is the first 4 rows of the rank-16 one:
  two candidates that differ in one unit's rank start every other adapter identically (peft's own
  init draws all adapters from one global stream, so one changed rank shifted every later draw).
  With the fixed data order this makes differences between candidates *paired*.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

DEFAULT_MAX_BYTES = 2 * 1024**3


def _stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


@torch.no_grad()
def common_lora_init(model: nn.Module, seed: int) -> None:
    """Re-draw every LoRA ``A`` matrix from a per-module generator (see the module docstring); ``B`` stays 0."""
    for name, mod in model.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict):
            continue
        for adapter, lin in lora_a.items():
            w = lin.weight
            g = torch.Generator().manual_seed(_stable_seed(seed, name, adapter))
            bound = 1.0 / math.sqrt(w.shape[1])
            w.copy_(torch.empty(w.shape, dtype=torch.float32).uniform_(-bound, bound, generator=g).to(w))


def _nbytes(obj: Any) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class RungStates:
    """Byte-capped LRU of training states by ``(key, steps)``.

    Attributes:
        max_bytes: cap on the summed tensor bytes of the kept states.
        hits / misses: continued vs fresh trainings.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._states: OrderedDict[tuple[str, int], tuple[int, dict[str, Any]]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def best(self, key: str, steps: int) -> tuple[int, dict[str, Any]] | None:
        """The kept state of ``key`` with the most steps ``<= steps``, as ``(steps, state)``."""
        found = [s for (k, s) in self._states if k == key and s <= steps]
        if not found:
            return None
        s = max(found)
        self._states.move_to_end((key, s))
        return s, self._states[(key, s)][1]

    def put(self, key: str, steps: int, state: dict[str, Any]) -> None:
        nb = _nbytes(state)
        old = self._states.pop((key, steps), None)
        if old is not None:
            self.bytes -= old[0]
        if nb > self.max_bytes:
            return
        self._states[(key, steps)] = (nb, state)
        self.bytes += nb
        while self.bytes > self.max_bytes:
            _, (b, _) = self._states.popitem(last=False)
            self.bytes -= b

    def hooks(self, key: str, steps: int) -> RungHooks:
        return RungHooks(self, key, steps)

    def __len__(self) -> int:
        return len(self._states)


class RungHooks:
    """:class:`~autoqra.evaluators.finetune.FitHooks` that resume from and save to a :class:`RungStates`."""

    def __init__(self, states: RungStates, key: str, steps: int) -> None:
        self.states, self.key, self.steps = states, key, steps
        self.first_loss = self.last_loss = float("nan")
        self.peak_bytes = 0
        self.resumed_from = 0

    def note_peak(self, peak_bytes: int) -> None:
        self.peak_bytes = int(peak_bytes)

    def start(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> int:
        hit = self.states.best(self.key, self.steps)
        if hit is None:
            self.states.misses += 1
            return 0
        done, st = hit
        self.states.hits += 1
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(st["lora"][n])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        self.first_loss, self.last_loss = st["first_loss"], st["last_loss"]
        self.peak_bytes, self.resumed_from = st["peak_bytes"], done
        return done

    def step_end(self, step: int, loss: float, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
        if step == 0:
            self.first_loss = loss
        if step + 1 != self.steps:
            return
        state = {
            "lora": {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": _cpu(opt.state_dict()), "scheduler": copy.deepcopy(sched.state_dict()),
            "rng": torch.get_rng_state(), "first_loss": self.first_loss, "last_loss": loss,
            "peak_bytes": self.peak_bytes,
        }
        self.states.put(self.key, self.steps, state)
