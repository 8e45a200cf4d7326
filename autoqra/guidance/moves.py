r"""Byte-neutral moves on the integer encoding, guided by the cost table (nats per byte).

A byte-neutral move trades bytes between variables and ends feasible with its freed bytes spent:

* :func:`fill`: while some one-step upgrade fits the budget and is predicted to help, apply the one
  with the largest predicted gain per added byte (the anchored warm start's fill, and every move's
  second half).
* :func:`swap_down`: one downgrade (drawn among the cheapest in predicted loss per freed byte), then
  :func:`fill` — "block 29 from 8 to 4 bits, spend the bytes on ranks".
* :func:`swap_up`: one upgrade (drawn among the best in predicted gain per byte, whether or not it
  fits), then the repair pays for it with the cheapest downgrades elsewhere.
* :func:`random_edit`: the control — one uniformly random step up or down, then random downgrades
  until feasible or random upgrades until none fits (no cost model).

Moves that change nothing are redrawn (no reflection at the ladder ends); every move returns a new
array. ``bytes_of(x) -> int`` is the exact footprint on the budget's target.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from autoqra.guidance.repair import step_deltas

BytesFn = Callable[[np.ndarray], int]
RepairFn = Callable[[np.ndarray], np.ndarray]
_TRIES = 16


def fill(x: np.ndarray, upper: np.ndarray, table: np.ndarray, bytes_of: BytesFn, budget: int,
         min_gain: float = 0.0) -> np.ndarray:
    """Greedy: apply the fitting one-step upgrade of largest predicted gain per added byte until none
    fits or none gains more than ``min_gain`` nats (ties: lowest variable index)."""
    return greedy_fill(x, upper, lambda y: step_deltas(table, y)[0], bytes_of, budget, min_gain)


def greedy_fill(x: np.ndarray, upper: np.ndarray, gains: Callable[[np.ndarray], np.ndarray], bytes_of: BytesFn,
                budget: int, min_gain: float = -np.inf) -> np.ndarray:
    """Greedy: while a one-step upgrade (one variable one rung up) fits ``budget``, apply the one with the
    largest ``gains(x)[j]`` per added byte (only those with gain > ``min_gain``; ties: lowest index)."""
    x = np.array(x, dtype=np.int64)
    upper = np.asarray(upper, dtype=np.int64)
    cur = bytes_of(x)
    while True:
        gain = np.asarray(gains(x), dtype=float)
        best, best_rate, best_bytes = -1, -np.inf, cur
        for j in np.flatnonzero((x < upper) & (gain > min_gain)):
            y = x.copy()
            y[j] += 1
            b = bytes_of(y)
            if b > budget:
                continue
            rate = gain[j] / max(b - cur, 1)
            if rate > best_rate:
                best, best_rate, best_bytes = int(j), rate, b
        if best < 0:
            return x
        x[best] += 1
        cur = best_bytes


def _draw(scores: np.ndarray, rng: np.random.Generator, top: int) -> int:
    """A uniform draw among the ``top`` finite best (highest) scores."""
    ok = np.flatnonzero(np.isfinite(scores))
    if ok.size == 0:
        return -1
    order = ok[np.argsort(-scores[ok], kind="stable")][:top]
    return int(rng.choice(order))


def _per_byte(x: np.ndarray, delta: np.ndarray, bytes_of: BytesFn, sign: int) -> np.ndarray:
    """Predicted change per byte of moving each variable one step (``sign`` +1 up, -1 down)."""
    cur = bytes_of(x)
    out = np.full(x.shape[0], -np.inf)
    for j in np.flatnonzero(np.isfinite(delta)):
        y = x.copy()
        y[j] += sign
        db = abs(bytes_of(y) - cur)
        out[j] = delta[j] / max(db, 1)
    return out


def swap_down(x: np.ndarray, upper: np.ndarray, table: np.ndarray, bytes_of: BytesFn, budget: int,
              rng: np.random.Generator, top: int = 6) -> np.ndarray:
    """One downgrade among the ``top`` cheapest (predicted loss per freed byte), then :func:`fill`."""
    x = np.array(x, dtype=np.int64)
    _, loss = step_deltas(table, x)
    rate = _per_byte(x, np.where(x > 0, loss, np.inf), bytes_of, -1)  # loss per byte, lower is better
    for _ in range(_TRIES):
        j = _draw(-rate, rng, top)
        if j < 0:
            return x
        y = x.copy()
        y[j] -= 1
        cap = np.array(upper, dtype=np.int64)
        cap[j] = y[j]  # never refill the variable just lowered
        y = fill(y, cap, table, bytes_of, budget)
        if not np.array_equal(y, x):
            return y
        rate[j] = np.inf
    return x


def swap_up(x: np.ndarray, upper: np.ndarray, table: np.ndarray, bytes_of: BytesFn,
            repair: RepairFn, rng: np.random.Generator, top: int = 6) -> np.ndarray:
    """One upgrade among the ``top`` best (predicted gain per byte), then ``repair`` pays for it."""
    x = np.array(x, dtype=np.int64)
    gain, _ = step_deltas(table, x)
    rate = _per_byte(x, np.where(x < upper, gain, -np.inf), bytes_of, 1)
    for _ in range(_TRIES):
        j = _draw(rate, rng, top)
        if j < 0:
            return x
        y = x.copy()
        y[j] += 1
        y = repair(y)
        if not np.array_equal(y, x):
            return y
        rate[j] = -np.inf
    return x


def random_edit(x: np.ndarray, upper: np.ndarray, bytes_of: BytesFn, budget: int,
                rng: np.random.Generator) -> np.ndarray:
    """The random byte-neutral control: one random step, then random downgrades until feasible, or
    random upgrades that fit until none does (no cost model). Redrawn while nothing changes."""
    x0 = np.array(x, dtype=np.int64)
    for _ in range(_TRIES):
        y = x0.copy()
        j = int(rng.integers(len(y)))
        moves = [d for d in (-1, 1) if 0 <= y[j] + d <= upper[j]]
        if not moves:
            continue
        y[j] += int(rng.choice(moves))
        while bytes_of(y) > budget:
            down = np.flatnonzero(y > 0)
            if down.size == 0:
                break
            y[int(rng.choice(down))] -= 1
        while True:
            cur_ok = [k for k in np.flatnonzero(y < upper) if bytes_of(_bump(y, k)) <= budget]
            if not cur_ok:
                break
            y[int(rng.choice(cur_ok))] += 1
        if bytes_of(y) <= budget and not np.array_equal(y, x0):
            return y
    return x0


def _bump(x: np.ndarray, j: int) -> np.ndarray:
    y = x.copy()
    y[j] += 1
    return y
