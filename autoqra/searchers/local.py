r"""Phase II (default): trust-region Bayesian optimisation *around the incumbent*, over byte-neutral edits.

The objective is the score itself — the memory side is a hard constraint every candidate already
meets (repair), so no utility normalisation is needed (the Eq. 8 utility of :mod:`~autoqra.searchers.turbo`
is min–max normalised over every feasible trial, baselines included, which made a megabyte worth a
third of a nat and pulled TuRBO towards the uniform 3-bit baseline).

* **Centre**: the best feasible told point (the incumbent), re-read after every tell.
* **Candidates**: compositions of ``1..m`` byte-neutral moves of the incumbent
  (:func:`~autoqra.guidance.moves.swap_down` / :func:`~autoqra.guidance.moves.swap_up`, drawn by the cost table), with
  at most ``2·m`` variables changed. ``m`` is the trust region: it grows after ``success_tolerance``
  improving batches and shrinks after ``failure_tolerance`` failing ones; below 1 the search stops.
* **Model**: the cost table's additive prediction is the prior mean; a GP (Matérn-5/2 on the ordinal
  encoding, BoTorch) models the residual of real scores around it once ``min_gp`` scores are told.
* **Acquisition**: analytic Expected Improvement over the best told score, one candidate at a time
  (a batch takes the top EI in turn); the search stops when the largest EI falls below ``ei_epsilon``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import norm

from autoqra.guidance.moves import swap_down, swap_up
from autoqra.searchers._gp import fit_gp
from autoqra.searchers.base import Searcher, register_searcher
from autoqra.space import Assignment

if TYPE_CHECKING:
    from autoqra.evaluators.base import EvalResult

log = logging.getLogger(__name__)


def expected_improvement(mean: np.ndarray, std: np.ndarray, best: float) -> np.ndarray:
    """Analytic EI of maximisation: ``(μ−best)Φ(z) + σφ(z)``, ``z = (μ−best)/σ``."""
    std = np.maximum(std, 1e-12)
    z = (mean - best) / std
    return (mean - best) * norm.cdf(z) + std * norm.pdf(z)


@register_searcher("local")
class LocalSearcher(Searcher):
    """Incumbent-centred trust-region BO over byte-neutral edits (see the module docstring).

    Args:
        batch_size: expected ``n`` per ask.
        moves_init / moves_max: initial and largest number of moves per candidate (trust region).
        success_tolerance / failure_tolerance: consecutive improving / failing batches before the
            region grows / shrinks by one move.
        n_candidates: edits drawn per ask (duplicates and told points dropped).
        min_gp: told scores before the GP residual is used (before: the cost table alone).
        ei_epsilon: stop when the largest EI (nats) falls below this.
        improve_eps: a batch succeeds when it beats the incumbent by more than this (nats).
        max_iterations: stop after this many batches (warm start excluded); None = no limit.
    """

    def __init__(self, batch_size: int = 1, moves_init: int = 2, moves_max: int = 6, success_tolerance: int = 2,
                 failure_tolerance: int = 2, n_candidates: int = 256, min_gp: int = 4, ei_epsilon: float = 1e-4,
                 improve_eps: float = 1e-3, max_iterations: int | None = None) -> None:
        ints = dict(batch_size=batch_size, moves_init=moves_init, moves_max=moves_max, n_candidates=n_candidates,
                    success_tolerance=success_tolerance, failure_tolerance=failure_tolerance, min_gp=min_gp)
        for name, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r} is not allowed; it must be an integer >= 1")
        if moves_init > moves_max:
            raise ValueError(f"moves_init={moves_init} must not exceed moves_max={moves_max}")
        self.batch_size, self.moves_init, self.moves_max = int(batch_size), int(moves_init), int(moves_max)
        self.success_tolerance, self.failure_tolerance = int(success_tolerance), int(failure_tolerance)
        self.n_candidates, self.min_gp = int(n_candidates), int(min_gp)
        self.ei_epsilon, self.improve_eps, self.max_iterations = ei_epsilon, improve_eps, max_iterations

    def bind(self, ctx: Any) -> None:
        super().bind(ctx)
        if ctx.cost_table is None or ctx.repair is None:
            raise ValueError("searcher 'local' needs a cost table and a repair (guidance='cost'); "
                             "use phase2='turbo' for the priors-guided search")
        self.told: list[tuple[Assignment, float | None]] = []
        self.pending: list[Assignment] = []
        self.moves, self.n_success, self.n_failure = self.moves_init, 0, 0
        self.iteration, self.n_asks, self._done, self.stop_reason = 0, 0, False, ""
        self.warm = False
        self.history: list[dict[str, Any]] = []

    @property
    def done(self) -> bool:
        return self._done

    def _stop(self, reason: str) -> None:
        self._done, self.stop_reason = True, reason
        log.info("local: stopping after %d iterations: %s", self.iteration, reason)

    def incumbent(self) -> tuple[Assignment, float] | None:
        """Best (assignment, score) among ok, feasible told points."""
        ok = [(a, s) for a, s in self.told if s is not None and self.ctx.feasible(a)]
        return max(ok, key=lambda t: t[1]) if ok else None

    # ------------------------------------------------------------------ tell
    def tell(self, assignments: Sequence[Assignment], results: Sequence[EvalResult]) -> None:
        prev = self.incumbent()
        batch = [(a, float(r.score) if r.ok else None) for a, r in zip(assignments, results)]
        self.told.extend(batch)
        done = set(assignments)
        self.pending = [p for p in self.pending if p not in done]
        if not self.warm:  # the warm start (Phase I's high-fidelity trials) is not a BO step
            self.warm = True
            return
        self.iteration += 1
        best_new = max((s for a, s in batch if s is not None and self.ctx.feasible(a)), default=-math.inf)
        success = prev is None or best_new > prev[1] + self.improve_eps
        self.n_success, self.n_failure = (self.n_success + 1, 0) if success else (0, self.n_failure + 1)
        if self.n_success >= self.success_tolerance:
            self.moves, self.n_success = min(self.moves + 1, self.moves_max), 0
        elif self.n_failure >= self.failure_tolerance:
            self.moves, self.n_failure = self.moves - 1, 0
        if self.moves < 1:
            self._stop("trust region collapsed (no single move improved)")
        elif self.max_iterations is not None and self.iteration >= self.max_iterations:
            self._stop(f"max_iterations={self.max_iterations} reached")

    # ------------------------------------------------------------------- ask
    def _edits(self, centre: Assignment, rng: np.random.Generator) -> list[Assignment]:
        sp, ctx = self.ctx.space, self.ctx
        upper = np.asarray(sp.upper, dtype=np.int64)
        rep, bytes_of = ctx.repair_encoded, ctx.bytes_encoded
        c = sp.encode(centre)
        seen = {a for a, _ in self.told} | set(self.pending)
        out: dict[Assignment, None] = {}
        for _ in range(self.n_candidates):
            y = c.copy()
            for _ in range(int(rng.integers(1, self.moves + 1))):
                if rng.random() < 0.5:
                    y = swap_down(y, upper, ctx.cost_table, bytes_of, ctx.budget_bytes, rng)
                else:
                    y = swap_up(y, upper, ctx.cost_table, bytes_of, rep, rng)
            if int(np.sum(y != c)) > 2 * self.moves or np.array_equal(y, c):
                continue
            a = sp.decode(y)
            if a not in seen and ctx.feasible(a):
                out[a] = None
        return list(out)

    def ask(self, n: int) -> list[Assignment]:
        if self._done or n < 1:
            return []
        rng = np.random.default_rng([self.ctx.seed, self.n_asks])
        self.n_asks += 1
        inc = self.incumbent()
        if inc is None:
            self._stop("no feasible told point to centre on")
            return []
        t0 = time.perf_counter()
        cands = self._edits(inc[0], rng)
        entry = {"iteration": self.iteration, "moves": self.moves, "incumbent": inc[1], "n_candidates": len(cands)}
        if not cands:
            self.history.append({**entry, "max_ei": None, "seconds": time.perf_counter() - t0})
            self._stop("no new candidates around the incumbent")
            return []
        prior = np.array([self.ctx.predict(a) for a in cands])
        mean, std = prior, np.full(len(cands), 1e-6)
        data = [(a, s) for a, s in self.told if s is not None]
        if len(data) >= self.min_gp:
            X = np.array([self.ctx.space.ordinal(a) for a, _ in data])
            R = np.array([s - self.ctx.predict(a) for a, s in data])
            model, _ = fit_gp(X, R, seed=self.ctx.seed + self.n_asks)
            mean, std = self._posterior(model, np.array([self.ctx.space.ordinal(a) for a in cands]), prior)
        else:  # no residual model yet: the prior alone, anchored at the incumbent's real score
            mean = prior - self.ctx.predict(inc[0]) + inc[1]
        ei = expected_improvement(mean, std, inc[1])
        order = np.argsort(-ei, kind="stable")[:n]
        max_ei = float(ei[order[0]])
        self.history.append({**entry, "max_ei": max_ei, "seconds": time.perf_counter() - t0})
        if max_ei < self.ei_epsilon and len(data) >= self.min_gp:
            self._stop(f"EI saturation (max EI {max_ei:.3g} < {self.ei_epsilon:g})")
            return []
        out = [cands[i] for i in order]
        self.pending.extend(out)
        return out

    @staticmethod
    def _posterior(model: Any, X: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            post = model.posterior(torch.as_tensor(X, dtype=torch.float64))
            mu = post.mean.squeeze(-1).numpy()
            sd = post.variance.clamp_min(1e-18).sqrt().squeeze(-1).numpy()
        return prior + mu, sd

    def state_dict(self) -> dict[str, Any]:
        return {"told": [{"assignment": a.to_dict(), "score": s} for a, s in self.told],
                "pending": [a.to_dict() for a in self.pending], "moves": self.moves, "n_success": self.n_success,
                "n_failure": self.n_failure, "iteration": self.iteration, "n_asks": self.n_asks, "done": self._done,
                "stop_reason": self.stop_reason, "warm": self.warm, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.told = [(Assignment.from_dict(t["assignment"]), t["score"]) for t in state["told"]]
        self.pending = [Assignment.from_dict(d) for d in state["pending"]]
        for k in ("moves", "n_success", "n_failure", "iteration", "n_asks", "stop_reason", "warm", "history"):
            setattr(self, k, state[k])
        self._done = state["done"]
