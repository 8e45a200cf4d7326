"""The package's public surface and layout: one Problem, typed trials, one registry type."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import autoqra
from autoqra import _optional
from autoqra.evaluators import EVALUATORS
from autoqra.evaluators.base import EvalResult, Fidelity
from autoqra.executors import EXECUTORS, LocalExecutor, RayExecutor
from autoqra.memory import MemoryBreakdown, MemoryModel
from autoqra.problem import Problem
from autoqra.quant_backends import BACKENDS
from autoqra.registry import Registry
from autoqra.searchers import SEARCHERS
from autoqra.space import SearchSpace
from autoqra.store import TrialStore
from autoqra.trial import Trial


def test_bytes_for_picks_the_target_and_rejects_others():
    bd = MemoryBreakdown(quant_weight_bytes=10, unquantized_bytes=5, lora_bytes=2, lora_grad_bytes=2,
                         optimizer_bytes=4, activation_bytes=100)
    assert bd.bytes_for("model") == 17 == bd.model_bytes
    assert bd.bytes_for("train") == 123 == bd.train_bytes
    with pytest.raises(ValueError, match="target='peak'"):
        bd.bytes_for("peak")


def test_problem_build_repairs_to_the_budget(tiny):
    space = SearchSpace.from_model(tiny, bits=(2, 4, 8), ranks=(0, 4, 8))
    mm = MemoryModel(tiny, space, "hqq")
    budget = mm.predict(space.uniform(4, 4)).model_bytes
    p = Problem.build(space, mm, budget, seed=3)
    big = space.uniform(8, 8)
    assert not p.feasible(big) and p.bytes_of(big) == mm.predict(big).model_bytes
    fixed = p.make_feasible(big)
    assert p.feasible(fixed) and p.bytes_of(fixed) <= budget
    pt = Problem.build(space, mm, mm.predict(space.uniform(4, 4)).train_bytes, target="train")
    assert pt.bytes_of(big) == mm.predict(big).train_bytes
    with pytest.raises(ValueError, match="target='peak'"):
        Problem(space=space, memory=mm, budget_bytes=budget, target="peak", repair=p.repair)
    with pytest.raises(ValueError, match="needs a repair"):
        Problem(space=space, memory=mm, budget_bytes=budget, repair=None)


def test_problem_is_frozen_and_calibration_makes_a_new_one(tiny):
    """A calibration returns a new Problem whose repair reads the new table; the old one is untouched."""
    import attrs
    import numpy as np

    space = SearchSpace.from_model(tiny, bits=(2, 4, 8), ranks=(0, 4, 8))
    mm = MemoryModel(tiny, space, "hqq")
    p = Problem.build(space, mm, mm.predict(space.uniform(4, 4)).model_bytes)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        p.cost_table = None
    table = np.zeros((space.n_units, len(space.bits), len(space.ranks)))
    table[:, 0, :] = -1.0  # 2 bits cost a nat per unit: repair must avoid them
    q = p.with_cost_table(table, [table * 2])
    assert p.cost_table is None and q.cost_table is table and len(q.seed_tables) == 1
    assert q.repair is not p.repair and q.repair.cost_table is not None and p.repair.cost_table is None
    fixed = q.make_feasible(space.uniform(8, 8))
    assert q.feasible(fixed) and 2 not in fixed.bits
    # one footprint: the 16-bit reference too, and the encoded fast path agrees
    ref = space.with_unquantized().uniform(16, 4)
    assert q.bytes_of(ref) == mm.with_space(space.with_unquantized()).predict(ref).model_bytes
    x = space.encode(fixed)
    assert q.bytes_encoded(x) == q.bytes_of(fixed)


def _trial(space, key="k1", score=-1.5):
    return Trial(space.uniform(4, 4), Fidelity(3, "low"), "phase1", EvalResult(score, {"loss": -score}, "ok", "", 2.0,
                 {"peak_bytes": 9}), MemoryBreakdown(quant_weight_bytes=7), key, seed=4, extra={"generation": 1})


def test_store_reads_and_writes_typed_trials(tiny, tmp_path):
    space = SearchSpace.from_model(tiny, bits=(2, 4, 8), ranks=(0, 4, 8))
    with TrialStore(tmp_path / "t.db") as st:
        st.put(_trial(space))
        t = st.get("k1")
        assert isinstance(t, Trial) and t.key == "k1" and t.seq == 1 and t.seed == 4
        assert t.assignment == space.uniform(4, 4) and t.fidelity == Fidelity(3, "low") and t.phase == "phase1"
        assert t.score == -1.5 and t.status == "ok" and t.memory == MemoryBreakdown(quant_weight_bytes=7)
        assert t.measured_memory == {"peak_bytes": 9} and t.seconds == 2.0 and t.extra == {"generation": 1}
        assert [x.key for x in st.trials()] == ["k1"]
        with pytest.raises(TypeError, match="Trial"):  # trials only (no dict form)
            st.put(_trial(space).to_dict())
        with pytest.raises(TypeError):  # typed attributes, no dict access
            _ = t["score"]
    # result.json keeps its trial format
    assert set(_trial(space).to_dict()) == {"assignment", "fidelity", "phase", "result", "memory", "key", "name"}
    assert Trial.from_dict(json.loads(json.dumps(_trial(space).to_dict()))).to_dict() == _trial(space).to_dict()


def test_one_registry_type_for_every_plugin_kind():
    for reg, names in ((BACKENDS, {"hqq", "bnb", "gptq", "none"}), (EVALUATORS, {"finetune", "lm_eval"}),
                       (SEARCHERS, {"nsga2", "turbo", "local", "random", "ax"}), (EXECUTORS, {"local", "ray"})):
        assert isinstance(reg, Registry) and names <= set(reg.names())
        with pytest.raises(ValueError, match="is not registered"):
            reg.get("no-such-plugin")
    assert EXECUTORS.get("local") is LocalExecutor and EXECUTORS.get("ray") is RayExecutor


def test_public_surface():
    for name in ("optimize", "OptimizeConfig", "Problem", "Result", "Trial", "load_artifact", "load_result",
                 "MemoryModel", "SearchSpace", "executors"):
        assert name in autoqra.__all__ and hasattr(autoqra, name)
    assert "load" not in autoqra.__all__ and not hasattr(autoqra, "load")  # load_artifact / load_result only
    assert (Path(autoqra.__file__).parent / "py.typed").is_file()


def test_optional_library_error_names_the_feature_and_the_install():
    with pytest.raises(ImportError, match=r"Phase II 'x' needs no_such_lib_zz.*pip install no_such_lib_zz"):
        _optional.require("no_such_lib_zz.sub", "Phase II 'x'")
    assert _optional.available("numpy") and not _optional.available("no_such_lib_zz")


def test_import_autoqra_leaves_heavy_libraries_unloaded():
    """``import autoqra`` (and the CLI module) import nothing heavy: the public names load on first use,
    and the CLI quiets library messages before peft pulls in bitsandbytes."""
    heavy = "('torch', 'peft', 'bitsandbytes', 'transformers', 'matplotlib', 'botorch', 'ax', 'lm_eval', 'ray', 'gpytorch')"
    code = f"import sys, autoqra, autoqra.cli.main; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves_and_unknown_names_fail():
    assert set(autoqra.__all__) == set(autoqra._EXPORTS)
    for name in autoqra.__all__:
        assert getattr(autoqra, name) is not None and name in dir(autoqra)
    assert autoqra.optimize is autoqra.api.optimize and autoqra.quant_backends.BACKENDS.get("hqq") is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        autoqra.nope  # noqa: B018
