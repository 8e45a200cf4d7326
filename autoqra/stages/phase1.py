r"""Phase I: the searcher's generations climbing the fidelity ladder.

Each generation: the searcher asks for ``pop_size`` candidates; the ladder (:mod:`autoqra.stages.ladder`)
screens them, promotes the best by the guidance's prediction (:mod:`autoqra.guidance.strategy`) and climbs them
to the top rung; the searcher is told the best result each candidate reached. The first generation's first
candidate (the warm-start seed) always reaches the top rung, so the result can say whether the search beat it.
The searcher's ``done`` is the only stop signal (the generation limit and the trial / time limits are limits).
"""

from __future__ import annotations

import time
from typing import Any

import attrs

from autoqra.searchers.base import Searcher
from autoqra.searchers.surrogate import PairRecord
from autoqra.space import Assignment
from autoqra.stages.front import Front
from autoqra.stages.ladder import FidelityLadder
from autoqra.stages.runner import TrialRunner


@attrs.define
class PhaseOneState:
    """What Phase I leaves behind (filled as it goes, so a limit mid-way keeps it)."""

    generations: int = 0
    seed_assignment: Assignment | None = None
    hv_history: list[dict[str, float]] = attrs.Factory(list)
    stop_reason: str | None = None


class PhaseOne:
    """Runs Phase I.

    Args:
        ladder: the fidelity policy; guidance: the strategy (its ``rank_screens`` and ``learn``); runner / front:
            the run's trials; pop_size / max_generations: sizes. :meth:`run` takes the bound searcher.
    """

    def __init__(self, ladder: FidelityLadder, guidance: Any, runner: TrialRunner, front: Front, pop_size: int,
                 max_generations: int) -> None:
        self.ladder, self.guidance, self.runner, self.front = ladder, guidance, runner, front
        self.pop_size, self.max_generations = pop_size, max_generations
        self.state = PhaseOneState()

    def plan(self, now: tuple[int, int, int] | None = None) -> None:
        """Tell the progress view what Phase I still asks for (``now``: this generation's rest)."""
        g = self.state.generations
        now = now if now is not None else self.ladder.generation_plan(self.pop_size, first=g <= 1)
        self.ladder.plan(self.runner.progress, self.pop_size, self.max_generations - max(g, 1), now)

    def run(self, searcher: Searcher) -> PhaseOneState:
        st, ladder, runner = self.state, self.ladder, self.runner
        pairs: list[PairRecord] = []
        while not searcher.done and st.generations < self.max_generations:
            st.generations += 1
            runner.tags["generation"] = st.generations
            cands = searcher.ask(self.pop_size)
            if not cands:
                break
            self.plan((len(cands), *ladder.generation_plan(self.pop_size, st.generations == 1)[1:]))
            runner.progress.phase(f"Phase I · generation {st.generations}", len(cands))
            lows = runner.evaluate_many(cands, ladder.low, "phase1")
            recs = [PairRecord(a, r.score if r.ok else -1e9, self.front.problem.bytes_of(a)) for a, r in zip(cands, lows)]
            promoted = ladder.promote(self.guidance.rank_screens(cands, lows, recs))
            seed_first = st.generations == 1 and lows[0].ok  # the warm-start seed always reaches the top rung
            if seed_first:
                st.seed_assignment = cands[0]
                promoted = [0, *(i for i in promoted if i != 0)]
            best = list(lows)
            n = len(promoted)
            self.plan((0, n if ladder.mid else 0, min(n, -(-n // 2) + seed_first)
                       if ladder.mid and ladder.use_surrogate else n))
            to_high = ladder.climb(runner, cands, promoted, best, must=[0] if seed_first else [])
            self.plan((0, 0, len(to_high)))
            his = runner.evaluate_many([cands[i] for i in to_high], ladder.high, "phase1") if to_high else []
            for i, hi in zip(to_high, his):
                best[i] = hi
                if hi.ok and lows[i].ok:
                    pairs.append(PairRecord(cands[i], lows[i].score, recs[i].bytes, hi.score))
            self.guidance.learn(pairs)
            searcher.tell(cands, best)
            hv = self.front.hypervolume()
            st.hv_history.append({"generation": st.generations, "hv": hv, "evals": runner.n_evals,
                                  "best": self.front.best_score(), "seconds": time.perf_counter() - runner.t0})
            runner.progress.front(len(self.front.front()))
        objectives = getattr(searcher, "objectives", "")
        st.stop_reason = ("generation limit" if st.generations >= self.max_generations else
                          "best score stagnation" if objectives == "score" and searcher.done else
                          "hypervolume stagnation" if objectives == "pareto" and searcher.done else "searcher done")
        return st
