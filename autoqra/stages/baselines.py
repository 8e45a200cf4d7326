r"""The uniform baselines every search runs first: each quantized ladder bit-width at the largest rank that fits,
and the 16-bit reference (at the largest fitting rank, else unconstrained at rank ≈ 8, marked over budget).

They are trials at the top rung like any other; the cost model calibrates on them, the final rung enters the
fitting ones, and the report compares the answer with them.
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


def run_baselines(runner: TrialRunner, problem: Problem, high: Fidelity, out: dict[str, str]) -> dict[str, str]:
    """Evaluate the baselines at ``high``; fills and returns ``out`` (``{name: trial key}``) with the finished
    ones, so a limit mid-way keeps them."""
    named = uniform_baselines(problem)
    runner.progress.plan("baseline", len(named), high)
    runner.progress.phase("baselines", len(named))
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
