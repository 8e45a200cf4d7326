"""Every model family users bring: tiny random models of common HF architectures, built from configs in-process.

For each family: the memory model's bytes equal the measured bytes for every backend (random block and
module assignments, with LoRA); uniform 4 bits leaves no floating-point weight matrix of the decoder blocks
unquantized but the routers (counted from the model's own tensors); a 3-trial ``optimize`` runs; export ->
``load_artifact`` keeps loss and bytes for a fused-projection model (Phi-3) and an MoE model (Mixtral).
Real-size configs (Mixtral-8x7B, Qwen3-30B-A3B, Phi-3-mini) are planned on the meta device.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import LADDERS, calib_for
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import autoqra
from autoqra import MemoryModel, SearchSpace, apply_assignment, measure_memory, measure_peak
from autoqra.config import TrainSpec
from autoqra.evaluators.data import ByteTokenizer
from autoqra.models import from_config
from autoqra.quant_backends import get_backend

H, INTER, V = 64, 128, 320  # dims multiples of 64: every backend's grouping divides them
_ATTN = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, vocab_size=V)
_TOK = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
#: model_type -> tiny config (transformers 5 names)
FAMILIES = {
    "llama": dict(_ATTN, intermediate_size=INTER, num_key_value_heads=2),
    "qwen2": dict(_ATTN, intermediate_size=INTER, num_key_value_heads=2),
    "qwen3": dict(_ATTN, intermediate_size=INTER, num_key_value_heads=2, head_dim=16),
    "mistral": dict(_ATTN, intermediate_size=INTER, num_key_value_heads=2),
    "gemma2": dict(_ATTN, intermediate_size=INTER, num_key_value_heads=2, head_dim=16),
    "phi3": dict(_ATTN, intermediate_size=INTER, num_key_value_heads=2, **_TOK),
    "opt": dict(_ATTN, ffn_dim=INTER, word_embed_proj_dim=H, max_position_embeddings=128, **_TOK),
    "gpt2": dict(n_embd=H, n_layer=2, n_head=4, vocab_size=V, n_positions=128, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(_ATTN, intermediate_size=INTER, **_TOK),
    "mixtral": dict(_ATTN, intermediate_size=INTER, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_ATTN, intermediate_size=INTER, moe_intermediate_size=64, num_key_value_heads=2, head_dim=16,
                      num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(_ATTN, intermediate_size=64, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2),
}
MOE = ("mixtral", "qwen3_moe", "gpt_oss")
CONFIGS = Path(__file__).parent / "data" / "configs"
_MODELS: dict[str, nn.Module] = {}


def build(family: str) -> nn.Module:
    """The tiny random model of ``family`` (cached; the source model is never modified by autoqra)."""
    if family not in _MODELS:
        cfg = AutoConfig.for_model(family, **FAMILIES[family])
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg)
        _MODELS[family] = model.eval()
    return _MODELS[family]


def ids(n=2, seq=16, seed=0):
    return torch.randint(0, V, (n, seq), generator=torch.Generator().manual_seed(seed))


def decoder_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Dense floating-point tensors with >= 2 dims under the decoder-layer list (found here from the config's
    layer count, independently of autoqra), zero-storage placeholders excluded."""
    n = model.config.num_hidden_layers
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    pat = re.compile("^(" + "|".join(map(re.escape, lists)) + r")\.\d+\.")
    return {name: p for name, p in model.named_parameters()
            if pat.match(name) and p.dim() >= 2 and p.is_floating_point()
            and p.untyped_storage().nbytes() > p.element_size()}


def is_router(model: nn.Module, t: torch.Tensor) -> bool:
    """A router weight: 2-D with the expert count of the config as its output size."""
    cfg = model.config
    n_exp = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    return bool(n_exp) and t.dim() == 2 and t.shape[0] == n_exp


# ------------------------------------------------------------------------------------------ bytes
@pytest.mark.parametrize("backend", ["none", "hqq", "bnb", "gptq"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_predicted_equals_measured(family, backend):
    model = build(family)
    rng = np.random.default_rng(hash((family, backend)) % 2**32)
    for gran in ("block", "sublayer", "module"):
        space = SearchSpace.from_model(model, bits=LADDERS[backend], ranks=(0, 4, 8), granularity=gran)
        mm = MemoryModel(model, space, backend)
        a = space.sample(rng)
        if not any(a.ranks):
            a = space.make(a.bits, [4] + list(a.ranks[1:]))
        pm = apply_assignment(model, a, backend, space=space, calib_ids=calib_for(backend, V))
        pred, meas = mm.predict(a), measure_memory(pm)
        assert (pred.quant_weight_bytes, pred.quant_meta_bytes, pred.lora_bytes) == (
            meas.quant_weight_bytes, meas.quant_meta_bytes, meas.lora_bytes), (gran, a.short())
        assert pred.model_bytes == meas.model_bytes, (gran, a.short(), pred.to_dict(), meas.to_dict())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_uniform_4bit_quantizes_every_decoder_matrix_but_routers(family):
    model = build(family)
    before = decoder_matrices(model)
    space = SearchSpace.from_model(model, bits=(4,), ranks=(0, 8))
    assert space.coverage.share == 1.0 and "100.0 %" in space.coverage.line()
    q = apply_assignment(model, space.uniform(4, 0), "hqq", space=space)
    left = decoder_matrices(q)
    assert set(left) <= set(before)
    assert all(is_router(model, t) for t in left.values()), sorted(left)
    routers = sum(t.numel() for t in before.values() if is_router(model, t))
    quantized = sum(t.numel() for n, t in before.items() if n not in left)
    assert quantized == sum(t.numel() for t in before.values()) - routers
    assert (family in MOE) == (routers > 0)
    with torch.no_grad():  # the quantized model still computes the model's own (routed) forward
        loss = q(input_ids=ids(), labels=ids()).loss
    assert torch.isfinite(loss)


def test_target_modules_narrow_and_warn_with_coverage(caplog):
    model = build("phi3")
    with caplog.at_level("WARNING", logger="autoqra.space"):
        space = SearchSpace.from_model(model, target_modules=["o_proj"])
    cov = space.coverage
    assert cov.share < 0.9 and [u.modules for u in space.units] == [("model.layers.0.self_attn.o_proj",),
                                                                    ("model.layers.1.self_attn.o_proj",)]
    assert "qkv_proj" in caplog.text and "target_modules=" in caplog.text
    assert {"qkv_proj", "gate_up_proj", "down_proj"} == set(cov.suggest)
    moe = SearchSpace.from_model(build("mixtral"), granularity="module", target_modules=["experts"])
    assert [u.name for u in moe.units] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert moe.coverage.share == pytest.approx(8 / 9)  # attention is 1/9 of the tiny Mixtral's decoder weights


def test_module_granularity_separates_attention_and_experts():
    space = SearchSpace.from_model(build("mixtral"), granularity="module")
    kinds = {u.name: {t.kind for t in u.tensors} for u in space.units}
    assert kinds["model.layers.0.mlp.experts"] == {"experts"}
    assert kinds["model.layers.0.self_attn.q_proj"] == {"linear"}
    unit = space.units[[u.name for u in space.units].index("model.layers.0.mlp.experts")]
    assert [t.shape for t in unit.tensors] == [(4, 2 * INTER, H), (4, H, INTER)]
    assert SearchSpace.from_spec(space.spec()) == space  # tensors round-trip through the spec


@pytest.mark.parametrize("family, parts", [("llama", ["self_attn", "mlp"]), ("gpt2", ["attn", "mlp"]),
                                           ("mixtral", ["self_attn", "mlp"]), ("phi3", ["self_attn", "mlp"])])
def test_sublayer_granularity_splits_each_block_into_attention_and_mlp(family, parts):
    model = build(family)
    block = SearchSpace.from_model(model)
    sub = SearchSpace.from_model(model, granularity="sublayer")
    assert [u.name for u in sub.units] == [f"{b}.{p}" for b in block.unit_names for p in parts]
    # the same weights, regrouped: every tensor of a block lands in exactly one of its sublayer units
    for b in block.units:
        mine = [u for u in sub.units if u.name.startswith(b.name + ".")]
        assert sorted(t.name for u in mine for t in u.tensors) == sorted(t.name for t in b.tensors)
    assert sub.coverage == block.coverage
    if family == "mixtral":
        assert {t.kind for t in sub.units[1].tensors} == {"experts"}  # the router stays out, as in a block unit


def test_gpt2_conv1d_is_transposed_linear():
    space = SearchSpace.from_model(build("gpt2"))
    t = space.units[0].tensors[0]
    assert (t.name, t.kind, t.shape, t.transposed) == ("transformer.h.0.attn.c_attn.weight", "linear", (3 * H, H), True)


def test_experts_lora_trains_and_matches_peft_delta():
    """LoRA on quantized experts: only adapters train, and the factored update equals peft's own B @ A."""
    model = build("mixtral")
    space = SearchSpace.from_model(model, bits=(4, 16), ranks=(0, 8), granularity="module")
    a = space.make([4 if "experts" in n else 16 for n in space.unit_names], [8] * space.n_units)
    pm = apply_assignment(model, a, "hqq", space=space, dropout=0.1)
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in names) and any("experts" in n for n in names)
    w = next(m for n, m in pm.named_modules() if n.endswith("layers.0.mlp.experts"))
    with torch.no_grad():
        for mod in (w, w.base_layer):
            mod.lora_B["default"].weight.normal_()
    pm.train()
    loss = pm(input_ids=ids(), labels=ids()).loss
    loss.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad and "experts" in n)
    pm.eval()
    # the factored forward adds exactly peft's delta weight: compare against a dense copy with W_q + delta
    inner = w.base_layer  # gate_up_proj's wrapper (peft sorts target parameters)
    experts = inner.base_layer
    delta = inner.get_delta_weight("default")  # (E, out, in)
    x = torch.randn(5, H)
    e = 1
    with torch.no_grad():
        wq = experts.quant[inner.parameter_name][e].dequantize()
        want = x @ (wq + delta[e]).t()
        experts._lora[inner.parameter_name] = [(inner.lora_A["default"].weight, inner.lora_B["default"].weight,
                                                inner.scaling["default"], nn.Identity())]
        got = experts._proj(inner.parameter_name, e, x)
        experts._lora.clear()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ optimize
@pytest.mark.parametrize("family", list(FAMILIES))
def test_optimize_three_trials_ok(family, tmp_path):
    model = build(family)
    res = autoqra.optimize(model, "8bit", backend="hqq", tokenizer=ByteTokenizer(V), preset="tiny", bits=(4, 8),
                           ranks=(0, 4), train=TrainSpec(batch_size=2, seq_len=16), eval_blocks=2, high_steps=1,
                           importance_blocks=0, max_trials=3, phase2=None, progress=False, seed=0,
                           store=tmp_path / "t.db")
    assert res.history and all(t.status == "ok" for t in res.history), [(t.status, t.assignment.short())
                                                                         for t in res.history]
    assert "covered: 100.0 % of decoder weights" in res.summary()


# ------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("family, backend", [("phi3", "hqq"), ("mixtral", "hqq"), ("mixtral", "gptq"), ("mixtral", "bnb"),
                                             ("gpt_oss", "hqq"), ("gpt2", "gptq")])
def test_export_load_parity(family, backend, tmp_path):
    from autoqra.artifact import export_model, load_artifact

    model = build(family)
    space = SearchSpace.from_model(model, bits=LADDERS[backend], ranks=(0, 4, 8), granularity="module")
    n = space.n_units
    bits = [space.bits[i % 2] if i % 3 else 16 for i in range(n)]
    ranks = [(4, 8, 0)[i % 3] for i in range(n)]  # Mixtral: experts 2/3-bit r8 and 16-bit r4 (dense wrapper)
    a = space.make(bits, ranks)
    be = get_backend(backend)
    pm = apply_assignment(model, a, be, space=space, calib_ids=calib_for(backend, V))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    pm.eval()
    with torch.no_grad():
        loss = pm(input_ids=ids(seed=5), labels=ids(seed=5)).loss.item()
    pred = MemoryModel(model, space, be).predict(a)
    export_model(pm, tmp_path / "out", be, info={"assignment": a.to_dict()})
    art = load_artifact(tmp_path / "out")
    with torch.no_grad():
        loss2 = art.model(input_ids=ids(seed=5), labels=ids(seed=5)).loss.item()
    assert abs(loss - loss2) <= 1e-5
    meas = measure_memory(art.model)
    assert meas.model_bytes == pred.model_bytes, (pred.to_dict(), meas.to_dict())
    assert meas.lora_bytes == pred.lora_bytes > 0


# ------------------------------------------------------------------------------------------ real sizes
#: name -> (config file, total parameters in billions as published, expert tensors per layer)
BIG = {"mixtral-8x7b": ("mixtral-8x7b.json", 46.70), "qwen3-30b-a3b": ("qwen3-30b-a3b.json", 30.53),
       "phi-3-mini": ("phi-3-mini.json", 3.82)}


def _expected_quant_bytes(cfg: dict, backend) -> int:
    """4-bit packed + meta bytes of every decoder weight, from the config's own numbers (independent of discovery)."""
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    if cfg["model_type"] == "phi3":
        shapes = [((q + 2 * kv, h), 1), ((h, q), 1), ((2 * cfg["intermediate_size"], h), 1),
                  ((h, cfg["intermediate_size"]), 1)]
    else:
        e = cfg.get("num_local_experts") or cfg["num_experts"]
        inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        shapes = [((q, h), 1), ((kv, h), 2), ((h, q), 1), ((2 * inter, h), e), ((h, inter), e)]
    per_layer = sum(n * sum(backend.weight_bytes(o, i, 4)) for (o, i), n in shapes)
    return L * per_layer


@pytest.mark.parametrize("name", list(BIG))
def test_real_size_plan_on_meta(name):
    file, billions = BIG[name]
    cfg = json.loads((CONFIGS / file).read_text())
    be = get_backend("hqq", compute_dtype=torch.bfloat16)

    def plan():
        model = from_config(CONFIGS / file)
        space = SearchSpace.from_model(model)
        return model, space, MemoryModel(model, space, be, precision="bf16").predict(space.uniform(4, 8))

    (model, space, bd), allocated = measure_peak(plan)  # bytes of every tensor an op allocated (meta: none)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - billions) / billions < 0.01
    smallest = min(p.numel() * p.element_size() for p in model.parameters() if p.dim() >= 2)
    assert all(p.is_meta for p in model.parameters()) and allocated < smallest  # no weight materialised
    assert space.coverage.share == 1.0 and space.n_units == cfg["num_hidden_layers"]
    assert bd.quant_weight_bytes + bd.quant_meta_bytes == _expected_quant_bytes(cfg, be)


@pytest.mark.parametrize("name", list(BIG))
def test_real_shapes_exact_at_reduced_size(name):
    """Each config at reduced size (2 layers, 4 experts, every width / 32): predicted == measured bytes,
    and a real-size tensor of the Qwen3-MoE plan's expert and key/value shapes quantized: bytes == weight_bytes."""
    cfg = json.loads((CONFIGS / BIG[name][0]).read_text())
    small = dict(cfg, num_hidden_layers=2, vocab_size=V, max_position_embeddings=256)
    for k in ("hidden_size", "intermediate_size", "moe_intermediate_size"):
        if k in small:
            small[k] = max(64, cfg[k] // 32)
    small["num_attention_heads"] = max(2, cfg["num_attention_heads"] // 32)
    small["num_key_value_heads"] = max(1, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // 32)
    small["head_dim"] = small["hidden_size"] // small["num_attention_heads"]
    for k in ("num_local_experts", "num_experts"):
        if k in small:
            small[k] = 4
    if "num_experts_per_tok" in small:
        small["num_experts_per_tok"] = 2
    for k, v in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0)):
        if k in small:
            small[k] = v
    small["torch_dtype"] = "float32"
    model = from_config(small)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    space = SearchSpace.from_model(model, bits=(2, 4, 8, 16), ranks=(0, 8), granularity="block")
    mm = MemoryModel(model, space, "hqq")
    a = space.make([4, 16], [8, 0])
    assert measure_memory(apply_assignment(model, a, "hqq", space=space)).model_bytes == mm.predict(a).model_bytes
    if name == "qwen3-30b-a3b":  # real shapes: key/value and one expert slice of each expert tensor
        from autoqra.quant_backends._experts import linear_shell

        be = get_backend("hqq")
        h, hd = cfg["hidden_size"], cfg["head_dim"]
        shapes = {(cfg["num_key_value_heads"] * hd, h), (2 * cfg["moe_intermediate_size"], h),
                  (h, cfg["moe_intermediate_size"])}
        for o, i in sorted(shapes):
            q = be.quantize(linear_shell(torch.randn(o, i) * 0.02), 4)
            packed, meta, _ = be.module_tensors(q)
            assert (sum(t.untyped_storage().nbytes() for t in packed),
                    sum(t.untyped_storage().nbytes() for t in meta)) == be.weight_bytes(o, i, 4)


def test_cli_memory_states_coverage(capsys):
    from autoqra.cli.main import main

    assert main(["memory", "--model-config", str(CONFIGS / "phi-3-mini.json"), "--bits", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["coverage"]["share"] == 1.0 and out["n_units"] == 32
    assert main(["memory", "--model-config", str(CONFIGS / "phi-3-mini.json"), "--bits", "4",
                 "--target-modules", "o_proj", "down_proj"]) == 0
    text = capsys.readouterr().out
    assert "covered: " in text and "warning:" in text and "qkv_proj" in text
