r"""Greedy budget repair: give up the least predicted quality per byte saved.

While an assignment is over the budget, apply the single one-step downgrade (one unit's bits to
the next lower ladder value, or its LoRA rank to the next lower rank) that minimises

    cost = damage_t(u) / bytes_saved_t(u),     t in {q, r}

where ``bytes_saved`` is the exact drop of the memory model's footprint (bytes) and ``damage`` is

* with a cost table (default in a search: :mod:`autoqra.guidance.costmodel`, nats per token): the predicted
  score lost by that step *at the unit's current levels* — a measured quantity for every unit, so no
  unit is free and repair has no sink; a step that the table predicts to help costs < 0 and goes first;
* without one (the paper's Eqs. 4-5, ``guidance="priors"``): ``I_t(u) + eps`` with ``I_q`` the unit's
  min-max normalised quantization sensitivity and ``I_r`` its adaptation demand (the least important
  unit then has importance 0 and absorbs every cut: the sink the cost table removes). Moves saving <= 0 bytes
are skipped while any positive move exists. Ties go to the lowest variable index (all bit
variables before all rank variables, units in space order), so repair is deterministic.

Speed: the savings of every move are computed in one batch, then only the moved variable's
saving is refreshed per step. This is exact for memory models that are additive over units.
``MemoryModel`` is, except for the backend's ``shared_bytes(bits_used)``; when that is not zero for
every subset of the ladder, the table is recomputed in full whenever the set of used bit-widths
changes, and otherwise refreshed for the bit moves of units near the moved unit's level. It is
also recomputed whenever a step's exact footprint differs from the prediction.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence

import numpy as np

from autoqra.memory.budget import TARGETS as _TARGETS
from autoqra.memory.model import MemoryModel
from autoqra.quant_backends import UNQUANTIZED_BITS
from autoqra.space import Assignment, SearchSpace

logger = logging.getLogger(__name__)


def _importance(values: Sequence[float] | np.ndarray | None, n: int, field: str) -> np.ndarray:
    """Per-unit importance as a float array (``None`` -> 0.5 everywhere)."""
    if values is None:
        return np.full(n, 0.5)
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.shape[0] != n or not np.all(np.isfinite(arr)):
        raise ValueError(f"{field} must hold {n} finite values (one per unit); got {arr.shape[0]}")
    return arr


class Repairer:
    """Callable repair bound to one memory model, budget and importance priors.

    Args:
        memory: the memory model (``memory.space`` is the search space).
        budget_bytes: hard budget in bytes on ``target``.
        importance_q: per-unit quantization sensitivity (``None`` -> uniform 0.5).
        importance_r: per-unit adaptation demand (``None`` -> uniform 0.5).
        target: ``"model"`` (``model_bytes``) or ``"train"`` (``train_bytes``).
        eps: added to importances so zero-importance units still prefer bigger savings.
        max_lowbit_fraction: optional cap on the fraction of units at the lowest bit-width;
            the input is capped first (:func:`low_bit_cap`) and repair avoids moves onto the
            lowest bit-width beyond the cap unless nothing else is left.
        cost_table: ``(n_units, len(bits), len(ranks))`` predicted score of each unit's option
            (:meth:`CostModel.table`); when given, damage per byte replaces importance per byte.
    """

    def __init__(
        self,
        memory: MemoryModel,
        budget_bytes: int,
        importance_q: Sequence[float] | np.ndarray | None = None,
        importance_r: Sequence[float] | np.ndarray | None = None,
        target: str = "model",
        eps: float = 1e-8,
        max_lowbit_fraction: float | None = None,
        cost_table: np.ndarray | None = None,
    ) -> None:
        if target not in _TARGETS:
            raise ValueError(f"target={target!r} is not allowed; use one of {list(_TARGETS)}")
        if max_lowbit_fraction is not None and not 0.0 <= max_lowbit_fraction <= 1.0:
            raise ValueError(f"max_lowbit_fraction={max_lowbit_fraction!r} must lie in [0, 1] or be None")
        self.memory = memory
        self.space: SearchSpace = memory.space
        self.budget_bytes = int(budget_bytes)
        self.target = target
        self.eps = float(eps)
        self.max_lowbit_fraction = max_lowbit_fraction
        n = self.space.n_units
        self.importance_q = _importance(importance_q, n, "importance_q")
        self.importance_r = _importance(importance_r, n, "importance_r")
        self._imp = np.concatenate([self.importance_q, self.importance_r]) + self.eps
        self.cost_table = None if cost_table is None else np.asarray(cost_table, dtype=float)
        if self.cost_table is not None and self.cost_table.shape != (n, len(self.space.bits), len(self.space.ranks)):
            raise ValueError(f"cost_table has shape {self.cost_table.shape}; expected "
                             f"{(n, len(self.space.bits), len(self.space.ranks))} (units, bits, ranks)")
        self._min_bytes: int | None = None
        self._additive = _shared_bytes_free(memory, self.space)

    # ------------------------------------------------------------------ bytes
    def bytes_encoded(self, x: np.ndarray) -> int:
        """Footprint in bytes (on ``target``) of one integer encoding."""
        bd = self.memory.predict_encoded(np.asarray(x, dtype=np.int64))
        return int(bd.bytes_for(self.target))

    def _bytes_batch(self, X: np.ndarray) -> np.ndarray:
        if self.target == "model" and X.shape[0] > 4:
            return np.asarray(self.memory.model_bytes_encoded(X), dtype=np.int64)
        return np.array([self.bytes_encoded(row) for row in X], dtype=np.int64)

    @property
    def min_bytes(self) -> int:
        """Footprint in bytes of the ladder minimum (lowest bits and rank everywhere)."""
        if self._min_bytes is None:
            self._min_bytes = self.bytes_encoded(np.zeros(2 * self.space.n_units, dtype=np.int64))
        return self._min_bytes

    def _infeasible(self) -> ValueError:
        s = self.space
        return ValueError(
            f"budget of {self.budget_bytes} bytes ({self.target} target) cannot be met: the smallest "
            f"assignment ({s.bits[0]}-bit, rank {s.ranks[0]} on every unit) needs {self.min_bytes} bytes"
        )

    # ----------------------------------------------------------------- repair
    def __call__(self, a: Assignment) -> Assignment:
        """Return ``a`` itself if feasible, else the greedily repaired assignment.

        Raises:
            ValueError: if the budget is below the ladder minimum's footprint (named in bytes).
        """
        x = self.space.encode(a)
        y = self.repair_encoded(x)
        return a if np.array_equal(x, y) else self.space.decode(y)

    def repair_encoded(self, x: np.ndarray) -> np.ndarray:
        """Repair an integer encoding ``[bit_idx_1..L, rank_idx_1..L]``; returns a new array."""
        n = self.space.n_units
        x = np.array(x, dtype=np.int64).copy()
        cap = None
        if self.max_lowbit_fraction is not None:
            cap = int(math.floor(self.max_lowbit_fraction * n))
            x = _cap_encoded(x, n, cap, self.importance_q)
        cur = self.bytes_encoded(x)
        if cur <= self.budget_bytes:
            return x
        if self.min_bytes > self.budget_bytes:
            raise self._infeasible()
        savings = self._savings(x, cur)
        used = set(x[:n].tolist())
        while cur > self.budget_bytes:
            valid = x > 0
            if cap is not None and int(np.sum(x[:n] == 0)) >= cap:
                blocked = np.zeros_like(valid)
                blocked[:n] = x[:n] == 1
                if np.any(valid & ~blocked):
                    valid &= ~blocked
            if not valid.any():
                raise self._infeasible()
            pos = valid & (savings > 0)
            if pos.any():
                cost = np.where(pos, self.damage(x) / np.where(pos, savings, 1), np.inf)
                j = int(np.argmin(cost))
            else:  # no move saves bytes (shared backend bytes): take the least harmful one
                j = int(np.argmax(np.where(valid, savings, np.iinfo(np.int64).min)))
            expected = cur - int(savings[j])
            level = int(x[j])
            x[j] -= 1
            cur = self.bytes_encoded(x)
            if cur != expected:
                savings = self._savings(x, cur)
                continue
            stale = [j]
            if j < n and not self._additive:
                new_used = set(x[:n].tolist())
                near = np.abs(x[:n] - level) <= 1  # moves whose level counts just changed
                stale = list(range(n)) if new_used != used else np.flatnonzero(near).tolist()
                used = new_used
            savings[stale] = self._savings(x, cur, np.asarray(stale))
        return x

    def damage(self, x: np.ndarray) -> np.ndarray:
        """``(2n,)`` damage of lowering each variable one step at its current level (see the module
        docstring); entries at the ladder floor are meaningless (repair never takes them)."""
        if self.cost_table is None:
            return self._imp
        return step_deltas(self.cost_table, x)[1]

    def _savings(self, x: np.ndarray, cur: int, idx: np.ndarray | None = None) -> np.ndarray:
        """Exact bytes saved by lowering variables ``idx`` (default: all) by one step (0 at the floor)."""
        idx = np.arange(x.shape[0]) if idx is None else idx
        live = idx[x[idx] > 0]
        out = np.zeros(idx.shape[0], dtype=np.int64)
        if live.size:
            X = np.repeat(x[None, :], live.size, axis=0)
            X[np.arange(live.size), live] -= 1
            out[x[idx] > 0] = cur - self._bytes_batch(X)
        return out


def step_deltas(table: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(gain_up, loss_down)``, each ``(2n,)``: the predicted score change of raising / lowering each
    variable of encoding ``x`` one ladder step, from a ``(n, n_bits, n_ranks)`` cost table.

    ``gain_up[j]`` is ``-inf`` at the top of the ladder; ``loss_down[j]`` is ``+inf`` at the floor.
    """
    x = np.asarray(x, dtype=np.int64)
    n, nb, nr = table.shape
    u = np.arange(n)
    b, r = x[:n], x[n:]
    cur = table[u, b, r]
    up_b = np.where(b + 1 < nb, table[u, np.minimum(b + 1, nb - 1), r] - cur, -np.inf)
    up_r = np.where(r + 1 < nr, table[u, b, np.minimum(r + 1, nr - 1)] - cur, -np.inf)
    dn_b = np.where(b > 0, cur - table[u, np.maximum(b - 1, 0), r], np.inf)
    dn_r = np.where(r > 0, cur - table[u, b, np.maximum(r - 1, 0)], np.inf)
    return np.concatenate([up_b, up_r]), np.concatenate([dn_b, dn_r])


def _shared_bytes_free(memory: MemoryModel, space: SearchSpace) -> bool:
    """True when the backend's bytes shared per used bit-width are 0 for every subset of the ladder."""
    shared = getattr(getattr(memory, "backend", None), "shared_bytes", None)
    if shared is None:
        return False
    qb = [b for b in space.bits if b != UNQUANTIZED_BITS]
    subsets = itertools.chain.from_iterable(itertools.combinations(qb, k) for k in range(1, len(qb) + 1))
    return all(int(shared(list(c))) == 0 for c in subsets)


#: Builds a repair function ``repair(a) -> Assignment`` (the :class:`Repairer`; see it for the args).
make_repair = Repairer


def _cap_encoded(x: np.ndarray, n: int, cap: int, importance: np.ndarray | None) -> np.ndarray:
    low = np.flatnonzero(x[:n] == 0)
    excess = len(low) - cap
    if excess <= 0:
        return x
    imp = np.zeros(n) if importance is None else np.asarray(importance, dtype=float)
    order = low[np.lexsort((low, -imp[low]))]  # most important first, ties by unit index
    x = x.copy()
    x[order[:excess]] = 1
    return x


def low_bit_cap(
    a: Assignment,
    space: SearchSpace,
    max_fraction: float,
    importance: Sequence[float] | np.ndarray | None = None,
) -> Assignment:
    """Promote units at the lowest bit-width one level until at most ``floor(max_fraction * L)`` remain.

    The most important units (by ``importance``, ties by unit order) are promoted first. The
    result may exceed a memory budget; run repair afterwards if needed.
    """
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction={max_fraction!r} must lie in [0, 1]")
    if len(space.bits) < 2:
        return a
    n = space.n_units
    imp = None if importance is None else _importance(importance, n, "importance")
    x = space.encode(a)
    y = _cap_encoded(x, n, int(math.floor(max_fraction * n)), imp)
    return a if np.array_equal(x, y) else space.decode(y)
