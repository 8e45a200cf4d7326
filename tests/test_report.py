import argparse

import attrs
import numpy as np
import pytest
from matplotlib.image import imread

import autoqra
from autoqra.cli.report import add_commands
from autoqra.evaluators.base import EvalResult, Fidelity
from autoqra.memory.model import MemoryBreakdown
from autoqra.pareto import hypervolume_2d
from autoqra.report.html import progress_series, write_report

PNGS = ("pareto.png", "layers.png", "progress.png")


@pytest.fixture(scope="module")
def res(tiny):
    return autoqra.optimize(tiny, "4bit", preset="tiny", bits=(2, 4, 8), ranks=(0, 4, 8),
                            train=autoqra.TrainSpec(batch_size=2, seq_len=32, lr=2e-3), eval_blocks=4,
                            importance_blocks=4, progress=False, seed=0)


def _mem(res, t):
    return t.memory.model_bytes if res.target == "model" else t.memory.train_bytes


def _check_files(out):
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        img = imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and 100 < img.shape[1] <= 11 * 110 + 1, (name, img.shape)
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 3
    assert 'src="http' not in html and "<script" not in html and "<link" not in html and "url(" not in html
    return html


def test_report_files_and_html(res, tmp_path):
    assert res.best is not None and res.pareto
    out = tmp_path / "nested" / "rep"
    path = write_report(res, out, title="run <b>&</b>")
    assert path == out / "report.html"
    html = _check_files(out)
    assert "run &lt;b&gt;&amp;&lt;/b&gt;" in html and "<b>&</b>" not in html
    assert res.best.assignment.short() in html
    front = html.split("<h2>Pareto front", 1)[1].split("<h2>", 1)[0]
    assert front.count("<tr") == len(res.pareto) + 1  # header + one row per front trial
    assert front.count("<tr class=chosen>") == (res.best.key in {t.key for t in res.pareto})
    for t in res.pareto:
        assert f"<td>{t.score:.4f}</td>" in front
        assert f"<td>{t.memory.model_bytes / 1e6:,.2f}</td>" in front
    units = html.split("<h2>Chosen per-unit assignment", 1)[1]
    assert units.count("<tr") == res.space.n_units + 1
    summary = html.split("<h2>Summary", 1)[1].split("<h2>", 1)[0]
    assert f"Trials: {len(res.history)}" in summary and "failed: 0" in summary


def test_progress_series_matches_history(res):
    s = progress_series(res)
    n = len(res.history)
    assert len(s.trials) == len(s.best) == len(s.hypervolume) == len(s.seconds) == n
    high = [t for t in res.history if t.fidelity.name == "high" and t.result.ok]
    feas = [t for t in high if _mem(res, t) <= res.budget_bytes]
    first = next(i for i, t in enumerate(res.history) if t in feas)
    assert np.isnan(s.best[:first]).all() and np.isfinite(s.best[first:]).all()
    assert (np.diff(s.best[first:]) >= 0).all() and (np.diff(s.hypervolume) >= -1e-9).all()
    assert s.best[-1] == max(t.score for t in feas)
    assert s.ref_score == pytest.approx(min(t.score for t in high) - 1e-3)
    expect = hypervolume_2d([t.score for t in feas], [_mem(res, t) for t in feas], s.ref_score,
                            res.budget_bytes * 1.0001)
    assert s.hypervolume[-1] == pytest.approx(expect) and expect > 0
    assert s.seconds[-1] == pytest.approx(sum(t.result.seconds for t in res.history))


def test_progress_series_counts_only_feasible_high_fidelity(res):
    b = res.budget_bytes
    base = res.history[0]

    def trial(score, mem, fid="high"):
        return attrs.evolve(base, fidelity=Fidelity(4 if fid == "high" else 2, fid),
                            result=EvalResult(score=score, seconds=1.0),
                            memory=MemoryBreakdown(unquantized_bytes=mem))

    hist = [trial(-5.0, b - 100), trial(-1.0, b - 200, "low"), trial(-0.5, b + 1), trial(-4.0, b - 50),
            attrs.evolve(trial(-3.0, b - 300), result=EvalResult(status="oom", seconds=2.0))]
    r = attrs.evolve(res, history=hist, target="model")
    s = progress_series(r)
    assert list(s.best) == [-5.0, -5.0, -5.0, -4.0, -4.0]
    assert list(s.seconds) == [1.0, 2.0, 3.0, 4.0, 6.0]
    ref_s, ref_m = -5.001, b * 1.0001
    h1 = (ref_m - (b - 100)) * (-5.0 - ref_s)
    h2 = ((b - 50) - (b - 100)) * (-5.0 - ref_s) + (ref_m - (b - 50)) * (-4.0 - ref_s)
    assert s.ref_score == pytest.approx(ref_s)
    assert s.hypervolume == pytest.approx([h1, h1, h1, h2, h2])


def test_report_edge_cases(res, tmp_path):
    failed = attrs.evolve(res.history[-1], result=EvalResult(status="oom", error="CUDA out of memory"))
    no_best = attrs.evolve(res, best=None, pareto=[], history=[*res.history, failed], target="train")
    html = _check_files(write_report(no_best, tmp_path / "a").parent)
    assert "No chosen point" in html and "front is empty" in html and "failed: 1" in html
    only_base = attrs.evolve(res, best=None, pareto=[], history=list(res.baselines.values()), info={})
    html = _check_files(write_report(only_base, tmp_path / "b").parent)
    assert "No feasible point" in html
    empty = attrs.evolve(res, best=None, pareto=[], history=[], baselines={}, info={})
    _check_files(write_report(empty, tmp_path / "c").parent)


def test_cli_report(res, tmp_path, capsys):
    run = tmp_path / "run"
    res.save(run)
    parser = argparse.ArgumentParser(prog="autoqra")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", "--run", str(run)])
    assert args.func(args) == 0
    assert str(run / "report" / "report.html") in capsys.readouterr().out
    html = _check_files(run / "report")
    assert res.best.assignment.short() in html
    args = parser.parse_args(["report", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert args.func(args) == 2
    assert "no autoqra result" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_progress_score_axis_zooms_on_the_gain_over_the_best_baseline():
    from autoqra.report.plots import _zoom_on_gain, new_figure

    phases = ["baseline"] * 3 + ["phase1"] * 2
    ax = new_figure(4, 3).subplots()
    ax.plot(range(5), [-11.0, -4.7, -3.3, -3.3, -3.25])
    _zoom_on_gain(ax, np.array([-11.0, -4.7, -3.3, -3.3, -3.25]), phases)
    lo, hi = ax.get_ylim()
    assert lo == pytest.approx(-3.3 - 1.5 * 0.05) and hi == pytest.approx(-3.25 + 0.6 * 0.05)
    assert "best baseline (-3.3)" in ax.texts[0].get_text()
    ax2 = new_figure(4, 3).subplots()
    ax2.plot(range(4), [-11.0, -3.3, -3.3, -3.3])
    before = ax2.get_ylim()
    _zoom_on_gain(ax2, np.array([-11.0, -3.3, -3.3, -3.3]), phases[:4])  # no gain: the axis is left alone
    assert ax2.get_ylim() == before and not ax2.texts
