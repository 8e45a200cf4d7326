import json

import numpy as np
import pytest

from autoqra.space import Assignment, SearchSpace


def test_block_units_group_seven_linears(tiny):
    sp = SearchSpace.from_model(tiny)
    assert sp.n_units == 2
    assert all(len(u.modules) == 7 for u in sp.units)
    assert sp.units[1].name == "model.layers.1"
    assert sp.bits == (2, 3, 4, 8) and sp.ranks == (0, 4, 8, 16)


def test_module_granularity_and_targets(tiny):
    sp = SearchSpace.from_model(tiny, granularity="module")
    assert sp.n_units == 14
    sp2 = SearchSpace.from_model(tiny, granularity="module", target_modules=["q_proj", "v_proj"])
    assert [u.name.rsplit(".", 1)[1] for u in sp2.units] == ["q_proj", "v_proj"] * 2


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"granularity": "layer"}, "granularity"),
        ({"bits": []}, "bits must not be empty"),
        ({"bits": [0, 4]}, "outside"),
        ({"ranks": [-1, 4]}, "outside"),
        ({"target_modules": ["nope"]}, "target_modules"),
        ({"bits": [3, 4], "backend": "none"}, "does not support bits"),
    ],
)
def test_bad_input_raises(tiny, kw, msg):
    with pytest.raises(ValueError, match=msg):
        SearchSpace.from_model(tiny, **kw)


def test_assignment_hash_json_roundtrip(tiny):
    sp = SearchSpace.from_model(tiny)
    a = sp.make([2, 8], [0, 16])
    b = Assignment.from_json(a.to_json())
    assert a == b and hash(a) == hash(b)
    assert {a, b} == {a}
    assert json.loads(a.to_json())["bits"] == [2, 8]
    assert a != sp.make([2, 8], [4, 16])


def test_encode_decode_and_neighbours(tiny):
    sp = SearchSpace.from_model(tiny)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = sp.sample(rng)
        assert sp.decode(sp.encode(a)) == a
    a = sp.make([2, 4], [8, 16])
    nb = sp.neighbours(a)
    # unit0 bits: up only; unit1 bits: up+down; unit0 rank: up+down; unit1 rank: down only
    assert len(nb) == 1 + 2 + 2 + 1
    for n in nb:
        d = np.abs(sp.encode(n) - sp.encode(a))
        assert d.sum() == 1
    assert len(set(nb)) == len(nb)
    o = sp.ordinal(sp.maximum())
    assert np.allclose(o, 1.0) and np.allclose(sp.ordinal(sp.minimum()), 0.0)


def test_validate_rejects_foreign_assignment(tiny):
    sp = SearchSpace.from_model(tiny)
    with pytest.raises(ValueError, match="outside the ladders"):
        sp.make([5, 4], [8, 8])
    with pytest.raises(ValueError, match="units do not match"):
        sp.validate(Assignment(("x",), (4,), (8,)))
    with pytest.raises(ValueError, match="one bits and one rank per unit"):
        Assignment(("a", "b"), (4,), (8, 8))


def test_module_map_and_lora_config(tiny):
    sp = SearchSpace.from_model(tiny)
    a = sp.make([4, 8], [0, 16])
    mm = sp.module_map(a)
    assert mm["model.layers.0.mlp.down_proj"] == (4, 0)
    assert mm["model.layers.1.self_attn.q_proj"] == (8, 16)
    cfg = sp.lora_config(a)
    assert cfg.rank_pattern["model.layers.1.self_attn.q_proj"] == 16
    assert cfg.alpha_pattern["model.layers.1.self_attn.q_proj"] == 32
    assert "model.layers.0.mlp.down_proj" in cfg.exclude_modules
    assert "model.layers.0.mlp.down_proj" not in cfg.target_modules
    with pytest.raises(ValueError, match="nothing to fine-tune"):
        sp.lora_config(sp.uniform(4, 0))


def test_llama_spec_keeps_its_short_form(tiny):
    """Llama units stay [name, modules, shapes] (trial stores and benchmark caches key on the spec)."""
    from autoqra.space import Unit

    sp = SearchSpace.from_model(tiny)
    u = sp.spec()["units"][0]
    assert len(u) == 3 and u[0] == "model.layers.0" and len(u[1]) == 7 and u[2][0] == [128, 128]
    assert Unit(u[0], tuple(u[1]), tuple(map(tuple, u[2]))) == sp.units[0]
    assert [t.kind for t in sp.units[0].tensors] == ["linear"] * 7
    assert SearchSpace.from_spec(sp.spec()) == sp and SearchSpace.from_spec(sp.to_dict()).coverage == sp.coverage
    assert sp.coverage.share == 1.0


def test_space_for_infers_module_granularity(tiny):
    from autoqra.apply import space_for

    sp = SearchSpace.from_model(tiny, bits=(4, 8), ranks=(0, 8), granularity="module", target_modules=["q_proj"])
    a = sp.make([4, 8], [8, 0])
    assert space_for(tiny, a).unit_names == sp.unit_names
    sub = SearchSpace.from_model(tiny, bits=(4, 8), ranks=(0, 8), granularity="sublayer")
    b = sub.make([4, 8] * (sub.n_units // 2), [8, 0] * (sub.n_units // 2))
    assert space_for(tiny, b).unit_names == sub.unit_names and sub.granularity == "sublayer"
