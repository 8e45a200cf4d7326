r"""The fidelity policy: screen → (mid rung) → top rung, and who is promoted.

Separate from the searcher, the way Optuna separates a pruner from a sampler: the searcher proposes a
generation; the ladder screens all of it at ``low`` (0 steps: apply + held-out loss, or a short training),
promotes the best ``promote_k`` × 2 by the guidance's prediction to ``mid`` (when there is a mid rung), keeps the
better half of those by their mid score, and continues them to ``high`` (rungs continue each other in the
evaluator). Without the surrogate (the ablation) every ok offspring climbs every rung.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from autoqra.evaluators.base import EvalResult, Fidelity
from autoqra.progress import Progress
from autoqra.space import Assignment
from autoqra.stages.runner import TrialRunner


@attrs.frozen
class FidelityLadder:
    """Rungs and promotion sizes.

    Attributes:
        low / high: the screen and the top rung; mid: the optional rung between (None = none).
        promote_k: top-rung places per generation (twice as many reach the mid rung).
        use_surrogate: promote by prediction; False promotes every ok offspring (ablation).
    """

    low: Fidelity
    high: Fidelity
    mid: Fidelity | None = None
    promote_k: int = 2
    use_surrogate: bool = True

    @property
    def rungs(self) -> tuple[Fidelity | None, Fidelity | None, Fidelity]:
        return self.low, self.mid, self.high

    def promote(self, order: Sequence[int]) -> list[int]:
        """The screened candidates (best predicted first) that climb: the first ``promote_k`` (× 2 with a mid
        rung), or all of them without the surrogate."""
        return list(order[: self.promote_k * (2 if self.mid is not None else 1)]) if self.use_surrogate \
            else list(order)

    def generation_plan(self, pop: int, first: bool) -> tuple[int, int, int]:
        """At most (screens, mid, high) evaluations of one generation of ``pop`` (the warm-start seed adds one
        to each rung of the first)."""
        s = int(first)
        if not self.use_surrogate:
            return pop, pop if self.mid else 0, pop
        k = min(pop, self.promote_k * (2 if self.mid is not None else 1) + s)
        return (pop, k, min(k, math.ceil(k / 2) + s)) if self.mid else (pop, 0, k)

    def plan(self, progress: Progress, pop: int, later_generations: int, now: tuple[int, int, int]) -> None:
        """Tell the progress view what Phase I still asks for: ``now`` (screens, mid, high) left in this
        generation, then ``later_generations`` more at their most."""
        per = self.generation_plan(pop, first=False)
        for fid, n, m in zip(self.rungs, now, per):
            if fid is not None:
                progress.plan("phase1", n + later_generations * m, fid)

    def climb(self, runner: TrialRunner, cands: list[Assignment], promoted: list[int], best: list[EvalResult],
              must: Sequence[int] = ()) -> list[int]:
        """Train ``promoted`` at the mid rung (when there is one) and keep the better half by mid score; returns
        the indices that go on to the top rung (``must``: always, first). ``best`` is updated in place."""
        to_high = promoted
        if self.mid is not None and promoted:
            mids = runner.evaluate_many([cands[i] for i in promoted], self.mid, "phase1")
            for i, r in zip(promoted, mids):
                best[i] = r
            ok = sorted((i for i, r in zip(promoted, mids) if r.ok), key=lambda i: -best[i].score)
            to_high = ok[: max(1, math.ceil(len(ok) / 2)) if self.use_surrogate else len(ok)]
        return [*must, *(i for i in to_high if i not in must)] if any(m not in to_high for m in must) else to_high
