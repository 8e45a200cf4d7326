r"""Phase II: a model-based searcher refines the feasible top-rung trials, at the top rung only.

The searcher is told every feasible top-rung trial so far (at least two are needed), then asks for ``batch``
points at a time (evaluated concurrently on the executor's workers) until ``iterations`` evaluations are
spent or its own ``done`` fires (EI saturation / trust-region collapse).
"""

from __future__ import annotations

from typing import Any

from autoqra.evaluators.base import Fidelity
from autoqra.searchers.base import Searcher
from autoqra.stages.front import Front
from autoqra.stages.runner import TrialRunner


def run_phase2(searcher_of: Any, runner: TrialRunner, front: Front, high: Fidelity, iterations: int,
               batch: int) -> tuple[str, list]:
    """Run Phase II; ``searcher_of(batch)`` -> the bound searcher (None: skipped). Returns
    ``(stop reason, the searcher's history)``."""
    warm = front.feasible()
    if len(warm) < 2:
        return f"skipped: {len(warm)} feasible high-fidelity trials (needs 2)", []
    searcher: Searcher = searcher_of(batch)
    searcher.tell([t.assignment for t in warm], [t.result for t in warm])
    runner.progress.phase("Phase II", iterations, upto=True)
    n_done, it = 0, 0  # iterations caps evaluations
    while n_done < iterations and not searcher.done:
        cands = searcher.ask(min(batch, iterations - n_done))
        if not cands:
            break
        it += 1
        runner.progress.phase(f"Phase II · iteration {it}", len(cands), line=False)
        searcher.tell(cands, runner.evaluate_many(cands, high, "phase2"))
        n_done += len(cands)
    reason = "searcher done (EI saturation / region collapse)" if searcher.done else "iteration limit"
    return reason, list(getattr(searcher, "history", []))

