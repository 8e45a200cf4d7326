r"""Two-objective Pareto utilities: maximise score, minimise memory (bytes).

* :func:`pareto_mask` — non-dominated points (exact duplicates are all kept).
* :func:`hypervolume_2d` — exact 2-D hypervolume by a sweep, in score × bytes units.
* :class:`HVStagnation` — the Phase-I stopping rule on hypervolume progress.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _arrays(scores: Sequence[float] | np.ndarray, mems: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float).reshape(-1)
    m = np.asarray(mems, dtype=float).reshape(-1)
    if s.shape != m.shape:
        raise ValueError(f"scores and mems must have the same length; got {s.shape[0]} and {m.shape[0]}")
    return s, m


def pareto_mask(scores: Sequence[float] | np.ndarray, mems: Sequence[float] | np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates.

    Point ``j`` dominates ``i`` when ``score_j >= score_i`` and ``mem_j <= mem_i`` with at least
    one strict inequality. Exact duplicates do not dominate each other, so all copies of a
    front point are kept. Points with a non-finite score or memory are never on the front.

    Args:
        scores: higher is better.
        mems: memory footprints in bytes (lower is better).

    Returns:
        ``np.ndarray`` of bool, same length as the inputs.
    """
    s, m = _arrays(scores, mems)
    mask = np.zeros(s.shape[0], dtype=bool)
    ok = np.flatnonzero(np.isfinite(s) & np.isfinite(m))
    if ok.size == 0:
        return mask
    order = ok[np.lexsort((-s[ok], m[ok]))]  # memory ascending, then score descending
    best_prev = -np.inf  # best score among strictly smaller memories
    i = 0
    while i < order.size:
        j = i
        while j < order.size and m[order[j]] == m[order[i]]:
            j += 1
        group = order[i:j]
        group_max = s[group[0]]
        if group_max > best_prev:
            mask[group] = s[group] == group_max
        best_prev = max(best_prev, group_max)
        i = j
    return mask


def hypervolume_2d(
    scores: Sequence[float] | np.ndarray,
    mems: Sequence[float] | np.ndarray,
    ref_score: float,
    ref_mem: float,
) -> float:
    """Exact area dominated by the points inside the box ``score > ref_score``, ``mem < ref_mem``.

    Args:
        scores: higher is better.
        mems: bytes, lower is better.
        ref_score: reference (worst acceptable) score.
        ref_mem: reference (worst acceptable) memory in bytes.

    Returns:
        The hypervolume in score × bytes units (0.0 when no point beats the reference).
    """
    s, m = _arrays(scores, mems)
    keep = np.isfinite(s) & np.isfinite(m) & (s > ref_score) & (m < ref_mem)
    if not keep.any():
        return 0.0
    s, m = s[keep], m[keep]
    front = pareto_mask(s, m)
    s, m = s[front], m[front]
    order = np.lexsort((s, m))
    s, m = s[order], m[order]
    right = np.append(m[1:], ref_mem)
    return float(np.sum((right - m) * (s - ref_score)))


class HVStagnation:
    """Stop when hypervolume progress over a window of generations falls below a relative epsilon.

    Paper rule (Phase-I termination): with history ``hv``, stop when ``len(hv) >= window + 1``,
    ``hv[t] >= hv[t - window] > 0`` and ``(hv[t] - hv[t - window]) / hv[t - window] < rel_eps``.

    Args:
        window: number of generations compared (3 in the paper).
        rel_eps: relative-gain threshold (1e-3 in the paper).
    """

    def __init__(self, window: int = 3, rel_eps: float = 1e-3) -> None:
        if int(window) < 1:
            raise ValueError(f"window={window!r} must be an integer >= 1")
        if not rel_eps >= 0:
            raise ValueError(f"rel_eps={rel_eps!r} must be >= 0")
        self.window = int(window)
        self.rel_eps = float(rel_eps)
        self.history: list[float] = []
        self.stopped = False

    def should_stop(self) -> bool:
        """Evaluate the rule on the current history (no update)."""
        if len(self.history) < self.window + 1:
            return False
        new, old = self.history[-1], self.history[-1 - self.window]
        return old > 0 and new >= old and (new - old) / old < self.rel_eps

    def update(self, hv: float) -> bool:
        """Append one generation's hypervolume; return True when the search should stop."""
        self.history.append(float(hv))
        self.stopped = self.stopped or self.should_stop()
        return self.should_stop()


def front_hypervolume(scores: Sequence[float] | np.ndarray, mems: Sequence[float] | np.ndarray, budget_bytes: float,
                      ref_score: float) -> float:
    """The search's hypervolume of feasible points: score above ``ref_score`` × bytes below the budget (the
    reference point ``(ref_score, budget × 1.0001)``, so a point exactly at the budget still counts). The
    optimizer's stop, its history and the report's progress plot all use this one reference rule, with
    ``ref_score`` the worst top-rung score (− 1e-3) they know of."""
    if len(scores) == 0 or not np.isfinite(ref_score):
        return 0.0
    return hypervolume_2d(scores, mems, ref_score, float(budget_bytes) * 1.0001)
