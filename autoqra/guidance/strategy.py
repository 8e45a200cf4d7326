r"""Guidance as a strategy: what a search knows about the units before and between its trials.

Two algorithms, one class each; the optimizer and Phase I only call this interface:

* :class:`CostGuidance` (``guidance="cost"``, the default): the calibrated cost model in nats per byte. It puts
  its table in the problem (repair, knapsack seeds, swap mutation, Phase II's prior), refits its quantization
  scale on the baselines' real scores (:meth:`calibrate` returns a new, frozen problem, with the hedged
  tables as extra knapsack seeds), promotes screened offspring by calibrated screen score + predicted rank
  gain (a 0-step screen cannot see rank), and selects by score in Phase I.
* :class:`PriorGuidance` (``guidance="priors"``, the landed search): min–max importance priors, the paper's
  Pareto selection and importance mutation, promotion by the MLP surrogate (fitted on low→high pairs once it
  has enough). Phase I stops on the searcher's ``done`` alone (NSGA-II's hypervolume stagnation).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from autoqra.evaluators.base import EvalResult
from autoqra.guidance.costmodel import CostModel, calibrate_quant_scale
from autoqra.guidance.importance import spearman
from autoqra.problem import Problem
from autoqra.quant_backends import UNQUANTIZED_BITS
from autoqra.searchers.nsga2_ops import importance_operator, swap_operator
from autoqra.searchers.surrogate import PairRecord, Surrogate
from autoqra.space import Assignment
from autoqra.trial import Trial


class Guidance(abc.ABC):
    """What guides a search (see the module docstring)."""

    #: Phase I searcher settings this guidance asks for (selection objectives, mutation, knapsack seeds)
    phase1_options: dict[str, Any]

    def prepare(self, problem: Problem) -> Problem:
        """The problem the search starts from (default: as built)."""
        return problem

    def calibrate(self, problem: Problem, trials: Sequence[Trial]) -> Problem:
        """The problem after the baselines' real scores are known (default: unchanged)."""
        return problem

    @abc.abstractmethod
    def rank_screens(self, cands: Sequence[Assignment], lows: Sequence[EvalResult], recs: Sequence[PairRecord]) -> list[int]:
        """Indices of the ok screened candidates, best predicted top-rung score first."""

    def learn(self, pairs: Sequence[PairRecord]) -> None:  # noqa: B027 - optional
        """Every (screen, top rung) pair so far, after each generation."""

    def report(self, trials: Sequence[Trial], low_steps: int, high_steps: int, n_units: int) -> dict[str, Any]:
        """What the run reports about the guidance (the run's trials given)."""
        return {}


@attrs.define
class CostGuidance(Guidance):
    """The calibrated cost model (:mod:`autoqra.guidance.costmodel`).

    Args:
        cost_model: the measured model; replaced by its recalibrated copy in :meth:`calibrate`.
        knapsack_k: Phase I's k best distinct knapsack assignments of the table.
        quant_hedge: knapsack seeds under these multiples of the calibrated quantization scale.
    """

    cost_model: CostModel
    knapsack_k: int = 3
    quant_hedge: tuple[float, ...] = (0.5, 2.0)
    calibration: dict[str, Any] = attrs.Factory(dict)

    @property
    def phase1_options(self) -> dict[str, Any]:  # type: ignore[override]
        return {"objectives": "score", "mutation": swap_operator, "knapsack_k": self.knapsack_k}

    def prepare(self, problem: Problem) -> Problem:
        return problem.with_cost_table(self.cost_model.table(problem.space))

    def calibrate(self, problem: Problem, trials: Sequence[Trial]) -> Problem:
        """Fit the quantization scale on the baselines' real top-rung scores (how much of a 0-step KL a trained
        candidate still pays); the table and the hedged seed tables go into a new problem."""
        cm = self.cost_model
        c = calibrate_quant_scale(cm, [t.assignment for t in trials], [t.score for t in trials])
        if c is not None:
            self.cost_model = cm = attrs.evolve(cm, quant_scale=c)
            self.calibration = {"quant_scale": c, "trials": len(trials)}
        return problem.with_cost_table(cm.table(problem.space),
                                       [cm.table(problem.space, m * cm.quant_scale) for m in self.quant_hedge])

    def rank_screens(self, cands, lows, recs) -> list[int]:
        if not any(r.ok for r in lows):
            return []
        c = self.cost_model.quant_scale  # the screen pays the full 0-step damage; training recovers 1 - c of it
        pred = np.array([c * r.score + self.cost_model.gain(a) if r.ok else -np.inf for a, r in zip(cands, lows)])
        return [int(i) for i in np.argsort(-pred, kind="stable") if lows[i].ok]

    def report(self, trials, low_steps, high_steps, n_units) -> dict[str, Any]:
        """The cost model's table and the Spearman of its additive prediction against this run's real scores:
        top-rung trials (feasible or not) and the screens (quantization part)."""
        cm = self.cost_model
        out: dict[str, Any] = {**cm.to_dict()}
        high = [t for t in trials if t.status == "ok" and t.fidelity.steps == high_steps and t.phase != "final"
                and t.assignment.bits != (UNQUANTIZED_BITS,) * n_units and all(b in cm.bits for b in t.assignment.bits)]
        out["spearman_high"] = (spearman(np.array([cm.predict(t.assignment) for t in high]),
                                         np.array([t.score for t in high])) if len(high) >= 3 else math.nan)
        out["n_high"] = len(high)
        lows = [t for t in trials if t.status == "ok" and t.fidelity.steps == low_steps and t.phase == "phase1"]
        if len(lows) >= 3:
            pq = [-cm.quant[np.arange(n_units), [cm.bits.index(b) for b in t.assignment.bits]].sum() for t in lows]
            out["spearman_screen"] = spearman(np.array(pq), np.array([t.score for t in lows]))
        return out


class PriorGuidance(Guidance):
    """Importance priors and the MLP surrogate (the paper's search).

    Args:
        problem: the problem (its space and importance priors feed the surrogate).
        use_surrogate: fit the surrogate and promote by it (False: the ablation, promotion by screen score).

    Phase I stops on the searcher's own ``done`` (NSGA-II's hypervolume stagnation with Pareto objectives).
    """

    phase1_options = {"objectives": "pareto", "mutation": importance_operator, "knapsack_k": 0}

    def __init__(self, problem: Problem, use_surrogate: bool = True) -> None:
        self.surrogate = Surrogate(problem.space, problem.importance_q, problem.importance_r, seed=problem.seed)
        self.use_surrogate = use_surrogate

    def rank_screens(self, cands, lows, recs) -> list[int]:
        if not any(r.ok for r in lows):
            return []
        return [int(i) for i in self.surrogate.rank(list(recs)) if lows[i].ok]

    def learn(self, pairs) -> None:
        if self.use_surrogate and len(pairs) >= self.surrogate.min_pairs:
            self.surrogate.fit(list(pairs))

    def report(self, trials, low_steps, high_steps, n_units) -> dict[str, Any]:
        return {"surrogate": self.surrogate.report()}
