"""Plug-ins chosen by name: a registered evaluator, executor and searcher are selectable through
``autoqra.optimize``, a YAML config and the CLI (``--plugin``); config names are checked against the registries;
a searcher option the searcher does not take is an error; the default bit ladder follows the backend."""

import importlib.util
import sys

import pytest
import yaml

import autoqra
from autoqra.cli.main import load_plugins, main
from autoqra.config import OptimizeConfig, TrainSpec
from autoqra.evaluators import EVALUATORS, Evaluator, FinetuneEvaluator, build_evaluator, register_evaluator
from autoqra.executors import EXECUTORS, make_executor
from autoqra.memory.model import MemoryModel
from autoqra.problem import Problem
from autoqra.result import load_result
from autoqra.searchers import RUN_SETTINGS, SEARCHERS, get_searcher
from autoqra.searchers.nsga2 import NSGA2Searcher
from autoqra.space import SearchSpace

FAST = dict(preset="tiny", bits=(2, 4, 8), ranks=(0, 4, 8), train=TrainSpec(batch_size=2, seq_len=32, lr=2e-3),
            eval_blocks=4, importance_blocks=4, progress=False)
#: the same sizes as a config file (no cost model: fewer model passes)
FAST_FILE = {"preset": "tiny", "bits": [2, 4, 8], "ranks": [0, 4, 8], "eval_blocks": 4, "importance_blocks": 0,
             "train": {"batch_size": 2, "seq_len": 32, "lr": 0.002}}

#: a user's plug-in module: each class counts its own use
PLUGIN = '''
from autoqra.evaluators import FinetuneEvaluator, register_evaluator
from autoqra.executors import LocalExecutor, register_executor
from autoqra.searchers import register_searcher
from autoqra.searchers.random import RandomSearcher

CALLS = {"evaluator": 0, "executor": 0, "searcher": 0}


@register_evaluator("counting")
class CountingEvaluator(FinetuneEvaluator):
    def evaluate(self, assignment, fidelity):
        CALLS["evaluator"] += 1
        return super().evaluate(assignment, fidelity)


@register_executor("counting")
class CountingExecutor(LocalExecutor):  # takes no address / workers / resources
    def submit_batch(self, items, may_start=None):
        for done in super().submit_batch(items, may_start):
            CALLS["executor"] += 1
            yield done


@register_searcher("plain")
class PlainSearcher(RandomSearcher):  # takes none of the run's settings (pop_size, alpha...)
    def __init__(self, tries: int = 20):
        super().__init__(max_rejections=tries)

    def ask(self, n):
        CALLS["searcher"] += 1
        return super().ask(n)
'''
MODULE = "autoqra_plugin_my_plugins"  # the name load_plugins gives my_plugins.py


@pytest.fixture
def plugin_file(tmp_path, monkeypatch):
    """The plug-in module's path; registrations made during the test are undone afterwards."""
    for reg in (EVALUATORS, EXECUTORS, SEARCHERS):
        monkeypatch.setattr(reg, "_classes", dict(reg._classes))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    path = tmp_path / "my_plugins.py"
    path.write_text(PLUGIN)
    yield path
    sys.modules.pop(MODULE, None)


@pytest.fixture
def plugin(plugin_file):
    """The plug-in module, imported (its classes registered)."""
    (mod,) = load_plugins([str(plugin_file)])
    return mod


def _err(capsys) -> str:
    """What the CLI printed on stderr, its line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def _problem(tiny):
    space = SearchSpace.from_model(tiny, bits=(2, 4, 8), ranks=(0, 4, 8))
    mm = MemoryModel(tiny, space, "hqq")
    return Problem.build(space, mm, mm.predict(space.uniform(4, 4)).model_bytes, seed=0)


def test_plugins_selected_by_name_in_optimize(tiny, plugin):
    res = autoqra.optimize(tiny, "4bit", evaluator="counting", executor="counting", phase1="plain", phase2="plain",
                           seed=0, **{**FAST, "importance_blocks": 0})
    calls = plugin.CALLS
    assert calls["evaluator"] == calls["executor"] == res.info["n_run"] > 0  # every trial went through both
    phases = {t.phase for t in res.history}
    assert {"phase1", "phase2"} <= phases and calls["searcher"] >= 2  # asked in Phase I and in Phase II
    assert (res.config["evaluator"], res.config["executor"], res.config["phase1"], res.config["phase2"]) == \
        ("counting", "counting", "plain", "plain")


def test_plugins_selected_by_name_in_a_yaml_config(tiny, plugin, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**FAST_FILE, "budget": "4bit", "evaluator": "counting", "executor": "counting",
                                    "phase1": "plain", "phase2": None, "max_trials": 4}))
    res = autoqra.optimize(tiny, config=path, progress=False)
    assert plugin.CALLS["evaluator"] == plugin.CALLS["executor"] == res.info["n_run"] > 0
    assert plugin.CALLS["searcher"] >= 1
    assert res.config["evaluator"] == "counting" and res.config["phase1"] == "plain"


def test_plugins_selected_by_name_on_the_command_line(plugin_file, tmp_path, capsys):
    assert "counting" not in EVALUATORS  # only --plugin imports it
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**FAST_FILE, "max_trials": 4}))
    out = tmp_path / "run"
    rc = main(["optimize", "--model", "tiny", "--plugin", str(plugin_file), "--config", str(tmp_path / "cfg.yaml"),
               "--evaluator", "counting", "--executor", "counting", "--phase1", "plain", "--no-phase2",
               "--no-progress", "--no-report", "--out", str(out)])
    assert rc in (0, 1), capsys.readouterr().err
    calls = sys.modules[MODULE].CALLS
    assert calls["evaluator"] == calls["executor"] > 0 and calls["searcher"] >= 1
    cfg = load_result(out).config
    assert (cfg["evaluator"], cfg["executor"], cfg["phase1"], cfg["phase2"]) == ("counting", "counting", "plain", None)


def test_plugin_by_dotted_module_name(plugin_file, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_file.parent))
    monkeypatch.delitem(sys.modules, "my_plugins", raising=False)
    (mod,) = load_plugins(["my_plugins"])
    assert mod.__name__ == "my_plugins" and "counting" in EVALUATORS and "plain" in SEARCHERS
    sys.modules.pop("my_plugins", None)


def test_cli_refuses_unknown_names_and_plugins_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import autoqra.cli.optimize as cli_optimize

    monkeypatch.setattr(cli_optimize, "load_for_training", lambda *a: pytest.fail("the model was loaded"))
    base = ["optimize", "--model", "tiny", "--no-progress", "--out", str(tmp_path / "r")]
    assert main([*base, "--evaluator", "mine"]) == 2
    err = _err(capsys)
    assert "evaluator='mine' is not a registered evaluator" in err and "'finetune'" in err and "--plugin" in err
    assert main([*base, "--phase2", "mine"]) == 2
    assert "phase2='mine' is not a registered searcher" in _err(capsys)
    assert main([*base, "--plugin", str(tmp_path / "missing.py")]) == 2
    assert "no such file" in _err(capsys)
    assert main([*base, "--plugin", "no_such_module_zz"]) == 2
    assert "no module named 'no_such_module_zz'" in _err(capsys)


@pytest.mark.parametrize("field, kind", [("evaluator", "evaluator"), ("executor", "executor"), ("phase1", "searcher"),
                                         ("phase2", "searcher"), ("backend", "backend")])
def test_unknown_names_list_the_registered_ones(plugin, field, kind):
    with pytest.raises(ValueError, match=fr"{field}='nope' is not a registered {kind}; registered {kind}s: \[") as e:
        OptimizeConfig(**{field: "nope"})
    registered = {"evaluator": "'counting'", "executor": "'counting'", "searcher": "'plain'", "backend": "'hqq'"}
    assert registered[kind] in str(e.value)
    assert OptimizeConfig(phase2=None).phase2 is None


def test_optimize_refuses_an_unknown_evaluator_before_touching_the_model(tiny):
    with pytest.raises(ValueError, match=r"evaluator='mine' is not a registered evaluator.*'finetune', 'lm_eval'"):
        autoqra.optimize(tiny, evaluator="mine", progress=False)


def test_a_searcher_option_it_does_not_take_is_an_error(tiny, plugin):
    problem = _problem(tiny)
    with pytest.raises(ValueError, match=r"searcher 'plain' does not take the option\(s\) \['max_rejections'\]; "
                                         r"the options it takes: \['tries'\]"):
        get_searcher("plain", problem, max_rejections=3)
    with pytest.raises(ValueError, match=r"searcher 'nsga2' does not take the option\(s\) \['popsize'\].*'pop_size'"):
        get_searcher("nsga2", problem, popsize=8)
    # the run's settings are offered: passed where the constructor takes them, else left out
    s = get_searcher("plain", problem, tries=3, offered={"pop_size": 8, "alpha": 0.5, "anything": 1})
    assert s.max_rejections == 3 and s.ctx is problem
    with pytest.raises(ValueError, match=r"searcher 'plain' does not take the option\(s\) \['pop_size'\]"):
        get_searcher("plain", problem, pop_size=8)  # given by the user (not offered by the run): an error
    n = get_searcher("nsga2", problem, offered={"pop_size": 6, "alpha": 0.5})
    assert isinstance(n, NSGA2Searcher) and n.pop_size == 6
    assert set(RUN_SETTINGS) >= {"pop_size", "alpha", "batch_size"}
    with pytest.raises(ValueError, match="only be given with a searcher name"):
        get_searcher(n, problem, tries=3)


def test_executor_options_reach_a_plugin_only_where_it_takes_them(plugin):
    with pytest.raises(ValueError, match=r"workers=2 is not allowed with executor='counting'.*'workers'"):
        OptimizeConfig(executor="counting", workers=2)
    ex = make_executor("counting", None, address=None, workers=None, resources={})
    assert type(ex).__name__ == "CountingExecutor"


def test_build_evaluator_offers_run_settings_and_checks_options(tiny):
    @register_evaluator("minimal_zz")
    class Minimal(Evaluator):  # takes (model, space, backend) and a seed, nothing else
        def __init__(self, model, space, backend, seed=0):
            self.space, self.seed = space, seed

        def evaluate(self, assignment, fidelity):
            raise NotImplementedError

        def spec(self):
            return {"name": "minimal_zz", "seed": self.seed}

    try:
        space = SearchSpace.from_model(tiny, bits=(2, 4), ranks=(0, 4))
        ev = build_evaluator(OptimizeConfig(evaluator="minimal_zz", seed=5), tiny, space=space, backend="hqq")
        assert isinstance(ev, Minimal) and ev.seed == 5 and 16 in ev.space.bits
        with pytest.raises(ValueError, match=r"evaluator 'minimal_zz' does not take the option\(s\) \['limit'\]"):
            OptimizeConfig(evaluator="minimal_zz", evaluator_options={"limit": 3})
        fin = build_evaluator(OptimizeConfig(seed=5), tiny, "test", final=True, space=space, backend="hqq", seed=7)
        assert type(fin) is FinetuneEvaluator and fin.eval_split == "test" and fin.seed == 7
        assert not fin.track_peak and not fin.rungs and fin.eval_blocks is None
    finally:
        EVALUATORS._classes.pop("minimal_zz", None)


def test_prepare_builds_the_search_evaluator_as_before(tiny):
    """build_evaluator gives preparation.prepare the evaluator it built inline before (same spec: same trial keys)."""
    from autoqra.evaluators.data import ByteTokenizer, build_task_data
    from autoqra.preparation import prepare

    cfg = OptimizeConfig(**{k: v for k, v in FAST.items() if k != "progress"}, seed=3)
    su = prepare(tiny, cfg)
    data = build_task_data(cfg.data, ByteTokenizer(tiny.config.vocab_size), block_size=cfg.train.seq_len, seed=3)
    old = FinetuneEvaluator(tiny, su.space.with_unquantized(), su.backend, data=data, tokenizer=None, train=cfg.train,
                            eval_blocks=cfg.resolved("eval_blocks"), seed=3, precision=su.precision, rungs=True,
                            rung_schedule=cfg.rung_schedule, decay_fraction=cfg.decay_fraction)
    assert su.evaluator.spec() == old.spec() and su.evaluator.rungs and su.evaluator.space == old.space


def test_default_bits_follow_the_backend():
    cfg = OptimizeConfig()
    assert cfg.bits is None
    assert cfg.bits_for("hqq") == (2, 3, 4, 8) and cfg.bits_for("bnb") == (4, 8) and cfg.bits_for("none") == (16,)
    assert OptimizeConfig(bits=[2, 4]).bits_for("bnb") == (2, 4)  # explicit bits are kept (and refused later)
    assert OptimizeConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_bnb_with_the_default_bits_searches_the_backends_ladder(tiny):
    fast = {k: v for k, v in FAST.items() if k != "bits"}
    res = autoqra.optimize(tiny, "4bit", backend="bnb", seed=0, max_trials=3, phase2=None, **fast)
    assert set(res.space.bits) <= {4, 8, 16} and {4, 8} <= set(res.space.bits)
    assert res.config["bits"] is None
    with pytest.raises(ValueError, match=r"backend 'bnb' does not support bits \[2\]"):
        autoqra.optimize(tiny, "4bit", backend="bnb", **{**fast, "bits": (2, 4)})
