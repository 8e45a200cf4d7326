"""Choosing each bit-width's group size before the search (autoqra.guidance.formats) and prepare's use of it."""

import copy

import pytest
import torch

from autoqra.config import OptimizeConfig, TrainSpec
from autoqra.guidance import formats as fm
from autoqra.models import tiny_llama
from autoqra.preparation import prepare
from autoqra.quant_backends.hqq import HQQBackend
from autoqra.space import SearchSpace
from autoqra.store import TrialStore

CFG = dict(preset="tiny", bits=(2, 4, 8), ranks=(4, 8), train=TrainSpec(batch_size=2, seq_len=32, lr=2e-3),
           eval_blocks=4, importance_blocks=4, precision="fp32")


def _snap(w: torch.Tensor, bits: int = 4, group: int = 32) -> torch.Tensor:
    """``w`` rounded to an asymmetric ``bits``-bit grid in row groups of ``group`` (what a Q4_1 GGUF stores)."""
    g = w.reshape(-1, group)
    lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    scale = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
    return (torch.round((g - lo) / scale) * scale + lo).reshape(w.shape)


@pytest.fixture(scope="module")
def gridded(tiny):
    """The tiny model with every decoder linear already on a 4-bit grid in groups of 32."""
    m = copy.deepcopy(tiny)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.copy_(_snap(mod.weight))
    return m


def _blocks(model, n=4, seq=32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (n, seq), generator=g)


def test_weights_on_a_group_32_grid_get_groups_of_32_at_4_bits(gridded):
    space = SearchSpace.from_model(gridded, bits=(2, 4, 8), ranks=(4, 8), embeddings="search")
    fc = fm.choose_formats(gridded, space, HQQBackend(), _blocks(gridded))
    rows = {(r["bits"], r["group_size"]): r for r in fc.rows}
    assert rows[4, 32]["kl"] < 0.2 * rows[4, 64]["kl"]  # the grid is found again
    assert rows[4, 32]["decoder_bytes"] > rows[4, 64]["decoder_bytes"] > rows[4, 128]["decoder_bytes"]
    assert fc.group_sizes[4] == 32 and fc.changed(HQQBackend()) .get(4) == 32
    assert fc.group_sizes[8] == 64 and [r["group_size"] for r in fc.rows if r["bits"] == 8] == [64]  # top: kept
    assert fc.rates[4] > 0 and rows[4, 32]["chosen"] and not rows[4, 64]["chosen"]


def test_the_rule_prices_bytes_at_the_ladders_rate(tiny):
    space = SearchSpace.from_model(tiny, bits=(2, 4, 8), ranks=(4, 8))
    fc = fm.choose_formats(tiny, space, HQQBackend(), _blocks(tiny), min_gain=0.0)
    rows = {(r["bits"], r["group_size"]): r for r in fc.rows}
    assert rows[2, 64]["kl"] > rows[4, 64]["kl"] > rows[8, 64]["kl"] > 0
    up = rows[8, 64]  # 4 bits are priced against the top rung, 2 bits against 4 bits in its chosen format
    lam4 = (rows[4, 64]["kl"] - up["kl"]) / (up["decoder_bytes"] - rows[4, 64]["decoder_bytes"])
    assert fc.rates[4] == pytest.approx(lam4)
    for g in (32, 64, 128):
        r = rows[4, g]
        assert r["cost"] == pytest.approx(r["kl"] + lam4 * (r["decoder_bytes"] - rows[4, 64]["decoder_bytes"]))
    assert fc.group_sizes[4] == min((32, 64, 128), key=lambda g: rows[4, g]["cost"])
    c4 = rows[4, fc.group_sizes[4]]
    assert fc.rates[2] == pytest.approx((rows[2, 64]["kl"] - c4["kl"]) / (c4["decoder_bytes"] - rows[2, 64]["decoder_bytes"]))
    back = fm.FormatChoice.from_dict(fc.to_dict())
    assert back.group_sizes == fc.group_sizes and back.rates == pytest.approx(fc.rates)


def test_a_group_size_the_embedding_cannot_take_is_not_offered():
    m = tiny_llama(seed=1, hidden_size=192, intermediate_size=384)  # 192 % 128 != 0: no 4/8-bit embedding at 128
    space = SearchSpace.from_model(m, bits=(4, 8), ranks=(4,), embeddings="search")
    fc = fm.choose_formats(m, space, HQQBackend(), _blocks(m))
    assert {r["group_size"] for r in fc.rows if r["bits"] == 4} == {32, 64}


def test_a_backend_without_group_sizes_is_refused(tiny):
    from autoqra.quant_backends import get_backend

    space = SearchSpace.from_model(tiny, bits=(4, 8), ranks=(4,))
    be = get_backend("none")
    assert not fm.supports_formats(be)
    with pytest.raises(ValueError, match="no group size per bit-width"):
        fm.choose_formats(tiny, space, be, _blocks(tiny))


def test_prepare_builds_in_the_chosen_formats_at_the_same_budget(gridded, monkeypatch):
    chosen = prepare(gridded, OptimizeConfig(**CFG), choose=True)
    fixed = prepare(gridded, OptimizeConfig(**CFG, formats="fixed"), choose=True)
    assert fixed.formats is None and fixed.backend.group_sizes[4] == 64
    assert chosen.formats is not None and chosen.backend.group_sizes[4] == 32
    assert chosen.evaluator.backend is chosen.backend and chosen.memory.backend.group_sizes[4] == 32
    assert chosen.budget_bytes == fixed.budget_bytes  # "4bit" names the default format's bytes
    a = chosen.space.uniform(4, 8)
    assert chosen.memory.predict(a).model_bytes > fixed.memory.predict(a).model_bytes
    given = prepare(gridded, OptimizeConfig(**CFG, backend_options={"group_size": 64}), choose=True)
    assert given.formats is None and given.backend.group_sizes[4] == 64  # the user's group size is kept
    assert prepare(gridded, OptimizeConfig(**CFG)).formats is None  # benchmarks' evaluation: nothing chosen
    st = TrialStore(None)
    first = prepare(gridded, OptimizeConfig(**CFG), choose=True, store=st)
    monkeypatch.setattr("autoqra.preparation.choose_formats", lambda *a, **k: pytest.fail("measured again"))
    again = prepare(gridded, OptimizeConfig(**CFG), choose=True, store=st)  # read back from the store
    assert again.backend.spec() == first.backend.spec() == chosen.backend.spec()


def test_optimize_searches_in_the_chosen_formats_and_says_so(gridded, tmp_path):
    import autoqra
    from autoqra.result import load_result

    res = autoqra.optimize(gridded, "4bit", **{**CFG, "precision": "fp32"}, max_trials=8, phase2=None, final_rung=False,
                           progress=False, store=tmp_path / "t.db")
    assert res.info["formats"]["group_sizes"]["4"] == 32
    assert res.info["backend_spec"]["group_size"]["4"] == 32  # what Result.train / export rebuild the backend from
    assert "4-bit in groups of 32" in res.summary()
    uni = res.baselines["uniform-4bit-r4"]  # g32 costs more: r8 no longer fits the default format's "4bit" bytes
    assert uni.memory.model_bytes <= res.budget_bytes and "uniform-4bit-r8" not in res.baselines
    back = load_result(res.save(tmp_path / "run"))
    assert back.info["formats"] == res.info["formats"] and "groups of 32" in back.summary()
