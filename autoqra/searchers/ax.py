r"""A searcher on Ax's ``ax.api.Client`` (Ax ≥ 1.0; not the deprecated ``AxClient``).

Every unit contributes two ordered integer choice parameters, ``b{i}`` (bits) and ``r{i}``
(LoRA rank), with the space's ladders as values (a one-value ladder is held fixed and not shown
to Ax). The single objective, maximised, is the raw ``score`` or the Eq. 8 ``utility`` whose
min–max ranges come from the Pareto front of the first ``tell`` (as in :mod:`.turbo`).

Budget repair: Ax knows nothing of the byte budget. When ``ctx.repair`` changes a proposed
point, the proposed trial is marked *abandoned* (it is never evaluated, so Ax must not learn a
value for it) and the repaired point is attached as a new trial with ``attach_trial``; that trial
gets the result. Completing the proposed trial with the repaired point's score would teach the
model a wrong value at the proposed point. Each substitution is recorded in ``self.repairs``.
Assignments told without having been asked (the warm start) are attached as trials too.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from autoqra._optional import require
from autoqra.searchers.base import Searcher, register_searcher
from autoqra.searchers.turbo import UtilityScale
from autoqra.space import Assignment

if TYPE_CHECKING:
    from autoqra.evaluators.base import EvalResult

log = logging.getLogger(__name__)
_FEATURE = "searcher 'ax'"
OBJECTIVES = ("utility", "score")
METHODS = ("fast", "quality", "random_search")


@register_searcher("ax")
class AxSearcher(Searcher):
    """Ax (BoTorch modular BO: Center + Sobol initialisation, then MBM) behind ask/tell.

    Args:
        objective: ``"utility"`` (Eq. 8, α-weighted normalised score minus normalised bytes)
            or ``"score"`` (the evaluator's score); maximised.
        alpha: utility weight of the normalised score.
        method: Ax generation-strategy method: ``"fast"``, ``"quality"`` or ``"random_search"``.
        initialization_budget: Sobol/centre trials before BO (None: Ax decides; told warm-start
            trials count toward it).
        max_trials: stop after this many asked trials (None = no limit).
        max_rounds: ``get_next_trials`` rounds per ask while proposals are dropped (a proposal
            whose repaired point was already evaluated or is pending, or that stays infeasible).
        quiet: lower Ax's stderr logging to WARNING.
    """

    def __init__(
        self,
        objective: str = "utility",
        alpha: float = 0.6,
        method: str = "fast",
        initialization_budget: int | None = None,
        max_trials: int | None = None,
        max_rounds: int = 3,
        quiet: bool = True,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not allowed; choose one of {list(OBJECTIVES)}")
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not allowed; choose one of {list(METHODS)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} is not allowed; it must lie in [0, 1]")
        if max_trials is not None and max_trials < 1:
            raise ValueError(f"max_trials={max_trials!r} is not allowed; use None or an integer >= 1")
        self.objective, self.alpha, self.method = objective, alpha, method
        self.initialization_budget, self.max_trials, self.quiet = initialization_budget, max_trials, quiet
        self.max_rounds = max(1, int(max_rounds))

    def bind(self, ctx: Any) -> None:
        super().bind(ctx)
        self.told: list[tuple[Assignment, float | None, str]] = []  # (assignment, score or None, status)
        self.scale: UtilityScale | None = None
        self.repairs: list[dict[str, Any]] = []
        self.n_asked = 0
        self._pending: dict[Assignment, int] = {}
        self._client: Any = None

    @property
    def done(self) -> bool:
        return self.max_trials is not None and self.n_asked >= self.max_trials

    # ------------------------------------------------------------- Ax plumbing
    def _names(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """``(parameter name, position in encode(), ladder)`` for every ladder with >= 2 values."""
        sp, n = self.ctx.space, self.ctx.space.n_units
        out = ([(f"b{i}", i, sp.unit_bits(i)) for i in range(n)]  # each unit's own options (embedding / head)
               + [(f"r{i}", n + i, sp.unit_ranks(i)) for i in range(n)])
        return [t for t in out if len(t[2]) > 1]

    @property
    def client(self) -> Any:
        """The ``ax.api.Client``, built on first use (seeded with ``ctx.seed``)."""
        if self._client is None:
            Client = require("ax.api.client", _FEATURE).Client
            ChoiceParameterConfig = require("ax.api.configs", _FEATURE).ChoiceParameterConfig

            if self.quiet:
                require("ax.utils.common.logger", _FEATURE).set_ax_logger_levels(logging.WARNING)
            params = [
                ChoiceParameterConfig(name=k, values=list(ladder), parameter_type="int", is_ordered=True)
                for k, _, ladder in self._names()
            ]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = Client(random_seed=self.ctx.seed)
                c.configure_experiment(parameters=params, name="autoqra")
                c.configure_optimization(objective=self.objective)
                c.configure_generation_strategy(
                    method=self.method,
                    initialization_budget=self.initialization_budget,
                    initialization_random_seed=self.ctx.seed,
                )
            self._client = c
        return self._client

    def _to_assignment(self, params: Mapping[str, Any]) -> Assignment:
        x = self.ctx.space.encode(self.ctx.space.minimum())
        for k, j, ladder in self._names():
            x[j] = ladder.index(int(params[k]))
        return self.ctx.space.decode(x)

    def _to_params(self, a: Assignment) -> dict[str, int]:
        x = self.ctx.space.encode(a)
        return {k: int(ladder[x[j]]) for k, j, ladder in self._names()}

    def _call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small GPs: more intra-op threads only spin on a busy CPU
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return getattr(self.client, fn)(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    # --------------------------------------------------------------- ask/tell
    def ask(self, n: int) -> list[Assignment]:
        if self.done or n < 1:
            return []
        if self.max_trials is not None:
            n = min(n, self.max_trials - self.n_asked)
        out: list[Assignment] = []
        seen = {t[0] for t in self.told} | set(self._pending)
        for _ in range(self.max_rounds):  # proposals dropped after repair are replaced, a few rounds at most
            dropped = 0
            for idx, params in self._call("get_next_trials", max_trials=n - len(out)).items():
                a = self._to_assignment(params)
                b = self.ctx.repair(a) if self.ctx.repair is not None else a
                skip = b in seen or not self.ctx.feasible(b)
                if b != a or skip:
                    self._call("mark_trial_abandoned", idx)
                    if skip:
                        log.debug("ax: dropped trial %d (already evaluated, pending or infeasible)", idx)
                        dropped += 1
                        continue
                    new = self._call("attach_trial", parameters=self._to_params(b))
                    self.repairs.append({"trial": idx, "attached": new, "proposed": a.to_dict(), "repaired": b.to_dict()})
                    idx = new
                seen.add(b)
                self._pending[b] = idx
                out.append(b)
            if not dropped or len(out) >= n:
                break
        self.n_asked += len(out)
        return out

    def _value(self, score: float, a: Assignment) -> float:
        return score if self.objective == "score" else self.scale(score, self.ctx.bytes_of(a))  # type: ignore[misc]

    def tell(self, assignments: Sequence[Assignment], results: Sequence[EvalResult]) -> None:
        batch = [(a, float(r.score) if r.ok else None, r.status, r.error) for a, r in zip(assignments, results)]
        if self.scale is None and any(s is not None for _, s, _, _ in batch):
            ok = [(s, self.ctx.bytes_of(a)) for a, s, _, _ in batch if s is not None]
            self.scale = UtilityScale.from_front([s for s, _ in ok], [b for _, b in ok], self.alpha)
        for a, s, status, err in batch:
            self._complete(a, s, status, err)

    def _complete(self, a: Assignment, score: float | None, status: str, error: str = "") -> None:
        idx = self._pending.pop(a, None)
        if idx is None:  # not asked (warm start, resume): attach it as a trial of its own
            idx = self._call("attach_trial", parameters=self._to_params(a))
        if score is None:
            self._call("mark_trial_failed", idx, failed_reason=error or status)
        else:
            self._call("complete_trial", trial_index=idx, raw_data={self.objective: self._value(score, a)})
        self.told.append((a, score, status))

    @property
    def best(self) -> tuple[Assignment, float] | None:
        """Best told (assignment, objective value) among ok results, or None."""
        vals = [(a, self._value(s, a)) for a, s, _ in self.told if s is not None]
        return max(vals, key=lambda t: t[1]) if vals else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "told": [{"assignment": a.to_dict(), "score": s, "status": st} for a, s, st in self.told],
            "scale": self.scale.to_dict() if self.scale else None,
            "repairs": self.repairs,
            "n_asked": self.n_asked,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild a fresh Ax client and re-attach every told trial (pending asks are dropped)."""
        self.bind(self.ctx)
        self.scale = UtilityScale(**state["scale"]) if state["scale"] else None
        self.repairs, self.n_asked = list(state["repairs"]), int(state["n_asked"])
        for t in state["told"]:
            self._complete(Assignment.from_dict(t["assignment"]), t["score"], t["status"])
