"""The token embedding and the output head as search units (issue 23): discovery, per-unit options, exact bytes,
the quantized lookup, searchers' moves within each unit's options, cost model, export parity and 8B plans."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from autoqra.apply import apply_assignment, quantized_layers, space_for
from autoqra.guidance.knapsack import k_best  # noqa: F401 - imported for its -inf contract
from autoqra.guidance.repair import make_repair
from autoqra.guidance.seeds import anchored_cost_seed, knapsack_seeds
from autoqra.memory.model import MemoryModel, measure_memory
from autoqra.models import from_config, tiny_llama
from autoqra.quant_backends import get_backend
from autoqra.space import Assignment, SearchSpace
from tests._helpers import calib_for, train_step


def untied_llama(seed=0):
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = LlamaForCausalLM(cfg)
    return m.eval()


MODELS = {"tied": tiny_llama, "untied": untied_llama}


@pytest.mark.parametrize("kind", list(MODELS))
def test_discovery_and_per_unit_options(kind):
    m = MODELS[kind]()
    keep = SearchSpace.from_model(m, bits=(2, 3, 4, 8), ranks=(0, 4, 8))
    sp = SearchSpace.from_model(m, bits=(2, 3, 4, 8), ranks=(0, 4, 8), embeddings="search", backend="hqq")
    assert "unit_bits" not in keep.spec() and keep.n_units == 2
    names = sp.unit_names
    if kind == "tied":
        assert names == ("model.embed_tokens", "model.layers.0", "model.layers.1")
        assert [t.kind for t in sp.units[0].tensors] == ["embedding", "head"] and sp.units[0].tensors[1].tied
    else:
        assert names == ("model.embed_tokens", "model.layers.0", "model.layers.1", "lm_head")
        assert sp.kind_of(3) == "head" and sp.unit_bits(3) == (4, 8, 16)
    assert sp.unit_bits(0) == (4, 8, 16) and sp.unit_ranks(0) == (0,)
    assert sp.unit_bits(1) == (2, 3, 4, 8) and sp.unit_ranks(1) == (0, 4, 8)
    n = sp.n_units
    assert list(sp.upper[:n]) == [2 if not u.has_rank else 3 for u in sp.units]
    assert all(sp.upper[n + i] == 0 for i, u in enumerate(sp.units) if not u.has_rank)
    rng = np.random.default_rng(0)
    for _ in range(50):  # every sample uses each unit's own options only, and round-trips
        a = sp.sample(rng)
        assert all(b in sp.unit_bits(i) and r in sp.unit_ranks(i) for i, (b, r) in enumerate(zip(a.bits, a.ranks)))
        assert sp.decode(sp.encode(a)) == a
    assert SearchSpace.from_spec(sp.to_dict()) == sp
    with pytest.raises(ValueError, match="outside the ladders"):
        sp.validate(Assignment(names, [2] * n, [0] * n))  # 2 bits on the embedding
    u = sp.uniform(4, 8)  # a reference keeps the embedding / head 16-bit, no rank
    assert [b for b, unit in zip(u.bits, sp.units) if not unit.has_rank] == [16] * (n - 2)
    # a ladder narrower than the embedding's options keeps its highest ones
    assert SearchSpace.from_model(m, bits=(4, 8), embeddings="search").unit_bits(0) == (8, 16)


def test_backends_refuse_or_take_the_embedding_clearly():
    tied, untied = tiny_llama(), untied_llama()
    for be in ("bnb", "gptq"):
        sp = SearchSpace.from_model(tied, bits=(4, 8), embeddings="search", backend=be)
        assert sp.n_units == 2  # the tied embedding cannot be looked up in their formats: left 16-bit
        spu = SearchSpace.from_model(untied, bits=(4, 8, 16), embeddings="search", backend=be)
        assert spu.unit_names[-1] == "lm_head" and spu.unit_bits(spu.n_units - 1) == (4, 8, 16)
        with pytest.raises(ValueError, match="cannot quantize a token embedding"):
            get_backend(be).quantize_embedding(tied.model.embed_tokens, 4)
    assert SearchSpace.from_model(tied, bits=(16,), embeddings="search", backend="none").n_units == 2


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_lookup_gathers_the_dequantized_rows(bits):
    m = tiny_llama()
    be = get_backend("hqq")
    q = be.quantize_embedding(m.model.embed_tokens, bits)
    ids = torch.tensor([[0, 5, 511, 5], [7, 300, 2, 1]])
    full = q.dequantize()  # (vocab, hidden)
    assert torch.equal(q(ids), full[ids].to(q(ids).dtype))
    head = be.tied_head(q)
    assert head.W_q.untyped_storage().data_ptr() == q.W_q.untyped_storage().data_ptr()
    x = torch.randn(3, 128)
    assert torch.allclose(head(x), x @ full.t(), atol=1e-5)


CASES = [("tied", "hqq"), ("untied", "hqq"), ("untied", "bnb"), ("untied", "gptq")]


@pytest.mark.parametrize(("kind", "backend"), CASES)
def test_predicted_bytes_equal_measured_for_random_assignments(kind, backend):
    _predicted_equals_measured(kind, backend)


def test_predicted_bytes_equal_measured_with_a_group_size_per_bit_width():
    """hqq with ``group_size={4: 32, 8: 128}`` (a Q4_0/Q4_1 model's grid at 4 bits): every layer, the
    embedding / head included, is priced at its own bit-width's group size."""
    from autoqra.quant_backends.hqq import HQQBackend

    _predicted_equals_measured("tied", HQQBackend(group_size={4: 32, 8: 128}))


def _predicted_equals_measured(kind, backend):
    m = MODELS[kind]()
    bits = (4, 8) if backend == "bnb" else (2, 4, 8)
    sp = SearchSpace.from_model(m, bits=bits, ranks=(0, 8), embeddings="search", backend=backend)
    assert sp.has_own
    mm = MemoryModel(m, sp, backend)
    calib = calib_for(backend, 512)
    rng = np.random.default_rng(1)
    seen = set()
    for i in range(4):
        a = sp.sample(rng)
        if i == 0:  # the embedding / head at their lowest option at least once
            a = sp.decode(np.concatenate([np.zeros(sp.n_units, int), sp.encode(a)[sp.n_units:]]))
        seen |= {b for b, u in zip(a.bits, sp.units) if not u.has_rank}
        pm = apply_assignment(m, a, backend, space=sp, calib_ids=calib)
        assert mm.predict(a).model_bytes == measure_memory(pm).model_bytes, a.short()
        if i == 0 and any(r > 0 for r in a.ranks):
            opt, loss = train_step(pm, 512)
            assert np.isfinite(loss)
            pr, me = mm.predict(a), measure_memory(pm, opt)
            assert (pr.model_bytes, pr.lora_grad_bytes, pr.optimizer_bytes) == \
                (me.model_bytes, me.lora_grad_bytes, me.optimizer_bytes)
    assert seen - {16}


def test_tied_head_is_one_tensor_and_space_for_rebuilds_the_space():
    m = tiny_llama()
    sp = SearchSpace.from_model(m, bits=(2, 4, 8), ranks=(0, 8), embeddings="search")
    a = Assignment(sp.unit_names, [8, 4, 2], [0, 8, 0])
    layers = quantized_layers(m, {"model.embed_tokens": 8, "lm_head": 8})
    assert layers["lm_head"].W_q.untyped_storage().data_ptr() == layers["model.embed_tokens"].W_q.untyped_storage().data_ptr()
    sp2 = space_for(m, a)
    sp2.validate(a)
    pm = apply_assignment(m, a, "hqq")
    assert measure_memory(pm).model_bytes == MemoryModel(m, sp, "hqq").predict(a).model_bytes
    # the LoRA config is unaffected: embedding / head never adapted
    cfg = sp.lora_config(a)
    assert not any("embed" in t or "lm_head" in t for t in cfg.target_modules)


@pytest.mark.parametrize("kind", list(MODELS))
def test_repair_seeds_and_moves_stay_in_each_units_options(kind):
    m = MODELS[kind]()
    sp = SearchSpace.from_model(m, bits=(2, 3, 4, 8), ranks=(0, 4, 8, 16), embeddings="search")
    mm = MemoryModel(m, sp, "hqq")
    budget = mm.budget_bytes("4bit")
    rng = np.random.default_rng(0)
    table = rng.normal(size=(sp.n_units, len(sp.bits), len(sp.ranks))).cumsum(1).cumsum(2)
    for u in range(sp.n_units):  # what CostModel.table gives: -inf past a unit's options
        table[u, len(sp.unit_bits(u)):, :] = -np.inf
        table[u, :, len(sp.unit_ranks(u)):] = -np.inf
    rep = make_repair(mm, budget, cost_table=table)
    up = sp.upper

    def bytes_of(x):
        return mm.predict_encoded(np.asarray(x)).model_bytes

    for _ in range(20):
        y = rep.repair_encoded(sp.encode(sp.maximum()) - rng.integers(0, 2, 2 * sp.n_units).clip(0, up))
        assert np.all(y <= up) and bytes_of(y) <= budget
    for x in [anchored_cost_seed(sp, table, bytes_of, budget), *knapsack_seeds(sp, table, bytes_of, budget, k=3)]:
        assert np.all((x >= 0) & (x <= up)) and bytes_of(x) <= budget
        sp.decode(x)
    from autoqra.searchers.nsga2_ops import SwapMutation

    mut = SwapMutation(table, bytes_of, budget, rep.repair_encoded)
    x = rep.repair_encoded(sp.encode(sp.uniform(4, 8)))
    for _ in range(20):
        x = mut.move(x, rng)
        assert np.all(x <= up) and bytes_of(x) <= budget


def test_cost_model_damage_and_table_cover_the_embedding():
    from autoqra.guidance.costmodel import CostModel, quant_damage

    m = tiny_llama()
    sp = SearchSpace.from_model(m, bits=(2, 4, 8), ranks=(0, 8), embeddings="search")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (2, 32), generator=g)]
    q = quant_damage(m, sp, get_backend("hqq"), batches)
    assert q.shape == (3, len(sp.all_bits)) and sp.all_bits == (2, 4, 8, 16)
    assert q[0, sp.all_bits.index(4)] > q[0, sp.all_bits.index(8)] > 0  # the embedding's damage per bit-width
    assert q[0, 0] == q[0, 1]  # 2 bits is not an embedding option: its next higher option's value
    cm = CostModel(sp.all_bits, sp.ranks, q, np.zeros((3, 2)))
    t = cm.table(sp)
    assert t.shape == (3, 3, 2) and np.isinf(t[0, :, 1]).all() and np.isfinite(t[0, :, 0]).all()
    a = sp.decode(np.array([1, 2, 2, 0, 1, 1]))
    assert cm.damage(a) == pytest.approx(q[0, 2] + q[1, 2] + q[2, 2])


@pytest.mark.parametrize("group_size", [64, {4: 32, 8: 128}], ids=["g64", "g-per-bits"])
def test_export_load_keeps_parity_for_a_quantized_tied_embedding(tmp_path, group_size):
    from autoqra.artifact.export import export_model
    from autoqra.artifact.loader import load_artifact

    be = get_backend("hqq", group_size=group_size)
    m = tiny_llama()
    sp = SearchSpace.from_model(m, bits=(2, 4, 8), ranks=(0, 8), embeddings="search", backend=be)
    a = Assignment(sp.unit_names, [4, 8, 4], [0, 8, 8])
    pm = apply_assignment(m, a, be, space=sp)
    train_step(pm, 512)
    pm.eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    export_model(pm, tmp_path / "e", be)
    art = load_artifact(tmp_path / "e")
    with torch.no_grad():
        got = art.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert measure_memory(art.model).model_bytes == MemoryModel(m, sp, be).predict(a).model_bytes


def test_an_8b_shaped_plan_lists_the_embedding_and_head_options():
    cfg = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    m = from_config(cfg)
    sp = SearchSpace.from_model(m, bits=(2, 3, 4, 8), embeddings="search", backend="hqq")
    assert sp.unit_names[0] == "model.embed_tokens" and sp.unit_names[-1] == "lm_head"
    mm = MemoryModel(m, sp, get_backend("hqq", compute_dtype=torch.bfloat16), precision="bf16")
    n = sp.n_units
    for j, b in enumerate(sp.unit_bits(0)):
        x = sp.uniform_encoded(2, 2)
        x[0] = x[n - 1] = j
        bd = mm.predict_encoded(x)
        emb = 128256 * 4096
        want = 2 * emb * 2 if b == 16 else 2 * sum(get_backend("hqq", compute_dtype=torch.bfloat16).weight_bytes(128256, 4096, b))
        ref = mm.predict_encoded(sp.uniform_encoded(2, 2))  # both at 16 bits
        assert ref.model_bytes - bd.model_bytes == 2 * emb * 2 - want
        assert bd.activation_bytes > 0 and bd.train_bytes > bd.model_bytes


@pytest.mark.slow
def test_smollm2_embedding_options_are_exact(smollm2):
    """SmolLM2's tied embedding at 8 and 4 bits (and 16): predicted model bytes = live tensors; the references
    (B4 = uniform 4-bit r8 with the embedding 16-bit) keep their bytes."""
    model, _ = smollm2
    sp = SearchSpace.from_model(model, bits=(2, 3, 4, 8), ranks=(0, 8), embeddings="search")
    assert sp.unit_names[0] == "model.embed_tokens" and sp.n_units == 31 and sp.unit_bits(0) == (4, 8, 16)
    mm = MemoryModel(model, sp, "hqq")
    keep = SearchSpace.from_model(model, bits=(2, 3, 4, 8), ranks=(0, 8))
    assert mm.budget_bytes("4bit") == MemoryModel(model, keep, "hqq").budget_bytes("4bit")
    rng = np.random.default_rng(0)
    for e in (8, 4):
        a = sp.sample(rng)
        a = Assignment(a.units, [e, *a.bits[1:]], a.ranks)
        assert mm.predict(a).model_bytes == measure_memory(apply_assignment(model, a, "hqq", space=sp)).model_bytes


def test_layer_picture_labels_the_embedding_and_head_units():
    from autoqra.report.layers import _unit_labels

    tied = SearchSpace.from_model(tiny_llama(), embeddings="search")
    untied = SearchSpace.from_model(untied_llama(), embeddings="search")
    assert _unit_labels(tied) == (["embed+head", "0", "1"], "model.layers.")
    assert _unit_labels(untied) == (["embed", "0", "1", "head"], "model.layers.")
