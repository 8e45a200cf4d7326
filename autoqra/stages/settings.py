r"""How a search runs (:class:`SearchSettings`, resolved from an :class:`~autoqra.config.OptimizeConfig`) and what it
leaves behind (:class:`RunSummary`, the typed record :func:`autoqra.optimize` turns into ``Result.info``)."""

from __future__ import annotations

import math
from typing import Any

import attrs

from autoqra.config import OptimizeConfig
from autoqra.evaluators.base import Fidelity
from autoqra.stages.final_rung import FinalRungSettings
from autoqra.trial import Trial


@attrs.frozen
class SearchSettings:
    """How the optimizer searches (fidelities, sizes, limits), resolved from an :class:`OptimizeConfig`.

    Attributes:
        low / mid / high: the fidelities (optimizer steps); ``mid`` None = no middle rung.
        phase1 / phase2: searcher names or instances (``phase2`` None skips Phase II).
        pop_size, promote_k, max_generations: Phase I sizes; phase2_iterations: Phase II evaluations.
        alpha: Phase II utility weight (paper variants); choose_alpha: weight of the final choice (1.0 = best
            score under the budget).
        use_surrogate: promote by prediction (False promotes every offspring); warm_start: the seed rule.
        max_trials / time_limit: limits (evaluations, seconds); phase2_batch: points per Phase II ask.
        knapsack_k: with a cost model, Phase I's k best distinct knapsack assignments.
    """

    low: Fidelity
    high: Fidelity
    mid: Fidelity | None = None
    phase1: Any = "nsga2"
    phase2: Any = "local"
    pop_size: int = 10
    promote_k: int = 2
    max_generations: int = 2
    phase2_iterations: int = 4
    alpha: float = 0.6
    choose_alpha: float = 1.0
    use_surrogate: bool = True
    warm_start: str = "anchored"
    max_trials: int | None = None
    time_limit: float | None = None
    phase2_batch: int | None = None
    knapsack_k: int = 3
    final: FinalRungSettings | None = None

    @classmethod
    def from_config(cls, cfg: OptimizeConfig, *, phase1: Any = None, phase2: Any = None) -> SearchSettings:
        """Settings of ``cfg`` (``phase1`` / ``phase2``: searcher instances that replace the config's names)."""
        mid = cfg.resolved("mid_steps")
        return cls(
            low=Fidelity(cfg.resolved("low_steps"), "low"), high=Fidelity(cfg.resolved("high_steps"), "high"),
            mid=Fidelity(mid, "mid") if mid is not None else None,
            phase1=phase1 if phase1 is not None else cfg.phase1, phase2=phase2 if phase2 is not None else cfg.phase2,
            pop_size=cfg.resolved("pop_size"), promote_k=cfg.resolved("promote_k"),
            max_generations=cfg.resolved("max_generations"), phase2_iterations=cfg.resolved("phase2_iterations"),
            alpha=cfg.alpha, choose_alpha=cfg.choose_alpha, use_surrogate=cfg.use_surrogate,
            warm_start=cfg.warm_start, max_trials=cfg.max_trials, time_limit=cfg.time_limit,
            phase2_batch=cfg.phase2_batch, knapsack_k=cfg.knapsack_k,
            final=FinalRungSettings(cfg.resolved("final_steps"), [cfg.seed + i for i in range(cfg.resolved("final_seeds"))],
                                    cfg.resolved("final_candidates"), cfg.final_uniform_margin) if cfg.final_rung else None)


@attrs.frozen
class RunSummary:
    """One search run's outcome.

    Attributes:
        baselines: ``{name: trial key}`` of the finished baselines; run_keys: this run's trial keys in order.
        best: the answer (the final rung's choice, else the best feasible top-rung trial); best_utility_key: the
            key of the best α-utility point (``alpha``), for the paper's variants.
        front: the feasible top-rung Pareto front; seed_key: the warm-start seed's top-rung trial key.
        stopped: why a limit stopped the run (None: it ran to the end); stop_reasons: per stage.
        hv_history: Phase I's per-generation hypervolume, best score, evaluations and seconds.
        wall_seconds / eval_seconds / trial_seconds: the run's wall time, time blocked on the executor, the
            trials' own seconds; n_evals / n_run: evaluations counted (run or read back) / run now.
        executor / phase2_batch: where trials ran; Phase II's points per ask.
        guidance: what the guidance reports (the cost model's table and Spearmans, or the surrogate's fit).
        phase2_history: the Phase II searcher's history.
        final_rung / final_rung_seconds: the final rung's entries (dicts) and its wall time.
    """

    baselines: dict[str, str]
    run_keys: list[str]
    best: Trial | None
    best_utility_key: str | None
    front: list[Trial]
    seed_key: str | None
    stopped: str | None
    stop_reasons: dict[str, str]
    hv_history: list[dict[str, float]]
    wall_seconds: float
    eval_seconds: float
    trial_seconds: float
    n_evals: int
    n_run: int
    executor: dict[str, Any]
    phase2_batch: int
    guidance: dict[str, Any]
    phase2_history: list
    final_rung: list[dict]
    final_rung_seconds: float

    @property
    def overhead_fraction(self) -> float:
        """Share of the wall time spent outside the executor (nan when nothing ran)."""
        w = self.wall_seconds
        return max(0.0, w - self.eval_seconds) / w if w > 0 and self.n_run else math.nan

    def info(self) -> dict[str, Any]:
        """The JSON-able part, as ``Result.info`` keys (``cost_model`` / ``surrogate``: the guidance's report)."""
        skip = {"baselines", "run_keys", "best", "front", "guidance"}
        out = {f.name: getattr(self, f.name) for f in attrs.fields(RunSummary) if f.name not in skip}
        out["overhead_fraction"] = self.overhead_fraction
        out["cost_model"] = {k: v for k, v in self.guidance.items() if k != "surrogate"}
        out["surrogate"] = self.guidance.get("surrogate", {})
        return out
