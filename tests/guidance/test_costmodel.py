"""The calibrated cost model: measured damage per bit-width, leave-one-out adapter gains, calibration."""

import numpy as np
import pytest

from autoqra.config import TrainSpec
from autoqra.evaluators.finetune import FinetuneEvaluator
from autoqra.guidance.costmodel import CostModel, calibrate_quant_scale, measure_cost_model
from autoqra.space import SearchSpace


@pytest.fixture(scope="module")
def cm_and_space(tiny):
    space = SearchSpace.from_model(tiny, bits=(2, 4, 8), ranks=(0, 4, 8))
    ev = FinetuneEvaluator(tiny, space.with_unquantized(), "hqq", train=TrainSpec(batch_size=2, seq_len=32, lr=2e-3),
                           eval_blocks=4, precision="fp32", rungs=True)
    cm = measure_cost_model(ev, space, ev.data.train[:4], steps=4)
    return cm, space


def test_damage_falls_with_bits_and_no_unit_is_free(cm_and_space):
    cm, space = cm_and_space
    assert cm.quant.shape == (space.n_units, 3) and cm.rank_gain.shape == (space.n_units, 3)
    assert (cm.quant[:, 0] > cm.quant[:, 1]).all() and (cm.quant[:, 1] >= cm.quant[:, 2]).all()
    assert (cm.quant[:, 0] > 0).all()  # measured, not min-max normalised: the least sensitive unit pays too
    assert (cm.rank_gain[:, 0] == 0).all()  # rank 0 buys nothing
    assert (cm.rank_gain >= 0).all() and (np.diff(cm.rank_gain, axis=1) >= 0).all()  # never negative, monotone
    assert cm.rank_gain[:, 1:].max() > 0
    assert (cm.rank_gain_probe[:, 1] == cm.rank_gain_probe[:, 2]).all()  # the previous table, kept to compare
    assert set(cm.rank_info["whole"]) == {"1", "4"}  # all-adapter gain at two horizons (steps // 3 and steps)


def test_table_predict_and_round_trip(cm_and_space):
    cm, space = cm_and_space
    t = cm.table(space)
    a = space.make([2, 8], [4, 0])
    assert t.shape == (space.n_units, 3, 3)
    assert cm.predict(a) == pytest.approx(t[0, 0, 1] + t[1, 2, 0])
    back = CostModel.from_dict(cm.to_dict())
    assert back.predict(a) == pytest.approx(cm.predict(a)) and back.steps == 4
    assert np.array_equal(back.rank_gain_probe, cm.rank_gain_probe) and back.rank_info == cm.rank_info


def test_calibration_recovers_the_scale_and_skips_collapsed_points(cm_and_space):
    cm, space = cm_and_space
    pts = [space.uniform(b, r) for b in (2, 4, 8) for r in (0, 4)]
    true_c = 0.3
    scores = [-3.0 + cm.gain(a) - true_c * cm.damage(a) for a in pts]
    assert calibrate_quant_scale(cm, pts, scores) == pytest.approx(true_c)
    scores[0] -= 5.0  # uniform 2-bit collapses: off the line, left out
    assert calibrate_quant_scale(cm, pts, scores) == pytest.approx(true_c)
    assert calibrate_quant_scale(cm, pts[:1], scores[:1]) is None  # one point says nothing


@pytest.mark.parametrize("granularity", ["block", "sublayer", "module"])
def test_prefix_replay_gives_the_full_pass_table(tiny, granularity):
    import torch

    from autoqra.guidance.costmodel import quant_damage
    from autoqra.quant_backends import get_backend

    space = SearchSpace.from_model(tiny, bits=(2, 4, 16), ranks=(0, 4), granularity=granularity)
    batches = [torch.randint(0, tiny.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    fast = quant_damage(tiny, space, get_backend("hqq"), batches, replay=True)
    full = quant_damage(tiny, space, get_backend("hqq"), batches, replay=False)
    assert np.array_equal(fast, full)
    assert (fast[:, 0] > 0).all() and (fast[:, -1] == 0).all()


def test_prefix_replay_skips_the_prefix_and_refuses_other_inputs(tiny):
    import torch

    from autoqra.guidance.prefix import PrefixReplay, decoder_layers, first_layer

    layers, path = decoder_layers(tiny, ["model.layers.1.mlp.up_proj", "model.layers.0.self_attn.q_proj"])
    assert path == "model.layers" and layers is tiny.model.layers
    assert first_layer(["base_model.model.model.layers.1.mlp.up_proj"], path) == 1  # a peft-wrapped name
    assert first_layer(["model.layers.1.mlp.up_proj", "lm_head"], path) == 0  # outside the stack: run whole
    assert decoder_layers(tiny, ["lm_head"]) is None
    inert = PrefixReplay.find(tiny, ["model.layers.1.mlp.up_proj"], enabled=False)
    assert inert.layers is None and inert.first_layer(["model.layers.1.mlp.up_proj"]) == 0
    assert PrefixReplay.find(tiny, ["model.layers.1.mlp.up_proj"]).first_layer(["model.layers.1.mlp.up_proj"]) == 1
    ids = torch.randint(0, tiny.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    handle = tiny.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    rp = PrefixReplay(layers)
    with torch.no_grad(), handle:
        with rp.record():
            ref = tiny(input_ids=ids).logits
        n = len(calls)
        with rp.below(1):
            again = tiny(input_ids=ids).logits
        assert len(calls) == n  # layer 0 was not run
        assert torch.equal(ref, again) and tiny.model.layers[0] is not None
        assert type(tiny.model.layers[0]).__name__ != "_Replay"  # restored
        with pytest.raises(RuntimeError, match="does not match"), rp.below(1):
            tiny(input_ids=ids[:1])
        with pytest.raises(RuntimeError, match="replayed 2 times"), rp.below(1):
            tiny(input_ids=ids)
            tiny(input_ids=ids)


def test_leave_one_out_with_replay_equals_the_full_passes(tiny):
    from autoqra.guidance.costmodel import leave_one_out

    space = SearchSpace.from_model(tiny, bits=(4, 8), ranks=(0, 4), granularity="module")
    ev = FinetuneEvaluator(tiny, space.with_unquantized(), "hqq", train=TrainSpec(batch_size=2, seq_len=32, lr=2e-3),
                           eval_blocks=4, precision="fp32", rungs=True)
    assert ev.replayable_score
    pm = ev.build(space.uniform(4, 4))
    ev.fit(pm, 3)
    fast = leave_one_out(ev, pm, space)
    ev.replayable_score = False
    full = leave_one_out(ev, pm, space)
    assert np.array_equal(fast, full) and np.abs(full).max() > 0
