r"""Benchmark searches: per-search summaries (evaluations, wall time, overhead) and the random-search baseline."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from autoqra.config import OptimizeConfig
from autoqra.evaluators.base import Fidelity
from autoqra.guidance.importance import Importance
from autoqra.guidance.repair import make_repair
from autoqra.preparation import as_searched, prepare
from autoqra.stages.runner import TrialRunner

log = logging.getLogger(__name__)


def records(history: list) -> list[dict[str, Any]]:
    """Per-trial records of a search (evaluation order) for the table and the curve."""
    return [{"phase": t.phase, "fidelity": t.fidelity.name, "steps": t.fidelity.steps, "ok": t.result.ok,
             "score": t.score if t.result.ok else None, "model_bytes": t.memory.model_bytes,
             "seconds": t.result.seconds, "assignment": t.assignment.short()} for t in history]


def count(history: list) -> dict[str, int]:
    """Evaluations per fidelity name."""
    out: dict[str, int] = {}
    for t in history:
        out[t.fidelity.name] = out.get(t.fidelity.name, 0) + 1
    return out


def _summary(history: list, budget: int, priors: float, overhead: float) -> dict[str, Any]:
    eval_total = sum(t.result.seconds for t in history)
    wall = priors + eval_total + overhead
    return {"budget_bytes": budget, "evals": count(history), "eval_seconds": eval_total, "priors_seconds": priors,
            "overhead_seconds": overhead, "search_seconds": wall,
            "overhead_fraction": overhead / wall if wall > 0 else math.nan, "records": records(history)}


def search_summary(res: Any) -> dict[str, Any]:
    """Summary of an ``autoqra.optimize`` result.

    ``search_seconds`` is what a standalone run costs: importance priors + every trial's evaluation
    seconds (as stored when it first ran, also for trials read back from the shared store) + the
    optimizer's own time outside the evaluator in this process; ``overhead_fraction`` is the last over
    the total.
    """
    info = res.info
    priors = float((info.get("importance") or {}).get("seconds") or 0.0)
    overhead = max(0.0, float(info["wall_seconds"]) - float(info["eval_seconds"]))
    return {**_summary(res.history, res.budget_bytes, priors, overhead),
            "process_overhead_fraction": info.get("overhead_fraction"), "n_run_now": info.get("n_run", 0),
            "stop_reasons": info.get("stop_reasons"), "stopped": info.get("stopped"),
            "search_score": res.best.score if res.best else None}


def random_search(bench: Any, ref_id: str) -> tuple[Any, dict[str, Any], int]:
    """Random search at the budget of search row ``ref_id``; returns ``(best trial or None, summary, evaluations run)``.

    N = that search's number of Phase I + II high-fidelity evaluations (its baselines excluded). Uniform
    draws from the space are repaired to the budget by the optimizer's repairer (with AutoQRA's priors;
    their cost is not charged here), deduplicated, and evaluated at the search's high fidelity with
    the search's evaluator, through the shared search store (phase ``"random"``).
    """
    ref = bench.search(ref_id)
    cfg = OptimizeConfig.from_dict(ref.config)
    row = {r.id: r for r in bench.rows}.get(ref_id)
    n = sum(t.fidelity.name == "high" and t.phase in ("phase1", "phase2") for t in ref.history)
    ev = prepare(bench.model, as_searched(cfg, ref.info), tokenizer=bench.tok).evaluator  # the search's, exactly
    be, store = ev.backend, bench.store_for(ref.config, row.budget if row else "4bit", row.store if row else None)
    store.check_compatible({"model": bench.fp, "backend": be.spec(), "evaluator": ev.spec()})
    imp = Importance.from_dict(ref.info["importance"])
    space = ref.space  # the reference search's space (with the embedding / head units by default)
    mm = bench.memory[bench.backend_key(ref.best.assignment if ref.best else None, ref)].with_space(space)
    repair = make_repair(mm, ref.budget_bytes, imp.q, imp.r, "model")
    rng, cands = np.random.default_rng(bench.p.search_seed), []
    for _ in range(100 * max(n, 1)):
        if len(cands) >= n:
            break
        a = repair(space.sample(rng))
        if a not in cands:
            cands.append(a)
    high = Fidelity(cfg.resolved("high_steps"), "high")
    mm16 = mm.with_space(space.with_unquantized())
    runner = TrialRunner(store, ev, mm16.predict, lambda a: mm16.predict(a).model_bytes, ref.budget_bytes,
                         backend_spec=be.spec(), fingerprint=bench.fp, seed=bench.p.search_seed)
    t0, ev_now, n_run, hist = time.perf_counter(), 0.0, 0, []
    for a in cands:
        t, ran = runner.trial(a, high, "random")
        if ran:
            res = t.result
            ev_now += res.seconds
            n_run += 1
            log.info("random search %d/%d: %s score %.4f (%.1f s)", len(hist) + 1, n, res.status, res.score,
                     res.seconds)
        hist.append(t)
    overhead = max(0.0, time.perf_counter() - t0 - ev_now)
    ok = [t for t in hist if t.result.ok and t.memory.model_bytes <= ref.budget_bytes]
    best = max(ok, key=lambda t: t.score) if ok else None
    summary = {**_summary(hist, ref.budget_bytes, 0.0, overhead), "n_run_now": n_run,
               "search_score": best.score if best else None,
               "note": "repair uses AutoQRA's priors (their cost is not counted here)"}
    return best, summary, n_run
