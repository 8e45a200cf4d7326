"""The final rung: the search chooses on the final recipe's score, never below the best fitting uniform's,
and ``Result.train()`` reads the chosen point's final training back."""

import attrs
import numpy as np
import pytest

import autoqra
from autoqra.config import OptimizeConfig, TrainSpec
from autoqra.evaluators.base import EvalResult, Evaluator, Fidelity
from autoqra.guidance.importance import Importance
from autoqra.memory.model import MemoryModel
from autoqra.optimizer import AutoQRA, SearchSettings
from autoqra.problem import Problem
from autoqra.space import SearchSpace
from autoqra.stages.baselines import embedding_variants, run_embedding_variants, uniform_baselines
from autoqra.stages.final_rung import FinalEntry, FinalRung, FinalRungSettings
from autoqra.store import TrialStore

LOW, MID, HIGH = Fidelity(0, "low"), Fidelity(1, "mid"), Fidelity(2, "high")


class Short(Evaluator):
    """The search's rungs: bits look good, adapters look useless (as at a short horizon)."""

    name = "short"

    def __init__(self, space):
        self.space = space

    def spec(self):
        return {"name": self.name}

    def evaluate(self, a, fidelity):
        return EvalResult(score=float(np.mean(a.bits)) - sum(a.ranks) / 1000, seconds=0.0)


class Final(Evaluator):
    """The final recipe: ``final(a, seed)``; counts its calls."""

    name = "final"

    def __init__(self, space, seed, final, calls):
        self.space, self.seed, self.final, self.calls = space, seed, final, calls

    def spec(self):
        return {"name": self.name, "seed": self.seed}

    def evaluate(self, a, fidelity):
        self.calls.append((a, fidelity.steps, self.seed))
        return EvalResult(score=float(self.final(a, self.seed)), seconds=0.0)


@pytest.fixture(scope="module")
def parts(tiny):
    space = SearchSpace.from_model(tiny, bits=(2, 4, 8), ranks=(0, 4, 8))
    mm = MemoryModel(tiny, space, "hqq")
    return space, mm, attrs.evolve(space, bits=(2, 4, 8, 16))


@pytest.fixture(scope="module")
def emb_parts(tiny):
    """The tiny model with its (tied) embedding a unit of bits 4 / 8 / 16; it holds most of the bytes."""
    space = SearchSpace.from_model(tiny, bits=(2, 4, 8), ranks=(0, 4, 8), embeddings="search")
    return space, MemoryModel(tiny, space, "hqq"), attrs.evolve(space, bits=(2, 4, 8, 16))


def run_with(parts, final, final_on=True, seeds=(0, 1), budget=None):
    space, mm, eval_space = parts
    budget = budget or mm.predict(space.uniform(4, 8)).model_bytes
    problem = Problem.build(space, mm, budget, importance=Importance.uniform(space.n_units), seed=0)
    fs = FinalRungSettings(steps=9, seeds=seeds, candidates=3, uniform_margin=100.0) if final_on else None
    settings = SearchSettings(low=LOW, mid=MID, high=HIGH, phase1="nsga2", phase2="turbo", pop_size=4, promote_k=2,
                              max_generations=2, phase2_iterations=2, final=fs)
    calls = []
    run = AutoQRA(problem, Short(eval_space), TrialStore(None), settings, fingerprint="fp",
                  final_evaluator=lambda seed: Final(eval_space, seed, final, calls))
    return run, run.run(), calls, budget


def test_the_final_rung_winner_is_chosen_when_the_rungs_disagree(parts):
    # at the final horizon adapters are what counts: the top rung's favourite (most bits, fewest adapters) loses
    def final(a, seed):
        return sum(a.ranks) / 10 + 0.01 * np.mean(a.bits) + 0.001 * seed

    run, out, calls, budget = run_with(parts, final)
    off_run, off, _, _ = run_with(parts, final, final_on=False)
    entries = run.final_rung.entries
    assert len(entries) >= 4 and {e.uniform for e in entries} == {True, False}
    assert {c[1] for c in calls} == {9} and {c[2] for c in calls} == {0, 1}  # every entrant, both seeds, 9 steps
    best = max(entries, key=lambda e: e.mean)
    assert out.best.assignment == best.trial.assignment
    assert best.mean == pytest.approx(np.mean([final(best.trial.assignment, s) for s in (0, 1)]))
    top = off.best  # choosing on the top rung picks another point, worse at the final recipe
    assert top.assignment != out.best.assignment
    assert final(top.assignment, 0) < final(out.best.assignment, 0)
    assert run.memory.predict(out.best.assignment).model_bytes <= budget
    uni = [e for e in entries if e.uniform and run.problem.bytes_of(e.trial.assignment) <= budget]
    assert best.mean >= max(e.mean for e in uni)
    assert [e["label"] for e in out.final_rung] == [e.label for e in entries]
    assert {t.phase for t in run.trials()} >= {"final"} and out.best.phase != "final"


def test_never_below_the_best_fitting_uniform(parts):
    # the final recipe punishes every mixed assignment: only a uniform may be chosen
    def final(a, seed):
        return -len(set(zip(a.bits, a.ranks))) + 0.1 * np.mean(a.bits)

    run, out, _, budget = run_with(parts, final)
    chosen = out.best.assignment
    assert len(set(zip(chosen.bits, chosen.ranks))) == 1
    fitting = [e for e in run.final_rung.entries if e.uniform]
    assert fitting and all(run.problem.bytes_of(e.trial.assignment) <= budget for e in fitting)
    assert final(chosen, 0) == max(final(e.trial.assignment, 0) for e in fitting)
    assert any(not e.uniform for e in run.final_rung.entries)  # search candidates did enter, and lost


def test_entrants_are_distinct_and_near_the_best_uniform(parts):
    space, _, _ = parts
    fr = FinalRung(FinalRungSettings(steps=5, seeds=(0,), candidates=2, uniform_margin=0.5), lambda s: None)

    def trial(a, score):
        from autoqra.trial import Trial

        return Trial(a, HIGH, "phase1", EvalResult(score=score), key=a.to_json())

    u4, u2 = trial(space.uniform(4, 8), -1.0), trial(space.uniform(2, 8), -3.0)
    a, b = trial(space.make([8, 4], [4, 0]), -0.5), trial(space.make([8, 4], [4, 0]), -0.6)  # b repeats a
    c, d = trial(space.make([4, 8], [0, 4]), -0.7), trial(space.make([2, 8], [8, 8]), -0.8)
    got = fr.entrants([d, b, a, c, trial(space.uniform(4, 8), -0.1)], {"uniform-4bit-r8": u4, "uniform-2bit-r8": u2})
    assert [(label, t.score, uni) for label, t, uni in got] == [
        ("uniform-4bit-r8", -1.0, True), ("candidate 1", -0.5, False), ("candidate 2", -0.7, False)]
    assert FinalEntry("x", a, (1.0, float("nan")), ("k1", "k2")).mean != FinalEntry("x", a, (1.0, 2.0), ("", "")).mean


def test_embedding_variants_fit_at_the_largest_rank_and_skip_hopeless_bit_widths(parts, emb_parts):
    space, mm, _ = emb_parts

    def problem(budget, sp=space):
        return Problem.build(sp, mm, budget, importance=Importance.uniform(sp.n_units), seed=0)

    p = problem(530_000)  # 16-bit embedding: 2-bit r8 and 4-bit r4 fit, no 8-bit uniform does
    assert [n for n, _ in uniform_baselines(p)][:2] == ["uniform-2bit-r8", "uniform-4bit-r4"]
    got = embedding_variants(p, {}, 0.1)
    assert [n for n, _ in got] == ["uniform-2bit-r8-emb8", "uniform-4bit-r8-emb8", "uniform-8bit-r4-emb8"]
    for (_, a), (b, r) in zip(got, [(2, 8), (4, 8), (8, 4)]):
        assert a == space.make([8, b, b], [0, r, r]) and p.feasible(a)
        assert not p.feasible(space.make([8, b, b], [0, 8, 8])) or r == 8  # r is the largest that fits
    # a regular baseline more than the margin below the best: its bit-width's variant is left out
    top = {"uniform-2bit-r8": -3.0, "uniform-4bit-r4": -1.0}
    assert [n for n, _ in embedding_variants(p, top, 0.5)] == ["uniform-4bit-r8-emb8", "uniform-8bit-r4-emb8"]
    assert len(embedding_variants(p, top, 5.0)) == 3
    # ... or more than the margin below the run's best top-rung score (a search candidate): also left out
    only2 = {"uniform-2bit-r8": -3.0}
    assert len(embedding_variants(p, only2, 0.5)) == 3  # the best baseline is itself
    assert [n for n, _ in embedding_variants(p, only2, 0.5, best=-1.0)] == ["uniform-4bit-r8-emb8", "uniform-8bit-r4-emb8"]
    # a tight budget: only 2-bit blocks fit, at rank 4; nothing fits a 16-bit embedding
    tight = problem(300_000)
    assert not any(tight.feasible(a) for n, a in uniform_baselines(tight) if n.startswith("uniform"))
    assert [n for n, _ in embedding_variants(tight, {}, 0.1)] == ["uniform-2bit-r4-emb8"]
    assert embedding_variants(problem(100_000), {}, 0.1) == []  # nothing fits
    # no embedding unit, or one without an option below 16: no variant
    kspace, kmm, _ = parts
    assert embedding_variants(Problem.build(kspace, kmm, 10**9, seed=0), {}, 0.1) == []
    only16 = attrs.evolve(space, own_bits={"model.embed_tokens": (16,)})
    assert embedding_variants(problem(10**9, only16), {}, 0.1) == []


def test_the_final_rung_enters_and_chooses_a_fitting_embedding_variant(emb_parts):
    space, mm, _ = emb_parts
    want = space.make([8, 4, 4], [0, 8, 8])  # 4-bit r8 with an 8-bit embedding: fits, its 16-bit sibling does not

    def final(a, seed):
        return 1.0 if a == want else 0.01 * np.mean(a.bits)

    budget = 400_000
    assert mm.predict(want).model_bytes <= budget < mm.predict(space.uniform(2, 4)).model_bytes
    run, out, calls, _ = run_with(emb_parts, final, budget=budget)
    names = ["uniform-2bit-r8-emb8", "uniform-4bit-r8-emb8"]
    assert [n for n in out.baselines if "-emb" in n] == names  # run at the top rung, listed with the baselines
    assert run.baseline_keys["uniform-4bit-r8-emb8"] == run.runner.key_of(want, HIGH)
    trials = {t.key: t for t in run.trials()}
    assert trials[run.baseline_keys["uniform-4bit-r8-emb8"]].phase == "baseline"
    entries = {e.label: e for e in run.final_rung.entries}
    assert set(names) <= set(entries) and all(entries[n].uniform for n in names)
    assert out.best.assignment == want and run.final_rung.choose().label == "uniform-4bit-r8-emb8"
    assert (want, 9, 0) in calls
    assert run.progress.done == run.progress.planned
    n = run.runner.n_evals  # asked for again: named from the run's trials, no evaluation counted
    assert list(run_embedding_variants(run.runner, run.problem, HIGH, {}, {}, 100.0)) == names
    assert run.runner.n_evals == n


def test_result_train_reads_the_final_rung_back(tiny, tmp_path):
    res = autoqra.optimize(tiny, "4bit", store=tmp_path / "trials.db", seed=0, preset="tiny", bits=(2, 4, 8),
                           ranks=(0, 4, 8), train=TrainSpec(batch_size=2, seq_len=32, lr=2e-3), progress=False)
    fr = res.info["final_rung"]
    assert fr and any(e["assignment"] == res.best.assignment.to_dict() for e in fr)
    assert {t.fidelity.steps for t in res.history if t.phase == "final"} == {6}  # the tiny preset's final_steps
    assert res.info["stop_reasons"]["final"].startswith("chose ")
    res.save(tmp_path / "run")
    back = autoqra.load_result(tmp_path / "run")
    back.train(model=tiny, progress=False)
    assert back.final.resumed_from == back.final.steps == 6  # read back: no new step
    again = autoqra.load_result(tmp_path / "run")  # another seed is another training: not read back
    again.train(model=tiny, progress=False, seed=5, out=tmp_path / "other")
    assert again.final.resumed_from == 0
    assert "final rung" in res.summary()
    page = res.report(tmp_path / "report").read_text()
    assert "Final rung" in page and page.count("uniform baseline") >= 1


def test_final_rung_off_restores_the_top_rung_choice(tiny):
    kw = dict(preset="tiny", bits=(2, 4, 8), ranks=(0, 4, 8), train=TrainSpec(batch_size=2, seq_len=32, lr=2e-3),
              progress=False, seed=0, max_trials=12)
    res = autoqra.optimize(tiny, "4bit", final_rung=False, **kw)
    assert res.info["final_rung"] == [] and not any(t.phase == "final" for t in res.history)
    assert res.info["stop_reasons"].get("final") in (None, "off")


def test_config_validates_the_final_rung_fields():
    assert OptimizeConfig(preset="demo").resolved("final_seeds") == 1
    assert OptimizeConfig(preset="default").resolved("final_seeds") == 2
    for bad in (dict(final_candidates=0), dict(final_seeds=0), dict(final_eval_blocks=-1), dict(final_rung="yes"),
                dict(rung_schedule="cosine"), dict(decay_fraction=1.5), dict(final_uniform_margin=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            OptimizeConfig(**bad)


def test_cli_no_final_rung(tmp_path):
    from autoqra.cli.main import main

    out = tmp_path / "run"
    assert main(["optimize", "--model", "tiny", "--preset", "tiny", "--max-trials", "8", "--no-final-rung",
                 "--no-progress", "--no-report", "--out", str(out)]) == 0
    res = autoqra.load_result(out)
    assert res.config["final_rung"] is False and not any(t.phase == "final" for t in res.history)


def test_a_search_stopped_in_the_final_rung_resumes_it(tiny, tmp_path):
    kw = dict(preset="tiny", bits=(2, 4, 8), ranks=(0, 4, 8), train=TrainSpec(batch_size=2, seq_len=32, lr=2e-3),
              progress=False, seed=0, store=tmp_path / "t.db")
    full = autoqra.optimize(tiny, "4bit", **kw)
    n_final = sum(t.phase == "final" for t in full.history)
    n_before = full.info["n_evals"] - n_final  # evaluations counted before the final rung (repeats included)
    assert n_final >= 2
    (tmp_path / "t.db").unlink()
    import shutil

    shutil.rmtree(tmp_path / "t.db.final")
    cut = autoqra.optimize(tiny, "4bit", max_trials=n_before + 1, **kw)  # stopped after one final training
    assert cut.info["stopped"] and sum(t.phase == "final" for t in cut.history) == 1
    again = autoqra.optimize(tiny, "4bit", **kw)
    assert again.info["n_run"] == n_final - 1  # the finished final training is read back
    assert again.best.key == full.best.key and again.info["final_rung"] == full.info["final_rung"]
