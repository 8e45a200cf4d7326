"""Devices and precisions: resolution, every backend training at every precision, store separation, tokenizer."""

import math

import pytest
import torch

import autoqra
import autoqra.precision as pr
from autoqra.config import OptimizeConfig, TrainSpec
from autoqra.evaluators.base import Fidelity
from autoqra.evaluators.finetune import FinetuneEvaluator
from autoqra.guidance.importance import compute_importance
from autoqra.memory.model import MemoryModel
from autoqra.models import tiny_llama
from autoqra.quant_backends import backend_for_precision
from autoqra.space import SearchSpace

TRAIN = TrainSpec(batch_size=2, seq_len=32, lr=2e-3)
BITS = {"none": 16, "hqq": 4, "bnb": 4, "gptq": 4}


@pytest.fixture(scope="module")
def tiny_by_precision():
    return {p: tiny_llama(seed=0, dtype=pr.DTYPES[p]) for p in ("fp32", "bf16", "fp16")}


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(pr, "cpu_bf16_native", lambda: True)
    assert pr.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(pr, "cpu_bf16_native", lambda: False)
    assert pr.resolve_precision("auto", "cpu") == "fp32"
    assert pr.resolve_precision("fp16", "cpu") == "fp16"


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    monkeypatch.setattr(pr, "Path", lambda _p: f)
    pr.cpu_bf16_native.cache_clear()
    try:
        assert pr.cpu_bf16_native() is False
        f.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
        pr.cpu_bf16_native.cache_clear()
        assert pr.cpu_bf16_native() is True
    finally:
        pr.cpu_bf16_native.cache_clear()


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match=r"precision='int8'.*auto"):
        OptimizeConfig(precision="int8")
    with pytest.raises(ValueError, match=r"device='gpu0'"):
        OptimizeConfig(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            pr.resolve_device("cuda")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", ["none", "hqq", "bnb", "gptq"])
def test_every_backend_trains_at_every_precision(tiny_by_precision, backend, precision):
    """A real trial: ok, finite loss that training lowers, LoRA stays fp32, measured bytes = predicted bytes."""
    model = tiny_by_precision[precision]
    be = backend_for_precision(backend, precision)
    space = SearchSpace.from_model(model, bits=(BITS[backend],), ranks=(8,))
    ev = FinetuneEvaluator(model, space, be, train=TRAIN, eval_blocks=4, precision=precision, calib_blocks=4)
    assert ev.spec()["precision"] == precision and ev.spec()["device"] == "cpu"
    a = space.uniform(BITS[backend], 8)
    r0, r = ev.evaluate(a, Fidelity(0)), ev.evaluate(a, Fidelity(4))
    assert r.ok and r0.ok, r.error or r0.error
    assert math.isfinite(r.score) and r.score > r0.score  # 4 steps at lr 2e-3 lower the held-out loss
    pm = ev.build(a)
    assert {p.dtype for n, p in pm.named_parameters() if "lora_" in n} == {torch.float32}
    mm = MemoryModel(model, space, be, train=TRAIN)
    assert r.memory["model_bytes"] == mm.predict(a).model_bytes


def test_importance_priors_under_bf16(tiny_by_precision):
    model = tiny_by_precision["bf16"]
    be = backend_for_precision("hqq", "bf16")
    space = SearchSpace.from_model(model, bits=(2, 4, 8), ranks=(0, 8))
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    imp = compute_importance(model, space, be, ids, precision="bf16")
    assert imp.raw_q.shape == (space.n_units,) and (imp.raw_q > 0).all() and (imp.raw_r > 0).all()
    assert torch.isfinite(torch.tensor(imp.raw_q)).all()


FAST = dict(preset="tiny", bits=(2, 4, 8), ranks=(0, 4, 8), train=TRAIN, eval_blocks=4, importance_blocks=4,
            progress=False, max_trials=3, phase2=None)


def test_a_store_refuses_to_mix_precisions(tmp_path):
    model = tiny_llama(seed=0)
    store = tmp_path / "t.db"
    res = autoqra.optimize(model, "4bit", store=store, precision="fp32", **FAST)
    assert res.info["precision"] == "fp32" and res.info["tokenizer"].startswith("bytes")
    with pytest.raises(ValueError, match="precision"):
        autoqra.optimize(model, "4bit", store=store, precision="bf16", **FAST)


def test_a_real_model_without_tokenizer_is_refused():
    model = tiny_llama(seed=0)
    object.__setattr__(model, "_autoqra_source", None)  # not the tiny test model any more
    with pytest.raises(ValueError, match="tokenizer="):
        autoqra.optimize(model, "4bit", **FAST)


def test_memory_is_planned_in_the_configs_dtype(tmp_path, capsys):
    """`autoqra memory --model-config` plans in the config's torch_dtype (bf16 here): unquantized tensors
    and HQQ scale/zero take half the fp32 bytes; --dtype overrides it."""
    import json

    from autoqra.cli.main import main

    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 16384, "torch_dtype": "bfloat16"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = {}
    for dtype in (None, "fp32"):
        args = ["memory", "--model-config", str(path), "--bits", "4", "--json"] + (["--dtype", dtype] if dtype else [])
        assert main(args) == 0
        out[dtype] = json.loads(capsys.readouterr().out)
    bf, fp = out[None], out["fp32"]
    assert bf["precision"] == "bf16" and fp["precision"] == "fp32"
    b, f = bf["breakdowns"]["4-bit r8"], fp["breakdowns"]["4-bit r8"]
    # parameters halve; fp32 buffers (the rotary inv_freq tables) do not
    from autoqra.models import from_config

    fp32_buffers = sum(t.numel() * 4 for t in from_config(cfg).buffers() if t.dtype == torch.float32)
    assert 0 < fp32_buffers and 2 * b["unquantized_bytes"] - fp32_buffers == f["unquantized_bytes"]
    assert 2 * b["quant_meta_bytes"] == f["quant_meta_bytes"]
    assert b["quant_weight_bytes"] == f["quant_weight_bytes"] and b["lora_bytes"] == f["lora_bytes"]  # LoRA stays fp32
    assert b["activation_bytes"] < f["activation_bytes"]
