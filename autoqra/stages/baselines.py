r"""The uniform baselines every search runs first: each quantized ladder bit-width at the largest rank that fits,
and the 16-bit reference (at the largest fitting rank, else unconstrained at rank ≈ 8, marked over budget).

They are trials at the top rung like any other; the cost model calibrates on them, the final rung enters the
fitting ones, and the report compares the answer with them.

Where the space searches the embedding / head (units without a rank), a uniform keeps them at 16 bits, so at a
tight budget a bit-width may have no fitting uniform at all while the same blocks with an 8-bit embedding fit.
:func:`embedding_variants` names those: each quantized bit-width, the embedding / head units at their highest
option below 16, at the largest rank that fits. The final rung runs them (:func:`run_embedding_variants`) after the
search, so they never change the calibration nor anything the search decides.
"""

from __future__ import annotations

from autoqra.evaluators.base import EvalResult, Fidelity
from autoqra.problem import Problem
from autoqra.quant_backends import UNQUANTIZED_BITS
from autoqra.space import Assignment
from autoqra.stages.runner import LimitReached, TrialRunner


def uniform_baselines(problem: Problem) -> list[tuple[str, Assignment]]:
    """``(name, assignment)`` of the baselines of ``problem``, in evaluation order."""
    space, fits = problem.space, problem.feasible
    named: list[tuple[str, Assignment]] = []
    ranks = [r for r in space.ranks if r > 0] or list(space.ranks)
    for b in [b for b in space.bits if b != UNQUANTIZED_BITS]:
        feas = [r for r in ranks if fits(space.uniform(b, r))]
        if feas:
            named.append((f"uniform-{b}bit-r{feas[-1]}", space.uniform(b, feas[-1])))
    a16 = [Assignment(space.unit_names, [UNQUANTIZED_BITS] * space.n_units, [r] * space.n_units) for r in ranks]
    feas16 = [a for a in a16 if fits(a)]
    ref = feas16[-1] if feas16 else min(a16, key=lambda a: (abs(a.ranks[0] - 8), a.ranks[0]))
    named.append((f"16bit-r{ref.ranks[0]}{'' if feas16 else ' (over budget, reference)'}", ref))
    return named


def embedding_variants(problem: Problem, top_scores: dict[str, float], margin: float,
                       best: float | None = None) -> list[tuple[str, Assignment]]:
    """``(name, assignment)`` of the uniforms with the embedding / head units below 16 bits
    (``"uniform-4bit-r8-emb8"``), in bit order.

    For each quantized ladder bit-width ``b``: :meth:`~autoqra.space.SearchSpace.uniform` ``(b, r)`` with every
    unit of its own options at its highest one below 16 (a unit without one keeps 16), at the largest positive
    ladder rank ``r`` that fits; none when no rank fits, none at all when the space has no such unit or none of
    them changes. The name's ``emb`` is the first changed unit's bit-width.

    ``top_scores``: ``{baseline name: top-rung score}`` of the regular baselines that ran (fitting, ok). A ``b``
    whose regular baseline is there and scored more than ``margin`` below the best of them and of ``best`` (the run's
    best feasible top-rung score, candidates included) is left out: its variant cannot be near the answer either
    (at B4 on SmolLM2 the 3-bit one, 0.42 nats below, cost a 54-s trial). So is a variant that repeats a regular
    baseline.
    """
    space, fits = problem.space, problem.feasible
    low = {n: max(o for o in opts if o < UNQUANTIZED_BITS) for n, opts in space.own_bits
           if any(o < UNQUANTIZED_BITS for o in opts)}
    if not low:
        return []
    eb = next(iter(low.values()))
    seen = {a for _, a in uniform_baselines(problem)}
    best = max([*top_scores.values(), *([] if best is None else [best])], default=0.0)
    out: list[tuple[str, Assignment]] = []
    for b in [b for b in space.bits if b != UNQUANTIZED_BITS]:
        if any(n.startswith(f"uniform-{b}bit-r") and s < best - margin for n, s in top_scores.items()):
            continue
        fitting = []
        for r in [r for r in space.ranks if r > 0]:
            u = space.uniform(b, r)
            a = space.make([low.get(n, x) for n, x in zip(u.units, u.bits)], u.ranks)
            if fits(a):
                fitting.append((r, a))
        if fitting and fitting[-1][1] not in seen:
            r, a = fitting[-1]
            out.append((f"uniform-{b}bit-r{r}-emb{eb}", a))
    return out


def _evaluate(runner: TrialRunner, named: list[tuple[str, Assignment]], high: Fidelity, label: str,
              out: dict[str, str]) -> dict[str, str]:
    """Evaluate ``named`` at ``high`` as ``"baseline"`` trials (planned in the progress); fills and returns ``out``
    (``{name: trial key}``) with the finished ones, so a limit mid-way keeps them."""
    runner.progress.plan("baseline", len(named), high)
    runner.progress.phase(label, len(named))
    results: list[EvalResult | None] = []
    try:
        results = list(runner.evaluate_many([a for _, a in named], high, "baseline"))
    except LimitReached as e:
        results = e.results
        raise
    finally:
        for (name, a), res in zip(named, results):
            if res is not None:
                out[name] = runner.key_of(a, high)
    return out


def run_baselines(runner: TrialRunner, problem: Problem, high: Fidelity, out: dict[str, str]) -> dict[str, str]:
    """Evaluate the baselines at ``high``; fills and returns ``out`` (``{name: trial key}``) with the finished
    ones, so a limit mid-way keeps them."""
    return _evaluate(runner, uniform_baselines(problem), high, "baselines", out)


def run_embedding_variants(runner: TrialRunner, problem: Problem, high: Fidelity, out: dict[str, str],
                           top_scores: dict[str, float], margin: float, best: float | None = None) -> dict[str, str]:
    """Evaluate the :func:`embedding_variants` at ``high`` like the baselines; adds the finished ones to ``out``
    (``{name: trial key}``) and returns ``{name: trial key}`` of those alone. A variant this run has already
    evaluated at ``high`` (the search found it) is named, not asked for again: a repeat would count against the
    trial limit without adding a trial."""
    named = embedding_variants(problem, top_scores, margin, best)
    ran = set(runner.run_keys)
    got = {n: k for n, a in named if (k := runner.key_of(a, high)) in ran}
    todo = [(n, a) for n, a in named if n not in got]
    try:
        if todo:
            _evaluate(runner, todo, high, "baselines with the embedding / head below 16 bits", got)
    finally:
        added = {n: got[n] for n, _ in named if n in got}  # in bit order
        out.update(added)
    return added
