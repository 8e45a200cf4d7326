r"""Phase II: trust-region Bayesian optimisation (TuRBO-1) with Expected Improvement.

The GP (Matérn-5/2 ARD, BoTorch ``SingleTaskGP``) models the scalar utility of Eq. 8,
``u(a) = α·P̂(a) − (1−α)·M̂(a)``, on the ordinal encoding of Eq. 9 (ladder positions in
[0, 1], plus importance coverages when the context has importances). Candidates are discrete
points inside a lengthscale-weighted box around the incumbent, repaired to the byte budget.
The first ``tell`` is the warm start (Phase-I high-fidelity trials); the min–max ranges of
P̂ (score) and M̂ (bytes) come from its Pareto front and stay fixed afterwards.

When the region collapses (side < ``length_min``) the searcher stops; it does not restart,
because Phase II is a local refinement of Phase I and a restart would discard the warm start.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from autoqra.searchers._gp import UtilityScale, fit_gp, select
from autoqra.searchers.base import Searcher, register_searcher
from autoqra.space import Assignment

if TYPE_CHECKING:
    from autoqra.evaluators.base import EvalResult

log = logging.getLogger(__name__)


@register_searcher("turbo")
class TurboSearcher(Searcher):
    """TuRBO-1 over the discrete (bits, rank) ladders, maximising the Eq. 8 utility.

    Args:
        alpha: utility weight of the normalised score (Eq. 8; paper default 0.6).
        batch_size: expected ``n`` per ask (sets the default failure tolerance).
        length_init, length_min, length_max: trust-region side length in ordinal units ([0, 1]).
        success_tolerance: consecutive successful batches before the side doubles.
        failure_tolerance: consecutive failed batches before it halves
            (default ``min(5, ceil(max(4, d) / batch_size))``, d = 2·n_units).
        n_candidates: random perturbations of the centre drawn per ask.
        ei_epsilon: stop when the largest EI (utility units) falls below this.
        max_iterations: stop after this many BO batches (warm start excluded); None = no limit.
    """

    def __init__(
        self,
        alpha: float = 0.6,
        batch_size: int = 1,
        length_init: float = 0.8,
        length_min: float = 0.5**7,
        length_max: float = 1.6,
        success_tolerance: int = 3,
        failure_tolerance: int | None = None,
        n_candidates: int = 512,
        ei_epsilon: float = 1e-4,
        max_iterations: int | None = None,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} is not allowed; it must lie in [0, 1]")
        if not 0 < length_min <= length_init <= length_max:
            raise ValueError(
                f"length_min={length_min}, length_init={length_init}, length_max={length_max} are not allowed; "
                "need 0 < length_min <= length_init <= length_max"
            )
        ints = dict(batch_size=batch_size, success_tolerance=success_tolerance, n_candidates=n_candidates,
                    failure_tolerance=failure_tolerance, max_iterations=max_iterations)  # fmt: skip
        for name, v in ints.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"{name}={v!r} is not allowed; it must be an integer >= 1")
        self.alpha, self.batch_size, self.n_candidates = alpha, int(batch_size), int(n_candidates)
        self.length_init, self.length_min, self.length_max = length_init, length_min, length_max
        self.success_tolerance, self._failure_tolerance = int(success_tolerance), failure_tolerance
        self.ei_epsilon, self.max_iterations = ei_epsilon, max_iterations

    # ----------------------------------------------------------------- state
    def bind(self, ctx: Any) -> None:
        super().bind(ctx)
        self.told: list[tuple[Assignment, float | None, int]] = []  # (assignment, score or None if failed, bytes)
        self.pending: list[Assignment] = []
        self.scale: UtilityScale | None = None
        self.warm = False
        self.length, self.n_success, self.n_failure = self.length_init, 0, 0
        self.iteration, self.n_asks, self._done, self.stop_reason = 0, 0, False, ""
        self.history: list[dict[str, Any]] = []
        self.last_max_ei: float | None = None
        self.last_box: tuple[list[int], list[int]] | None = None  # trust region of the last ask, ladder indices

    @property
    def done(self) -> bool:
        return self._done

    @property
    def failure_tolerance(self) -> int:
        if self._failure_tolerance is not None:
            return int(self._failure_tolerance)
        d = 2 * self.ctx.space.n_units
        return min(5, math.ceil(max(4.0, d) / self.batch_size))

    _SCALARS = ("warm", "length", "n_success", "n_failure", "iteration", "n_asks", "_done", "stop_reason",
                "last_max_ei", "history")  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: told data, pending asks, ranges, trust region, counters, ask count (drives the RNG)."""
        return {
            "told": [{"assignment": a.to_dict(), "score": s, "bytes": b} for a, s, b in self.told],
            "pending": [a.to_dict() for a in self.pending],
            "scale": self.scale.to_dict() if self.scale else None,
            **{k.lstrip("_"): copy.deepcopy(getattr(self, k)) for k in self._SCALARS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.told = [(Assignment.from_dict(t["assignment"]), t["score"], int(t["bytes"])) for t in state["told"]]
        self.pending = [Assignment.from_dict(d) for d in state["pending"]]
        self.scale = UtilityScale(**state["scale"]) if state["scale"] else None
        for k in self._SCALARS:
            setattr(self, k, copy.deepcopy(state[k.lstrip("_")]))

    # ------------------------------------------------------------- utilities
    def utility(self, score: float, nbytes: int) -> float:
        """Eq. 8 utility of a score and a footprint (bytes); needs the warm-start tell."""
        if self.scale is None:
            raise RuntimeError("utility ranges are set by the first tell with an ok result")
        return self.scale(score, nbytes)

    def incumbent(self) -> tuple[Assignment, float] | None:
        """Best (assignment, utility) among ok, feasible told points, or None."""
        best = None
        for a, s, b in self.told:
            if s is not None and b <= self.ctx.budget_bytes and self.scale is not None:
                u = self.scale(s, b)
                if best is None or u > best[1]:
                    best = (a, u)
        return best

    def _stop(self, reason: str) -> None:
        self._done, self.stop_reason = True, reason
        log.info("turbo: stopping after %d iterations: %s", self.iteration, reason)

    # ------------------------------------------------------------------- tell
    def tell(self, assignments: Sequence[Assignment], results: Sequence[EvalResult]) -> None:
        prev = self.incumbent()
        batch = [(a, float(r.score) if r.ok else None, self.ctx.bytes_of(a)) for a, r in zip(assignments, results)]
        self.told.extend(batch)
        self.pending = [p for p in self.pending if p not in set(assignments)]
        if self.scale is None:
            ok = [(s, b) for _, s, b in batch if s is not None]
            if ok:
                self.scale = UtilityScale.from_front([s for s, _ in ok], [b for _, b in ok], self.alpha)
                log.info("turbo: utility ranges from the warm-start Pareto front: %s", self.scale)
        if not self.warm:  # the warm start initialises the model, it is not a BO step
            self.warm = True
            return
        self.iteration += 1
        ok = [(s, b) for _, s, b in batch if s is not None and b <= self.ctx.budget_bytes]
        best_new = max((self.scale(s, b) for s, b in ok), default=-math.inf) if self.scale else -math.inf
        success = best_new > -math.inf and (prev is None or best_new > prev[1] + 1e-3 * abs(prev[1]))
        self.n_success, self.n_failure = (self.n_success + 1, 0) if success else (0, self.n_failure + 1)
        if self.n_success >= self.success_tolerance:
            self.length, self.n_success = min(2.0 * self.length, self.length_max), 0
        elif self.n_failure >= self.failure_tolerance:
            self.length, self.n_failure = self.length / 2.0, 0
        if self.length < self.length_min:
            self._stop(f"trust region collapsed (L={self.length:.3g} < {self.length_min:.3g})")
        elif self.max_iterations is not None and self.iteration >= self.max_iterations:
            self._stop(f"max_iterations={self.max_iterations} reached")

    # -------------------------------------------------------------------- ask
    def features(self, assignments: Sequence[Assignment]) -> np.ndarray:
        """GP inputs (Eq. 9): ordinal positions, then ``mean(I_q·s_q)``, ``mean(I_r·s_r)`` if importances exist."""
        sp, n = self.ctx.space, self.ctx.space.n_units
        X = np.array([sp.ordinal(a) for a in assignments], dtype=float).reshape(len(assignments), 2 * n)
        cols = [X]
        for imp, part in ((self.ctx.importance_q, X[:, :n]), (self.ctx.importance_r, X[:, n:])):
            if imp is not None:
                cols.append((part @ np.asarray(imp, float) / n)[:, None])
        return np.concatenate(cols, axis=1)

    def _prepare(self, a: Assignment) -> Assignment | None:
        if self.ctx.repair is not None:
            a = self.ctx.repair(a)
        return a if self.ctx.feasible(a) else None

    def _random(self, n: int, rng: np.random.Generator) -> list[Assignment]:
        """Initial design when nothing has been told yet: repaired uniform samples."""
        seen, out = {a for a, _, _ in self.told} | set(self.pending), []
        for _ in range(50 * n):
            a = self._prepare(self.ctx.space.sample(rng))
            if a is not None and a not in seen:
                seen.add(a)
                out.append(a)
                if len(out) == n:
                    break
        return out

    def ask(self, n: int) -> list[Assignment]:
        if self._done or n < 1:
            return []
        rng = np.random.default_rng([self.ctx.seed, self.n_asks])
        self.n_asks += 1
        data = [(a, s, b) for a, s, b in self.told if s is not None]
        if not data or self.scale is None:
            out = self._random(n, rng)
            self.pending.extend(out)
            return out
        t0 = time.perf_counter()
        X = self.features([a for a, _, _ in data])
        Y = np.array([self.scale(s, b) for _, s, b in data])
        inc = self.incumbent()
        centre, best_f = inc if inc is not None else (data[int(np.argmax(Y))][0], float(Y.max()))
        model, ls = fit_gp(X, Y, seed=self.ctx.seed + self.n_asks)
        cands, (lo, hi) = self._candidates(centre, ls[: 2 * self.ctx.space.n_units], rng)
        self.last_box = (lo.tolist(), hi.tolist())
        entry = {"iteration": self.iteration, "L": self.length, "incumbent_utility": best_f,
                 "n_candidates": len(cands)}  # fmt: skip
        if not cands:
            self.history.append({**entry, "max_ei": None, "seconds": time.perf_counter() - t0})
            self._stop("no new candidates in the trust region")
            return []
        idx, max_ei = select(model, self.features(cands), best_f, n, seed=self.ctx.seed + self.n_asks)
        self.last_max_ei = max_ei
        self.history.append({**entry, "max_ei": max_ei, "seconds": time.perf_counter() - t0})
        log.info("turbo: iter %d L=%.3g best=%.4f max EI=%.3g (%d candidates)",
                 self.iteration, self.length, best_f, max_ei, len(cands))  # fmt: skip
        if max_ei < self.ei_epsilon:
            self._stop(f"EI saturation (max EI {max_ei:.3g} < {self.ei_epsilon:g})")
            return []
        out = [cands[i] for i in idx]
        self.pending.extend(out)
        return out

    def box(self, centre: Assignment, lengthscales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Trust region in ladder indices: inclusive ``(lo, hi)`` int arrays, length 2L.

        Per-dimension half-width ``w_j·L/2`` in ordinal units with ``w = ls / geomean(ls)``.
        """
        sp = self.ctx.space
        ls = np.asarray(lengthscales, float)
        w = ls / np.exp(np.mean(np.log(ls)))
        c, up = sp.ordinal(centre), np.maximum(sp.upper, 1)
        lb, ub = np.clip(c - w * self.length / 2, 0, 1), np.clip(c + w * self.length / 2, 0, 1)
        lo = np.ceil(lb * up - 1e-9).astype(np.int64)
        return lo, np.minimum(np.floor(ub * up + 1e-9).astype(np.int64), sp.upper)

    def _candidates(self, centre: Assignment, ls: np.ndarray, rng: np.random.Generator) -> tuple[list, tuple]:
        """Repaired, feasible, unseen ladder points inside the box around ``centre``.

        TuRBO's perturbation trick: each of ``n_candidates`` copies of the centre moves in each
        dimension with probability ``min(1, 20/d)`` to a uniformly drawn ladder index inside the
        box; all 1-step neighbours of the centre inside the box are added. Points whose repair
        leaves the box are dropped, so every candidate stays local.
        """
        sp = self.ctx.space
        lo, hi = self.box(centre, ls)
        d, c = len(lo), sp.encode(centre)
        raw = rng.integers(lo, hi + 1, size=(self.n_candidates, d))
        mask = rng.random((self.n_candidates, d)) < min(1.0, 20.0 / d)
        none = np.flatnonzero(~mask.any(axis=1))  # every candidate moves in at least one dimension
        mask[none, rng.integers(0, d, len(none))] = True
        pts = [sp.decode(x) for x in np.unique(np.where(mask, raw, c), axis=0)]
        pts += [a for a in sp.neighbours(centre) if np.all((lo <= sp.encode(a)) & (sp.encode(a) <= hi))]
        seen, out = {a for a, _, _ in self.told} | set(self.pending), []
        for a in dict.fromkeys(pts):
            b = self._prepare(a)
            if b is None or b in seen:
                continue
            x = sp.encode(b)
            if np.all((lo <= x) & (x <= hi)):
                seen.add(b)
                out.append(b)
        return out, (lo, hi)
