import math

import pytest
import torch

from autoqra.config import TrainSpec
from autoqra.evaluators import EvalResult, Fidelity, FinetuneEvaluator, LMEvalEvaluator, evaluator_class
from autoqra.evaluators import finetune as ft
from autoqra.space import SearchSpace

TRAIN = TrainSpec(batch_size=4, seq_len=64, lr=2e-3)


@pytest.fixture(scope="module")
def setup(tiny):
    space = SearchSpace.from_model(tiny, bits=(2, 4, 8, 16), ranks=(0, 8, 16))
    return space, FinetuneEvaluator(tiny, space, "hqq", train=TRAIN, eval_blocks=8)


def test_registry_and_spec(setup):
    space, ev = setup
    assert evaluator_class("finetune") is FinetuneEvaluator
    assert evaluator_class("lm_eval") is LMEvalEvaluator
    s = ev.spec()
    assert s["train"]["lr"] == 2e-3 and s["data"]["source"] == "pydoc" and s["seed"] == 0
    with pytest.raises(ValueError, match="registered evaluators"):
        evaluator_class("nope")


def test_training_lowers_heldout_loss_and_is_deterministic(setup):
    space, ev = setup
    a = space.uniform(8, 16)
    r0 = ev.evaluate(a, Fidelity(0))
    r1 = ev.evaluate(a, Fidelity(12))
    r2 = ev.evaluate(a, Fidelity(12))
    assert r0.ok and r1.ok
    assert r1.score > r0.score + 0.05, (r0.score, r1.score)  # real training happened
    assert r1.score == r2.score and r1.metrics == r2.metrics  # same call twice: same to the last digit
    assert r1.metrics["train_loss_last"] < r1.metrics["train_loss_first"]
    assert math.isclose(r1.metrics["ppl"], math.exp(-r1.score), rel_tol=1e-9)
    assert 0 <= r1.metrics["accuracy"] <= 1
    assert r1.memory["model_bytes"] > 0 and r1.memory["peak_bytes"] > 0
    assert r1.memory["optimizer_bytes"] == 2 * r1.memory["lora_bytes"] + 4 * 28


def test_seed_changes_result(tiny, setup):
    space, ev = setup
    other = FinetuneEvaluator(tiny, space, "hqq", train=TRAIN, eval_blocks=8, data=ev.data, seed=1)
    a = space.uniform(4, 8)
    assert other.evaluate(a, Fidelity(3)).score != ev.evaluate(a, Fidelity(3)).score


def test_nan_loss_is_recorded_not_raised(setup, monkeypatch):
    space, ev = setup
    real_build = ev.build

    def poisoned(a, seed=None):
        m = real_build(a, seed)
        m.get_base_model().lm_head.register_forward_hook(lambda mod, inp, out: out * float("nan"))
        return m

    monkeypatch.setattr(ev, "build", poisoned)
    r = ev.evaluate(space.uniform(4, 8), Fidelity(2))
    assert r.status == "nan" and not r.ok and "nan" in r.error.lower()


@pytest.mark.parametrize(
    "exc, status",
    [
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
        (getattr(torch.cuda, "OutOfMemoryError", RuntimeError)("CUDA out of memory"), "oom"),
        (ValueError("broken layer"), "failed"),
    ],
)
def test_faults_become_statuses(setup, monkeypatch, exc, status):
    space, ev = setup

    def boom(a, seed=None):
        raise exc

    monkeypatch.setattr(ev, "build", boom)
    r = ev.evaluate(space.uniform(4, 8), Fidelity(1))
    assert isinstance(r, EvalResult) and r.status == status and str(exc) in r.error and r.score == -math.inf


def test_cuda_branch_uses_autocast_mocked(monkeypatch):
    """auto on a GPU: bf16 with native bf16 (capability >= 8), else fp16; autocast gets the device type."""
    import autoqra.precision as pr

    calls = {}

    def fake_autocast(device_type, dtype):
        calls["args"] = (device_type, dtype)
        return "ctx"

    monkeypatch.setattr(pr.torch, "autocast", fake_autocast)
    monkeypatch.setattr(pr.torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    p = pr.resolve_precision("auto", torch.device("cuda"))
    assert pr.autocast(torch.device("cuda"), p) == "ctx" and calls["args"] == ("cuda", torch.bfloat16)
    monkeypatch.setattr(pr.torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    p = pr.resolve_precision("auto", torch.device("cuda"))
    assert p == "fp16" and pr.grad_scaler("cpu", p) is not None
    pr.autocast(torch.device("cuda"), p)
    assert calls["args"] == ("cuda", torch.float16)
    assert not isinstance(pr.autocast(torch.device("cpu"), "fp32"), str)


def test_lr_schedule():
    f = ft.lr_lambda(TrainSpec(warmup_steps=2, schedule="cosine"), 10)
    assert f(0) < f(1) < f(2) == 1.0 and f(10) == pytest.approx(0.0) and f(6) == pytest.approx(0.5)
    g = ft.lr_lambda(TrainSpec(schedule="constant"), 10)
    assert g(0) == g(9) == 1.0


def test_bad_options(tiny, setup):
    space, _ = setup
    with pytest.raises(ValueError, match="eval_split"):
        FinetuneEvaluator(tiny, space, "hqq", eval_split="train")
    with pytest.raises(ValueError, match="batch_size"):
        TrainSpec(batch_size=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainSpec(schedule="linear")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["hqq", "bnb", "gptq", "none"])
def test_real_cuda_evaluation(backend):
    """A real GPU trial on its own model (the session's CPU model is never moved): ok, every
    tensor on the GPU, measured bytes = predicted bytes."""
    from autoqra.memory.model import MemoryModel
    from autoqra.models import tiny_llama

    model = tiny_llama(seed=0).to("cuda")
    bits = {"hqq": 4, "bnb": 4, "gptq": 4, "none": 16}[backend]
    space = SearchSpace.from_model(model, bits=(bits,), ranks=(8,))
    ev = FinetuneEvaluator(model, space, backend, train=TRAIN, eval_blocks=4, precision="auto")
    a = space.uniform(bits, 8)
    r = ev.evaluate(a, Fidelity(3))
    assert r.ok, r.error
    assert r.memory["peak_bytes"] > 0 and ev.spec()["device"] == "cuda"
    pm = ev.build(a)
    assert all(p.device.type == "cuda" for p in pm.parameters())
    mm = MemoryModel(model, space, ev.backend, train=TRAIN)
    assert r.memory["model_bytes"] == mm.predict(a).model_bytes


@pytest.mark.slow
def test_smollm2_short_finetune_and_lm_eval(smollm2):
    model, tok = smollm2
    space = SearchSpace.from_model(model, bits=(4,), ranks=(8,))
    ev = FinetuneEvaluator(model, space, "hqq", tokenizer=tok, train=TrainSpec(batch_size=2, seq_len=64), eval_blocks=4)
    r0, r2 = ev.evaluate(space.uniform(4, 8), Fidelity(0)), ev.evaluate(space.uniform(4, 8), Fidelity(2))
    assert r0.ok and r2.ok and 0.5 < -r0.score < 5.0
    lm = LMEvalEvaluator(model, space, "hqq", tokenizer=tok, data=ev.data, train=ev.train, limit=24, batch_size=8)
    r = lm.evaluate(space.uniform(4, 8), Fidelity(1))
    assert r.ok, r.error
    assert 0.0 <= r.score <= 1.0 and "acc" in r.metrics and r.metrics["main_metric"] == r.score
