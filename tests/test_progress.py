"""Progress that tells the truth: planned counts from the optimizer, lines without a terminal, preparation steps."""

import io
import re

import pytest
import torch
from rich.console import Console

import autoqra
from autoqra.evaluators.base import EvalResult, Fidelity
from autoqra.progress import Progress, compact, fmt_duration
from autoqra.space import Assignment

SMALL = dict(preset="tiny", bits=(2, 4, 8), ranks=(0, 4, 8), eval_blocks=4, importance_blocks=4, seed=0,
             train={"batch_size": 2, "seq_len": 32, "lr": 0.002})

#: a progress line: ``[  12s] text``
LINE = re.compile(r"^\[\s*(?:\d+h)?(?:\d+m)?\d+s\] (.*)$")
TRIAL = re.compile(r"^trial (\d+)/(\d+) · (\w+) · (\w+) · (.*)$")
COUNTS = re.compile(r"\btrials? (\d+)/(\d+)\b|^search (?:done|stopped[^:]*): (\d+)/(\d+) trials")
#: the phase line each trial's phase follows
PHASE_LINE = {"baseline": "baselines:", "phase1": "Phase I · generation", "phase2": "Phase II:", "final": "final rung"}


def lines_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, soft_wrap=True, highlight=False), buf


def parse(text: str) -> list[str]:
    """The progress lines of a log (their text after the elapsed-time stamp)."""
    return [m.group(1) for m in map(LINE.match, text.splitlines()) if m]


def counts(lines: list[str]) -> list[tuple[int, int]]:
    """Every ``done/planned`` pair the lines show, in order."""
    out = []
    for ln in lines:
        m = COUNTS.search(ln)
        if m:
            g = [x for x in m.groups() if x is not None]
            out.append((int(g[0]), int(g[1])))
    return out


def check_log(lines: list[str], res) -> None:
    """One line per trial (every evaluation, stored ones marked), a phase line before each phase's trials,
    done <= planned everywhere, equal at the end (= the result's evaluation count)."""
    trials = [m for m in map(TRIAL.match, lines) if m]
    n = res.info["n_evals"]
    assert len(trials) == n
    assert [int(m.group(1)) for m in trials] == list(range(1, n + 1))
    assert sum("· stored ·" not in m.group(5) for m in trials) == res.info["n_run"]
    assert {m.group(3) for m in trials} == {t.phase for t in res.history}
    c = counts(lines)
    assert c and all(d <= p for d, p in c), [x for x in c if x[0] > x[1]]
    assert c[-1] == (n, n) and lines[-1].startswith(("search done", "search stopped"))
    for m in trials:  # each phase was announced before its first trial
        head = PHASE_LINE.get(m.group(3))
        if head is not None:
            first = lines.index(m.group(0))
            assert any(ln.startswith(head) for ln in lines[:first]), (m.group(3), lines[:first])
    gens = len(res.info["hv_history"])
    for g in range(1, gens + 1):
        assert sum(ln.startswith(f"Phase I · generation {g}:") for ln in lines) == 1


# ------------------------------------------------------------------ counting
def test_planned_is_raised_lowered_and_meets_done():
    con, buf = lines_console()
    p = Progress(console=con)
    low, high = Fidelity(0, "low"), Fidelity(4, "high")
    ok = EvalResult(score=-1.0, seconds=2.0)
    a = Assignment(("u0", "u1"), (4, 4), (8, 8))
    with p:
        p.plan("phase1", 4, low)
        p.plan("phase1", 2, high)
        p.plan("phase2", 3, high)
        assert (p.done, p.planned) == (0, 9)
        for _ in range(4):
            p.trial("phase1", ok, cached=False, fidelity=low, assignment=a, nbytes=1000, feasible=True)
        p.plan("phase1", 1, high)  # promotions decided: one, not two
        assert (p.done, p.planned) == (4, 8)
        p.trial("phase1", ok, cached=True, fidelity=high, assignment=a)
        p.end("phase1")
        p.trial("phase2", ok, cached=False, fidelity=high)
        p.trial("extra", ok, cached=False, fidelity=high)  # a stage nobody planned still counts
        assert (p.done, p.planned) == (7, 9)
        p.finish()
    assert (p.done, p.planned, p.stored, p.n_run) == (7, 7, 1, 6)
    lines = parse(buf.getvalue())
    assert all(d <= pl for d, pl in counts(lines)) and counts(lines)[-1] == (7, 7)
    assert "· stored ·" in lines[4] and lines[-1].startswith("search done: 7/7 trials (1 stored, 6 run)")


def test_trial_limit_caps_the_plan_and_eta_follows_fidelity():
    p = Progress(enabled=False)
    p.limit = 5
    low, high = Fidelity(0, "low"), Fidelity(10, "high")
    p.plan("s", 10, low)
    p.plan("s", 10, high)
    assert p.planned == 5 and p.eta() is None
    p.trial("s", EvalResult(score=-1.0, seconds=1.0), cached=False, fidelity=low)
    p.trial("s", EvalResult(score=-1.0, seconds=9.0), cached=False, fidelity=high)
    # 9 low (1 s) + 9 high (9 s) left = 90 s, cut to the 3 evaluations the limit leaves
    assert p.planned == 5 and p.eta() == pytest.approx(90 * 3 / 18)
    p.finish("trial limit 5 reached")
    assert (p.done, p.planned) == (2, 2) and p.finished == "trial limit 5 reached"


def test_eta_of_an_unseen_fidelity_prices_the_steps_each_trial_ran():
    # rungs that continued a saved state ran fewer steps than their fidelity says; a final rung trains from
    # scratch: its price comes from the line seconds = a + b * steps over the steps actually run
    p = Progress(enabled=False)
    low, mid, high, final = Fidelity(0, "low"), Fidelity(10, "mid"), Fidelity(24, "high"), Fidelity(60, "final")
    for f, ran, secs in [(low, 0, 3.0), (low, 0, 3.0), (mid, 10, 23.0), (high, 24, 51.0), (high, 16, 35.0)]:
        p.trial("s", EvalResult(score=-1.0, seconds=secs, metrics={"steps_run": float(ran)}), cached=False,
                fidelity=f)
    a, b = p.times.line()
    assert a == pytest.approx(3.0) and b == pytest.approx(2.0)
    p.plan("final", 2, final)
    assert p.eta() == pytest.approx(2 * (3.0 + 2.0 * 60))
    # without the metric the fidelity's steps stand in: the continued high trial then looks cheap per step
    q = Progress(enabled=False)
    for f, secs in [(low, 3.0), (mid, 23.0), (high, 51.0), (high, 35.0)]:
        q.trial("s", EvalResult(score=-1.0, seconds=secs), cached=False, fidelity=f)
    q.plan("final", 2, final)
    assert q.eta() < p.eta()
    # one step count only: no line; the stage's / all trials' mean
    r = Progress(enabled=False)
    r.trial("s", EvalResult(score=-1.0, seconds=4.0), cached=False, fidelity=low)
    r.plan("final", 1, final)
    assert r.times.line() is None and r.eta() == pytest.approx(4.0)


def test_best_is_the_feasible_best_at_the_highest_fidelity():
    p = Progress(enabled=False)
    p.trial("b", EvalResult(score=-1.0), cached=False, fidelity=Fidelity(0, "low"))
    assert p._best_text() == "best -1.0000 (low)"
    p.trial("b", EvalResult(score=-3.0), cached=False, fidelity=Fidelity(4, "high"))
    p.trial("b", EvalResult(score=-2.0), cached=False, fidelity=Fidelity(4, "high"), feasible=False)
    p.trial("b", EvalResult(status="failed"), cached=False, fidelity=Fidelity(4, "high"))
    assert p._best_text() == "best -3.0000 (high)"


def test_step_lines_are_throttled_but_start_and_end_always_show():
    con, buf = lines_console()
    p = Progress(console=con, interval=3600)
    fn = p.callback("cost model")
    for i in range(31):
        fn("KL table", i, 30)
    lines = parse(buf.getvalue())
    assert lines[0] == "cost model: KL table 0/30 units" and lines[-1].startswith("cost model: KL table 30/30 units")
    assert len(lines) == 2
    con, buf = lines_console()
    p = Progress(console=con, interval=0)
    for i in range(4):
        p.callback("importance priors")("adaptation demand", i, 3, "batches")
    assert [ln.split(" · ")[0] for ln in parse(buf.getvalue())] == \
        [f"importance priors: adaptation demand {i}/3 batches" for i in range(4)]
    assert "ETA" in parse(buf.getvalue())[1]


def test_helpers():
    assert [fmt_duration(s) for s in (4.6, 80, 3725)] == ["5s", "1m20s", "1h02m"]
    a = Assignment([f"u{i}" for i in range(30)], [4] * 12 + [8] + [4] * 17, [4] * 13 + [0] * 17)
    assert compact(a) == "b4r4×12 b8r4 b4r0×17"
    assert len(compact(Assignment([f"u{i}" for i in range(30)], [2, 4] * 15, [4] * 30))) == 60


# ------------------------------------------------------------- whole search
@pytest.fixture(scope="module")
def lines_run(tiny, tmp_path_factory):
    """A tiny search with progress lines (no terminal): ``(result, lines, store path)``."""
    store = tmp_path_factory.mktemp("progress") / "t.db"
    con, buf = lines_console()
    res = autoqra.optimize(tiny, "4bit", store=store, progress=Progress(console=con), **SMALL)
    return res, parse(buf.getvalue()), store


def test_search_lines_without_a_terminal(tiny, lines_run):
    res, lines, store = lines_run
    check_log(lines, res)
    first_trial = next(i for i, ln in enumerate(lines) if ln.startswith("trial "))
    assert any(ln.startswith("cost model: KL table") for ln in lines[:first_trial])  # preparation comes first
    # resumed: every trial read back, counted as done and shown as stored
    con, buf = lines_console()
    res2 = autoqra.optimize(tiny, "4bit", store=store, progress=Progress(console=con), **SMALL)
    lines2 = parse(buf.getvalue())
    check_log(lines2, res2)
    assert res2.info["n_run"] == 0 and "cost model: read back from the store" in lines2
    assert all("· stored ·" in ln for ln in lines2 if ln.startswith("trial "))


def test_live_view_totals_agree_with_the_lines(tiny, lines_run, monkeypatch):
    seen: list[tuple[int, int]] = []
    real = Progress.text

    def text(self):
        seen.append((self.done, self.planned))
        return real(self)

    monkeypatch.setattr(Progress, "text", text)
    live = Progress(console=Console(file=io.StringIO(), force_terminal=True, width=200))
    assert live.live_capable
    res = autoqra.optimize(tiny, "4bit", progress=live, **SMALL)
    n = res.info["n_evals"]
    assert seen and all(d <= p for d, p in seen) and seen[-1] == (n, n)
    lines_res, lines, _ = lines_run  # the same search with lines: the same counts
    assert lines_res.info["n_evals"] == n and counts(lines)[-1] == (n, n)
    assert [t.key for t in lines_res.history] == [t.key for t in res.history]


def test_disabled_progress_logs_the_lines_and_a_limit_ends_equal(tiny, caplog):
    caplog.set_level("INFO", logger="autoqra.progress")
    res = autoqra.optimize(tiny, "4bit", max_trials=7, progress=False, **SMALL)
    lines = parse("\n".join(r.getMessage() for r in caplog.records if r.name == "autoqra.progress"))
    assert res.info["n_evals"] == 7 and res.info["stopped"]
    check_log(lines, res)
    assert all(p <= 7 for _, p in counts(lines))
    assert lines[-1].startswith("search stopped (trial limit 7 reached): 7/7 trials")


# -------------------------------------------------------------- preparation
def test_preparation_functions_report_units(tiny):
    from autoqra.config import TrainSpec
    from autoqra.evaluators.data import ByteTokenizer, build_task_data
    from autoqra.evaluators.finetune import FinetuneEvaluator
    from autoqra.guidance.costmodel import measure_cost_model
    from autoqra.guidance.importance import compute_importance
    from autoqra.quant_backends import get_backend
    from autoqra.space import SearchSpace

    space = SearchSpace.from_model(tiny, bits=(2, 4), ranks=(0, 4))
    calls: list[tuple] = []

    def fn(step, done, total, unit="units"):
        calls.append((step, done, total, unit))

    data = build_task_data("pydoc", ByteTokenizer(tiny.config.vocab_size), block_size=32, seed=0)
    ev = FinetuneEvaluator(tiny, space.with_unquantized(), get_backend("hqq"), data=data,
                           train=TrainSpec(batch_size=2, seq_len=32), eval_blocks=2)
    measure_cost_model(ev, space, data.train[:2], steps=2, progress=fn)
    compute_importance(tiny, space, "hqq", data.train[:4], batch_size=2, progress=fn)
    n = space.n_units
    for step, total, unit in [("KL table", n, "units"), ("rank probe r4 training", 2, "steps"),
                              ("leave-one-out", n, "units"), ("quantization sensitivity", n, "units"),
                              ("adaptation demand", 2, "batches")]:
        assert [c[1] for c in calls if c[0] == step] == list(range(total + 1)), step
        assert {c[2:] for c in calls if c[0] == step} == {(total, unit)}


@pytest.mark.slow
def test_smollm2_kl_table_reports_progress(smollm2):
    """A real SmolLM2 preparation step, kept short: the KL table of its last two down projections."""
    from autoqra.guidance.costmodel import quant_damage
    from autoqra.quant_backends import get_backend
    from autoqra.space import SearchSpace

    model, tok = smollm2
    space = SearchSpace.from_model(model, bits=(4, 16), ranks=(0, 8),
                                   target_modules=["layers.28.mlp.down_proj", "layers.29.mlp.down_proj"])
    con, buf = lines_console()
    p = Progress(console=con, interval=0)
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n")[:16]])
    table = quant_damage(model, space, get_backend("hqq"), [ids], progress=p.callback("cost model"))
    lines = parse(buf.getvalue())
    assert [ln.split(" · ")[0] for ln in lines] == [f"cost model: KL table {i}/2 units" for i in range(3)]
    assert "ETA" in lines[1] and table.shape == (2, 2) and (table[:, 0] > 0).all()
