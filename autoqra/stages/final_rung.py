r"""The final rung: the search chooses on the training the user will run.

The rungs before it are short (the demo's top rung is 30 optimizer steps); the user trains ``final_steps``
(60 in ``demo``, 300 in ``default``) under the recipe's own schedule, and a short horizon values adapters
and bits differently from a long one (``shared/research/search-facts.md``). So the search ends by training

* its best ``candidates`` *distinct* feasible candidates, by top-rung score, and
* every uniform baseline that fits the budget and scored within ``uniform_margin`` nats of the best fitting
  uniform at the top rung (a uniform far below cannot win; the margin only saves trainings). Where the space
  searches the embedding / head, the rung first runs, at the top rung, the uniforms with those units at their
  highest option below 16 bits (``uniform-4bit-r8-emb8``, :func:`~autoqra.stages.baselines.embedding_variants`):
  at a tight budget the 16-bit-embedding uniform of a bit-width may not fit at all while this one does. They
  join the baselines (the result and the report list them) and enter under the same rule,

with exactly the recipe ``Result.train()`` uses (``TrainSpec``, ``final_steps``, its schedule), on the
training split, scored on the validation split, once per training seed in ``seeds`` — every entrant trained
with one seed shares its LoRA init and data order (paired). The entrant with the best mean validation score
is the answer. Because the best fitting uniforms are entrants, the answer's final-rung score is never below
theirs: the search never hands back a point that this very measurement says is worse than uniform QLoRA.

These trainings are ordinary trials (stored under their own key, resumable, counted by limits and
progress). Their trained weights are kept as final-training checkpoints
(:class:`~autoqra.checkpoints.FinalCheckpoints`), so ``Result.train()`` with the same recipe and seed reads the
chosen point's training back instead of running it again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attrs
import numpy as np

from autoqra.evaluators.base import EvalResult, Evaluator, Fidelity
from autoqra.problem import Problem
from autoqra.space import Assignment
from autoqra.stages.baselines import run_embedding_variants
from autoqra.stages.runner import TrialRunner
from autoqra.trial import Trial

#: ``evaluate(evaluator, assignments, fidelity, phase) -> [(trial key, result)]`` in candidate order (the
#: optimizer's stored, counted path).
EvaluateFn = Callable[[Evaluator, list[Assignment], Fidelity, str], list[tuple[str, EvalResult]]]


@attrs.frozen
class FinalRungSettings:
    """How the final rung runs.

    Attributes:
        steps: optimizer steps of the final recipe (the config's ``final_steps``).
        seeds: training seeds; each entrant is trained once per seed (paired across entrants).
        candidates: distinct search candidates entered, best top-rung score first.
        uniform_margin: uniform baselines that fit the budget enter when their top-rung score is within this
            many nats of the best fitting uniform's.
    """

    steps: int
    seeds: tuple[int, ...] = attrs.field(converter=lambda v: tuple(int(x) for x in v))
    candidates: int = 3
    uniform_margin: float = 0.1

    @property
    def fidelity(self) -> Fidelity:
        return Fidelity(self.steps, "final")


@attrs.frozen
class FinalEntry:
    """One entrant of the final rung.

    Attributes:
        label: ``"candidate 1"``… or the baseline's name (``"uniform-4bit-r8"``).
        trial: the top-rung trial it stands for (the search's, or the baseline's).
        scores: validation score (−loss) after the final recipe, one per training seed (nan: failed).
        keys: trial-store keys of those trainings.
        uniform: whether it is a uniform baseline.
    """

    label: str
    trial: Trial
    scores: tuple[float, ...]
    keys: tuple[str, ...]
    uniform: bool = False

    @property
    def mean(self) -> float:
        """Mean validation score over the seeds (nan when any training failed)."""
        return float(np.mean(self.scores)) if self.scores and all(math.isfinite(s) for s in self.scores) else math.nan

    def to_dict(self) -> dict:
        return {"label": self.label, "assignment": self.trial.assignment.to_dict(), "top_rung_key": self.trial.key,
                "top_rung_score": self.trial.score, "val_scores": list(self.scores), "val_score": self.mean,
                "keys": list(self.keys), "uniform": self.uniform}


class FinalRung:
    """Picks the entrants, trains them with the final recipe through the optimizer, chooses.

    Args:
        settings: steps, seeds, sizes.
        make_evaluator: ``make_evaluator(seed)`` -> an evaluator that trains the final recipe with that seed
            and scores the validation split (built by :func:`autoqra.optimize`).
    """

    def __init__(self, settings: FinalRungSettings, make_evaluator: Callable[[int], Evaluator]) -> None:
        self.settings = settings
        self.make_evaluator = make_evaluator
        self.entries: list[FinalEntry] = []

    def entrants(self, candidates: Sequence[Trial], uniforms: dict[str, Trial]) -> list[tuple[str, Trial, bool]]:
        """``(label, trial, is_uniform)`` of the entrants: the best ``candidates`` distinct search trials (feasible,
        ok, top rung; best score first) and the fitting uniform baselines near the best of them."""
        out: list[tuple[str, Trial, bool]] = []
        seen: set[Assignment] = set()
        ok_uni = {n: t for n, t in uniforms.items() if t.ok}
        if ok_uni:
            best_u = max(t.score for t in ok_uni.values())
            for name, t in sorted(ok_uni.items(), key=lambda kv: -kv[1].score):
                if t.score >= best_u - self.settings.uniform_margin and t.assignment not in seen:
                    seen.add(t.assignment)
                    out.append((name, t, True))
        n = 0
        for t in sorted((t for t in candidates if t.ok), key=lambda t: -t.score):
            if n >= self.settings.candidates:
                break
            if t.assignment in seen:
                continue
            seen.add(t.assignment)
            n += 1
            out.append((f"candidate {n}", t, False))
        return out

    def planned(self, n_entrants: int) -> int:
        """Trainings the rung runs for ``n_entrants`` entrants."""
        return n_entrants * len(self.settings.seeds)

    def run(self, entrants: list[tuple[str, Trial, bool]], evaluate: EvaluateFn) -> list[FinalEntry]:
        """Train every entrant once per seed (one batch per seed); returns the entries in entrant order."""
        fid = self.settings.fidelity
        assignments = [t.assignment for _, t, _ in entrants]
        scores: list[list[float]] = [[] for _ in entrants]
        keys: list[list[str]] = [[] for _ in entrants]
        for seed in self.settings.seeds:
            ev = self.make_evaluator(seed)
            results = evaluate(ev, assignments, fid, "final")
            for i, (key, r) in enumerate(results):
                scores[i].append(r.score if r.ok else math.nan)
                keys[i].append(key)
        self.entries = [FinalEntry(label, t, tuple(s), tuple(k), uni)
                        for (label, t, uni), s, k in zip(entrants, scores, keys)]
        return self.entries

    def choose(self) -> FinalEntry | None:
        """The entry with the best mean validation score (None when every training failed)."""
        ok = [e for e in self.entries if math.isfinite(e.mean)]
        return max(ok, key=lambda e: e.mean) if ok else None

    def stage(self, runner: TrialRunner, feasible: Sequence[Trial], baseline_keys: dict[str, str],
              problem: Problem | None = None, high: Fidelity | None = None) -> tuple[Trial | None, str]:
        """Run the rung over the run's ``feasible`` top-rung trials (``baseline_keys``: which are the uniform
        baselines); returns ``(the top-rung trial of the chosen entry or None, the stop reason)``.

        With ``problem`` and the top rung ``high``, the embedding / head variants of the uniforms are evaluated
        first (stored ``"baseline"`` trials) and added to ``baseline_keys`` and to the entrants' pool."""
        feasible = list(feasible)
        if problem is not None and high is not None:
            base = {k: n for n, k in baseline_keys.items()}
            top = {base[t.key]: t.score for t in feasible if t.key in base and t.ok}
            have = {t.key for t in feasible}
            best = max((t.score for t in feasible if t.ok), default=None)
            added = run_embedding_variants(runner, problem, high, baseline_keys, top, self.settings.uniform_margin,
                                           best)
            new = [t for k in added.values() if k not in have and (t := runner.store.get(k)) is not None and t.ok]
            feasible += [t for t in new if problem.feasible(t.assignment)]
        base = {k: n for n, k in baseline_keys.items()}
        entrants = self.entrants([t for t in feasible if t.key not in base],
                                 {base[t.key]: t for t in feasible if t.key in base})
        if not entrants:
            return None, "skipped: no feasible top-rung trial"
        fid, n = self.settings.fidelity, self.planned(len(entrants))
        runner.progress.plan("final", n, fid)
        runner.progress.phase(f"final rung · {len(entrants)} entrants × {len(self.settings.seeds)} seed(s), "
                              f"{self.settings.steps} steps", n)

        def evaluate(ev: Evaluator, assignments: list[Assignment], f: Fidelity, phase: str):
            res = runner.evaluate_many(assignments, f, phase, evaluator=ev)
            return [(runner.key_of(a, f, ev), r) for a, r in zip(assignments, res)]

        self.run(entrants, evaluate)
        entry = self.choose()
        if entry is None:
            return None, "every final training failed: chose on the top rung"
        return entry.trial, f"chose {entry.label} (validation {entry.mean:+.4f})"
