"""Rungs continue each other exactly; LoRA init is common across candidates (paired comparisons)."""

import pytest
import torch

from autoqra.config import TrainSpec
from autoqra.evaluators.base import Fidelity
from autoqra.evaluators.finetune import FinetuneEvaluator
from autoqra.space import SearchSpace

TRAIN = TrainSpec(batch_size=2, seq_len=32, lr=2e-3, lora_dropout=0.0, warmup_steps=1)


@pytest.fixture(scope="module")
def space(tiny):
    return SearchSpace.from_model(tiny, bits=(4, 8, 16), ranks=(0, 4, 8))


def _ev(tiny, space, **kw):
    return FinetuneEvaluator(tiny, space, "hqq", train=TRAIN, eval_blocks=4, precision="fp32", **kw)


def test_continued_rung_equals_a_fresh_run(tiny, space):
    a = space.make([4, 8], [8, 4])
    ev = _ev(tiny, space, rungs=True)
    r3 = ev.evaluate(a, Fidelity(3))
    r7 = ev.evaluate(a, Fidelity(7))  # continues the 3-step state
    assert ev.rung_states.hits == 1 and ev.rung_states.misses == 1
    fresh = _ev(tiny, space, rungs=True).evaluate(a, Fidelity(7))
    assert r7.score == fresh.score and r7.score != r3.score
    assert r7.metrics["train_loss_first"] == fresh.metrics["train_loss_first"]
    assert r7.memory["model_bytes"] == fresh.memory["model_bytes"]
    again = ev.evaluate(a, Fidelity(7))  # fully cached: no training, same score
    assert again.score == r7.score and ev.rung_states.hits == 2
    # what each wall time paid for (the progress ETA reads it)
    assert [r.metrics["steps_run"] for r in (r3, r7, fresh, again)] == [3, 4, 7, 0]


def test_rung_mode_trains_at_a_constant_rate_and_says_so(tiny, space):
    ev, final = _ev(tiny, space, rungs=True), _ev(tiny, space)
    assert ev.spec()["schedule"] == "constant" and final.spec()["schedule"] == "cosine"
    a = space.make([4, 4], [8, 8])
    assert ev.evaluate(a, Fidelity(4)).score != final.evaluate(a, Fidelity(4)).score


def test_common_init_is_nested_and_shared_across_candidates(tiny, space):
    ev = _ev(tiny, space)
    a, b = space.make([4, 4], [8, 8]), space.make([4, 8], [4, 8])  # unit 0's rank and unit 1's bits differ
    pa, pb = ev.build(a), ev.build(b)
    wa = {n: p for n, p in pa.named_parameters() if "lora_A" in n}
    wb = {n: p for n, p in pb.named_parameters() if "lora_A" in n}
    for n, p in wa.items():
        q = wb[n]
        if ".layers.1." in n:
            assert torch.equal(p, q)  # unit 1: same rank, same init although its bits differ
        else:
            assert p.shape[0] == 8 and q.shape[0] == 4 and torch.equal(p[:4], q)  # nested
    peft = _ev(tiny, space, common_init=False)
    pc = peft.build(b)
    wc = {n: p for n, p in pc.named_parameters() if "lora_A" in n}
    assert not all(torch.equal(wb[n], wc[n]) for n in wb)  # peft's own init is something else


def test_wsd_rungs_continue_the_stable_phase_and_end_with_their_own_decay(tiny, space):
    a = space.make([4, 8], [8, 4])
    ev = _ev(tiny, space, rungs=True, rung_schedule="wsd", decay_fraction=0.25)
    assert ev.spec()["schedule"] == "wsd:0.25"
    r4 = ev.evaluate(a, Fidelity(4))  # stable 3 steps (state kept), 1 decay step
    r8 = ev.evaluate(a, Fidelity(8))  # continues from step 3, stable to 6, 2 decay steps
    assert ev.rung_states.hits == 1 and ev.rung_states.misses == 1
    fresh = _ev(tiny, space, rungs=True, rung_schedule="wsd", decay_fraction=0.25).evaluate(a, Fidelity(8))
    assert r8.score == fresh.score and r8.score != r4.score
    constant = _ev(tiny, space, rungs=True).evaluate(a, Fidelity(8))
    assert constant.score != r8.score  # the decay changes what is scored


def test_wsd_schedule_shape():
    from autoqra.evaluators.finetune import decay_steps, wsd_lambda

    assert [decay_steps(n, 0.2) for n in (0, 1, 4, 10, 30, 60)] == [0, 1, 1, 2, 6, 12]
    f = wsd_lambda(8, 10, warmup=2)
    assert [round(f(i), 4) for i in range(10)] == [0.3333, 0.6667, 1, 1, 1, 1, 1, 1, 0.6667, 0.3333]
    with pytest.raises(ValueError, match="rung_schedule"):
        FinetuneEvaluator(None, None, rung_schedule="cosine")
