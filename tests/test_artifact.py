"""Final training (checkpoints, resume), export and load in a fresh process with loss and byte parity."""

import json
import math
import os
import subprocess
import sys
import textwrap

import attrs
import pytest
import torch

import autoqra
from autoqra.artifact import ArtifactError, read_info
from autoqra.artifact import load_artifact as load
from autoqra.checkpoints import read_state
from autoqra.config import TrainSpec
from autoqra.models import load_model
from autoqra.space import Assignment

FAST = dict(preset="tiny", ranks=(0, 4, 8), train=TrainSpec(batch_size=2, seq_len=32, lr=2e-3), eval_blocks=4,
            importance_blocks=0, progress=False, seed=0, max_trials=2, phase2=None)
#: backend -> (search bits, a mixed assignment's bits and ranks for the two blocks of the tiny model)
CASES = {
    "hqq": ((2, 4, 8), [4, 16], [8, 0]),
    "bnb": ((4, 8), [4, 8], [4, 8]),
    "gptq": ((2, 4, 8), [2, 4], [0, 8]),
    "none": ((16,), [16, 16], [8, 4]),
}
LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file
    import autoqra
    from autoqra.evaluators.finetune import heldout_metrics
    art = autoqra.load_artifact(sys.argv[1])
    blocks = load_file(sys.argv[2])["b"]
    m = heldout_metrics(art.model, blocks)
    mem = autoqra.measure_memory(art.model)
    print("RESULT " + json.dumps({"loss": m["loss"], "model_bytes": mem.model_bytes, "lora_bytes": mem.lora_bytes,
                                  "type": type(art.model).__name__, "tokenizer": type(art.tokenizer).__name__}))
""")


def run_loader(export_dir, blocks_file):
    out = subprocess.run([sys.executable, "-c", LOADER, str(export_dir), str(blocks_file)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def mixed_result(backend, tmp_path):
    """A saved run of the tiny model whose front is one mixed-precision point of ``backend``."""
    bits, mb, mr = CASES[backend]
    model, _ = load_model("tiny")
    budget = "16bit" if backend == "none" else "8bit"
    res = autoqra.optimize(model, budget, backend=backend, bits=bits, **FAST)
    # the embedding unit (HQQ: the tied embedding / head, a unit since embeddings="search") at 8 bits, no rank
    bi, ri = iter(mb), iter(mr)
    a = Assignment(res.space.unit_names, [8 if not u.has_rank else next(bi) for u in res.space.units],
                   [0 if not u.has_rank else next(ri) for u in res.space.units])
    res.pareto = [attrs.evolve(res.best, assignment=a, key="mixed-" + backend)]
    res.history.append(res.pareto[0])
    res.save(tmp_path / "run")
    return autoqra.load_result(tmp_path / "run")


def save_blocks(res, path):
    from safetensors.torch import save_file

    save_file({"b": res.final.evaluator.eval_data().contiguous()}, path)
    return path


@pytest.mark.parametrize("backend", list(CASES))
def test_export_load_parity_in_fresh_process(backend, tmp_path):
    res = mixed_result(backend, tmp_path)
    model = res.train(index=0, steps=3, progress=False)
    blocks = [b for b, u in zip(res.final.trial.assignment.bits, res.space.units) if u.has_rank]
    assert blocks == CASES[backend][1]  # (HQQ: the tied embedding / head unit at 8 bits besides)
    assert (tmp_path / "run" / "final-0" / "state.json").is_file()
    info_path = res.export(tmp_path / "export")
    info = json.loads(info_path.read_text())
    in_mem = autoqra.evaluators.finetune.heldout_metrics(model, res.final.evaluator.eval_data())["loss"]
    got = run_loader(tmp_path / "export", save_blocks(res, tmp_path / "blocks.safetensors"))
    assert abs(got["loss"] - in_mem) <= 1e-5
    assert got["model_bytes"] == info["memory"]["predicted"]["model_bytes"] == info["memory"]["measured"]["model_bytes"]
    assert got["lora_bytes"] == info["memory"]["predicted"]["lora_bytes"] > 0
    assert got["type"] == "PeftModelForCausalLM" and got["tokenizer"] == "ByteTokenizer"
    cfg = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    if 0 in CASES[backend][2]:  # a rank-0 unit is excluded, not wrapped
        assert cfg["exclude_modules"]
    assert set(cfg["rank_pattern"].values()) <= {r for r in CASES[backend][2] if r}
    assert info["assignment"]["bits"] == list(res.final.trial.assignment.bits) and info["versions"]["torch"] == torch.__version__


@pytest.fixture(scope="module")
def hqq_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hqq_export")
    res = mixed_result("hqq", tmp)
    res.train(index=0, steps=3, progress=False)
    res.export(tmp / "export")
    return res, tmp


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_load_errors_are_clear(hqq_export, tmp_path):
    _, tmp = hqq_export
    with pytest.raises(ArtifactError, match="no export directory"):
        load(tmp_path / "nope")
    d = _copy(tmp / "export", tmp_path / "missing")
    (d / "quantized.safetensors").unlink()
    with pytest.raises(ArtifactError, match="quantized.safetensors is missing"):
        load(d)
    d = _copy(tmp / "export", tmp_path / "corrupt")
    raw = bytearray((d / "base.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (d / "base.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum"):
        load(d)
    d = _copy(tmp / "export", tmp_path / "format")
    info = json.loads((d / "autoqra.json").read_text())
    (d / "autoqra.json").write_text(json.dumps({**info, "format": "autoqra.artifact/99"}))
    with pytest.raises(ArtifactError, match="version mismatch"):
        load(d)
    (d / "autoqra.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_info(d)
    d = _copy(tmp / "export", tmp_path / "pickle")
    (d / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ArtifactError, match="pickled"):
        load(d)


def test_tampered_info_is_refused_never_executed(hqq_export, tmp_path):
    _, tmp = hqq_export
    cases = {
        "backend": lambda i: i.update(backend={"name": "hqq", "group_size": -3}),
        "layer": lambda i: i["quantized"].update({"model.nope.q_proj": next(iter(i["quantized"].values()))}),
        "keys": lambda i: next(iter(i["quantized"].values())).update(keys="W_q"),
        "files": lambda i: i["files"].pop("base.safetensors"),
        "path": lambda i: i["files"].update({"../evil": "0"}),
        "alias": lambda i: i["aliases"].update({"lm_head.weight": "model.does.not.exist"}),
    }
    for name, edit in cases.items():
        d = _copy(tmp / "export", tmp_path / name)
        info = json.loads((d / "autoqra.json").read_text())
        edit(info)
        (d / "autoqra.json").write_text(json.dumps(info))
        with pytest.raises(ArtifactError):
            load(d)


def test_quantizer_version_mismatch(hqq_export, tmp_path):
    _, tmp = hqq_export
    d = _copy(tmp / "export", tmp_path / "ver")
    info = json.loads((d / "autoqra.json").read_text())
    info["versions"]["hqq"] = "0.0.1"
    (d / "autoqra.json").write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match="hqq 0.0.1"):
        load(d)
    with pytest.warns(UserWarning, match="hqq 0.0.1"):
        art = load(d, allow_version_mismatch=True)
    assert art.info["versions"]["hqq"] == "0.0.1"


def test_merge_hqq_requantizes_and_states_the_loss(hqq_export, tmp_path):
    res, _ = hqq_export
    path = res.export(tmp_path / "merged", merge=True)
    info = json.loads(path.read_text())
    m = info["merge"]
    assert m["exact"] is False and m["loss_merged"] == pytest.approx(m["loss_adapter"] + m["delta"])
    assert not (tmp_path / "merged" / "adapter_model.safetensors").exists()
    art = load(tmp_path / "merged")
    assert type(art.model).__name__ == "LlamaForCausalLM"
    assert autoqra.measure_memory(art.model).model_bytes == info["memory"]["predicted"]["model_bytes"]
    assert info["memory"]["predicted"]["lora_bytes"] == 0
    ev = res.final.evaluator  # the merge losses are scored in the training precision
    loss = autoqra.evaluators.finetune.heldout_metrics(art.model, ev.eval_data(), precision=ev.precision)["loss"]
    assert loss == pytest.approx(m["loss_merged"], abs=1e-5)
    # the in-memory adapter model is untouched by merging
    again = autoqra.evaluators.finetune.heldout_metrics(res.final.model, ev.eval_data(), precision=ev.precision)["loss"]
    assert again == pytest.approx(m["loss_adapter"], abs=1e-6)


def test_merge_16bit_is_exact_and_bnb_is_refused(tmp_path):
    res = mixed_result("none", tmp_path / "a")
    res.train(index=0, steps=2, progress=False, precision="fp32")  # bf16 rounding would move the merged loss
    assert res.final.evaluator.precision == "fp32"
    info = json.loads(res.export(tmp_path / "m16", merge=True).read_text())
    assert info["merge"]["exact"] is True and abs(info["merge"]["delta"]) < 1e-5
    res = mixed_result("bnb", tmp_path / "b")
    res.train(index=0, steps=1, progress=False)
    with pytest.raises(ValueError, match="cannot merge"):
        res.export(tmp_path / "mb", merge=True)


def _lora(directory):
    from safetensors.torch import load_file

    st = read_state(directory)
    return load_file(directory / st["folder"] / "lora.safetensors"), st


def test_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Crash after the step-4 checkpoint, resume in a fresh process via the CLI: same weights as no crash."""
    res = mixed_result("hqq", tmp_path)
    res.train(index=0, steps=6, out=tmp_path / "straight", checkpoint_every=2, progress=False)
    straight, st = _lora(tmp_path / "straight")
    assert st["complete"] and st["step"] == 6

    from autoqra.checkpoints import Checkpointer

    orig = Checkpointer.save

    def save_then_die(self, done, *a, **k):
        orig(self, done, *a, **k)
        if done == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        res.train(index=0, steps=6, checkpoint_every=2, progress=False)  # default out: <run>/final-0
    assert read_state(tmp_path / "run" / "final-0")["step"] == 4
    monkeypatch.undo()
    cli = [sys.executable, "-m", "autoqra.cli", "train", "--run", str(tmp_path / "run"), "--index", "0",
           "--steps", "6", "--checkpoint-every", "2", "--no-progress"]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed at step 4" in out.stdout
    resumed, st = _lora(tmp_path / "run" / "final-0")
    assert st["complete"] and st["step"] == 6 and set(resumed) == set(straight)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    # a finished training is read back, not retrained; another recipe in the same folder is refused
    res.train(index=0, steps=6, checkpoint_every=2, progress=False)
    assert res.final.resumed_from == 6
    # reading it back keeps the last training loss (it is in the checkpoint, not re-measured)
    assert res.final.metrics["train_loss_last"] == st["last_loss"] and math.isfinite(st["last_loss"])
    assert read_state(tmp_path / "run" / "final-0")["metrics"]["train_loss_last"] == st["last_loss"]
    with pytest.raises(ValueError, match="another training"):
        res.train(index=0, steps=7, progress=False)


def test_cli_export_needs_a_finished_training(tmp_path):
    res = mixed_result("hqq", tmp_path)
    assert res.info["model_source"] == "tiny"
    base = [sys.executable, "-m", "autoqra.cli"]
    out = subprocess.run([*base, "export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "e")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "autoqra train" in out.stderr
    res.train(steps=2, progress=False)  # the chosen point, into <run>/final
    out = subprocess.run([*base, "export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "e")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = read_info(tmp_path / "e")
    assert info["assignment"] == res.best.assignment.to_dict() and info["final_steps"] == 2


def test_train_argument_errors(tmp_path):
    res = mixed_result("hqq", tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        res.train(index=5, progress=False)
    with pytest.raises(ValueError, match="fidelity"):
        res.train(fidelity="huge", progress=False)
    with pytest.raises(ValueError, match="steps or epochs"):
        res.train(steps=2, epochs=1.0, progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        res.train(autoqra.models.tiny_llama(seed=1), steps=1, progress=False)
    with pytest.raises(ValueError, match="call result.train"):
        res.export(tmp_path / "x")


@pytest.mark.slow
def test_smollm2_export_load_round_trip(smollm2, tmp_path):
    """SmolLM2 with a mixed HQQ assignment (4/8/16 bits, ranks 0/8/16): train 2 steps, export, reload elsewhere."""
    from safetensors.torch import save_file

    from autoqra.artifact.export import export_model
    from autoqra.evaluators.finetune import FinetuneEvaluator, heldout_metrics
    from autoqra.space import SearchSpace

    model, tok = smollm2
    space = SearchSpace.from_model(model, bits=(4, 8, 16), ranks=(0, 8, 16))
    n = space.n_units
    a = Assignment(space.unit_names, [(4, 8, 16)[i % 3] for i in range(n)], [(8, 0, 16)[i % 3] for i in range(n)])
    ev = FinetuneEvaluator(model, space, "hqq", tokenizer=tok, train=TrainSpec(batch_size=2, seq_len=64),
                           eval_blocks=4, track_peak=False)
    pm = ev.build(a)
    ev.fit(pm, 2)
    blocks = ev.eval_data()
    in_mem = heldout_metrics(pm, blocks)["loss"]
    predicted = autoqra.MemoryModel(model, space, "hqq").predict(a).to_dict()
    export_model(pm, tmp_path / "export", ev.backend, tokenizer=tok, info={"memory": {"predicted": predicted}})
    save_file({"b": blocks.contiguous()}, tmp_path / "blocks.safetensors")
    got = run_loader(tmp_path / "export", tmp_path / "blocks.safetensors")
    assert abs(got["loss"] - in_mem) <= 1e-5
    assert got["model_bytes"] == predicted["model_bytes"]
    assert got["tokenizer"] != "NoneType" and got["type"] == "PeftModelForCausalLM"
    size = sum(f.stat().st_size for f in (tmp_path / "export").iterdir())
    assert size < 1.2 * predicted["model_bytes"]  # quantized on disk too, not fp32
