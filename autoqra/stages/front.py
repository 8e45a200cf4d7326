r"""The run's top-rung trials, their feasible Pareto front, its hypervolume and the choice of the answer."""

from __future__ import annotations

import math

import numpy as np

from autoqra.pareto import front_hypervolume, pareto_mask
from autoqra.problem import Problem
from autoqra.stages.runner import TrialRunner
from autoqra.trial import Trial


class Front:
    """Reads the runner's trials; knows the problem's footprint and budget.

    Args:
        runner: the run's trial runner; problem: its problem (footprint, budget); high_steps: the top rung.
    """

    def __init__(self, runner: TrialRunner, problem: Problem, high_steps: int) -> None:
        self.runner, self.problem, self.high_steps = runner, problem, high_steps
        self.hv_ref: float | None = None  # fixed once (the worst top-rung score so far), so HV is monotone

    def high_trials(self) -> list[Trial]:
        """This run's ok top-rung trials (baselines included, final-rung trainings not), feasible or not."""
        return [t for t in self.runner.trials() if t.status == "ok" and t.fidelity.steps == self.high_steps
                and t.phase != "final"]

    def feasible(self) -> list[Trial]:
        """The ok top-rung trials within the budget."""
        return [t for t in self.high_trials() if self.problem.bytes_of(t.assignment) <= self.problem.budget_bytes]

    def front(self) -> list[Trial]:
        """Pareto front (score ↑, bytes ↓) of feasible top-rung trials, smallest first."""
        trials = self.feasible()
        if not trials:
            return []
        b = [self.problem.bytes_of(t.assignment) for t in trials]
        mask = pareto_mask([t.score for t in trials], b)
        return sorted((t for t, m in zip(trials, mask) if m), key=lambda t: self.problem.bytes_of(t.assignment))

    def best_score(self) -> float:
        """Best feasible top-rung score so far (-inf before any)."""
        return max((t.score for t in self.front()), default=-math.inf)

    def hypervolume(self) -> float:
        trials = self.front()
        if not trials:
            return 0.0
        if self.hv_ref is None:
            self.hv_ref = min(t.score for t in self.high_trials()) - 1e-3
        return front_hypervolume([t.score for t in trials], [self.problem.bytes_of(t.assignment) for t in trials],
                                 self.problem.budget_bytes, self.hv_ref)

    def choose(self, alpha: float) -> Trial | None:
        """Best utility α·score − (1−α)·memory (min-max over the feasible front) among feasible trials
        (α = 1: the best score under the budget)."""
        front = self.front()
        if not front:
            return None
        s = np.array([t.score for t in front])
        m = np.array([self.problem.bytes_of(t.assignment) for t in front], dtype=float)
        sn = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else np.ones_like(s)
        mn = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m)
        return front[int(np.argmax(alpha * sn - (1 - alpha) * mn))]
