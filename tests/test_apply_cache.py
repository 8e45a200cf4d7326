"""Tests for the quantized-layer cache of ``autoqra.apply``: placement keys, LRU byte cap, env cap,
and GPTQ calibration statistics kept on the CPU."""

from __future__ import annotations

import pytest
import torch
from _helpers import calib_for, storage_bytes
from torch import nn

import autoqra.apply as apply_mod
import autoqra.layer_cache as layer_cache
from autoqra.apply import (
    CACHE_BYTES_ENV,
    QuantCache,
    default_cache_limit,
    quant_cache,
    quantize_model,
    set_quant_cache_limit,
)
from autoqra.models import tiny_llama
from autoqra.quant_backends import get_backend
from autoqra.quant_backends.gptq import GPTQBackend
from autoqra.space import SearchSpace


def _space(model: nn.Module) -> SearchSpace:
    return SearchSpace.from_model(model, bits=(2, 4, 8, 16), ranks=(0,), granularity="block")


def _qlayers(qmodel: nn.Module, space: SearchSpace) -> dict[str, nn.Module]:
    return {n: qmodel.get_submodule(n) for n in space.module_names}


def _recount(cache: QuantCache, backend) -> int:
    """Independent recount: distinct storages of every cached layer's params, buffers and backend tensors."""
    total = 0
    for q in cache.layers.values():
        packed, meta, other = backend.module_tensors(q)
        total += storage_bytes([*q.parameters(), *q.buffers(), *packed, *meta, *other])
    return total


def _exact_bytes(model: nn.Module, cache: QuantCache, backend) -> int:
    """Bytes of the cached layers from the backend's analytic ``weight_bytes`` (tiny Llama has no bias)."""
    total = 0
    for name, bits, *_ in cache.layers:
        out_f, in_f = model.get_submodule(name).weight.shape
        total += sum(backend.weight_bytes(out_f, in_f, bits))
    return total


# ------------------------------------------------------------------ placement keys
@pytest.mark.parametrize("backend", ["hqq", "gptq"])
def test_dtype_move_requantizes_instead_of_reusing_old_layers(backend):
    model = tiny_llama(seed=0)  # a fresh model: it is converted to bf16 in place below
    space = _space(model)
    a = space.uniform(bits=4, rank=0)
    ids = calib_for(backend, model.config.vocab_size)
    old = _qlayers(quantize_model(model, space, a, backend, calib_ids=ids), space)
    cache = quant_cache(model)
    n = len(space.module_names)
    assert (cache.misses, cache.hits) == (n, 0)

    model.to(torch.bfloat16)
    new = _qlayers(quantize_model(model, space, a, backend, calib_ids=ids), space)
    assert (cache.misses, cache.hits) == (2 * n, 0)
    assert all(new[m] is not old[m] for m in space.module_names)
    assert {k[-1] for k in cache.layers} == {"float32", "bfloat16"}
    if backend == "gptq":  # calibration is redone on the moved model, not reused
        assert len(cache.calib) == 2
    # the new layers are what the backend makes of the *moved* (bf16) weights
    be = get_backend(backend)
    name = space.module_names[0]
    calib = None
    if backend == "gptq":
        calib = be.calibrate(model, space.module_names, ids)[name]
    ref = be.quantize(model.get_submodule(name), 4, calib=calib)
    x = torch.randn(3, model.get_submodule(name).in_features)
    with torch.no_grad():
        assert torch.equal(new[name](x), ref(x))

    # a second bf16 request hits the bf16 entries
    again = _qlayers(quantize_model(model, space, a, backend, calib_ids=ids), space)
    assert cache.hits == n and all(again[m] is new[m] for m in space.module_names)


def test_device_is_part_of_the_key(monkeypatch):
    """Simulated device move: the same weights reported on another device are quantized afresh."""
    model = tiny_llama(seed=0)
    space = _space(model)
    a = space.uniform(bits=4, rank=0)
    first = _qlayers(quantize_model(model, space, a, "hqq"), space)
    real = apply_mod._placement
    monkeypatch.setattr(apply_mod, "_placement", lambda t: ("cuda:7", real(t)[1]))
    moved = _qlayers(quantize_model(model, space, a, "hqq"), space)
    cache = quant_cache(model)
    n = len(space.module_names)
    assert cache.misses == 2 * n and cache.hits == 0
    assert all(moved[m] is not first[m] for m in space.module_names)
    assert {k[3] for k in cache.layers} == {"cpu", "cuda:7"}


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["hqq", "gptq"])
def test_cuda_move_gives_cuda_layers(backend):
    model = tiny_llama(seed=0)
    space = _space(model)
    a = space.uniform(bits=4, rank=0)
    ids = calib_for(backend, model.config.vocab_size)
    quantize_model(model, space, a, backend, calib_ids=ids)
    model.cuda()
    q = quantize_model(model, space, a, backend, calib_ids=ids)
    for m in space.module_names:
        packed, _, _ = get_backend(backend).module_tensors(q.get_submodule(m))
        assert all(t.is_cuda for t in packed)
    assert quant_cache(model).hits == 0


# ------------------------------------------------------------------ LRU byte cap
def _hqq_layers(n: int = 4):
    """``n`` equally sized HQQ layers (q_proj of the tiny model at 4 bits, different seeds)."""
    be = get_backend("hqq")
    out = []
    for i in range(n):
        lin = nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(64, 64, generator=torch.Generator().manual_seed(i)))
        out.append(be.quantize(lin, 4))
    return be, out


def test_layer_bytes_count_backend_held_tensors():
    be, (q, *_) = _hqq_layers(1)
    want = sum(be.weight_bytes(64, 64, 4))
    assert apply_mod.layer_bytes(q, be) == want
    # HQQ keeps scale/zero in its meta dict, outside parameters()/buffers(): counting only those is short
    assert storage_bytes([*q.parameters(), *q.buffers()]) < want


def test_lru_evicts_least_recently_used_and_keeps_bytes_exact():
    be, (A, B, C, D) = _hqq_layers(4)
    s = apply_mod.layer_bytes(A, be)
    keys = [(f"m{i}", 4, "hqq", "cpu", "float32") for i in range(4)]
    cache = QuantCache(max_bytes=3 * s)
    for k, q in zip(keys[:3], (A, B, C)):
        assert cache.get(k) is None
        cache.put(k, q, be)
    assert cache.bytes == 3 * s == _recount(cache, be) and cache.evictions == 0
    assert cache.get(keys[0]) is A  # hit: A becomes most recently used, B is now the oldest
    cache.put(keys[3], D, be)
    assert list(cache.layers) == [keys[2], keys[0], keys[3]]
    assert (cache.hits, cache.misses, cache.evictions) == (1, 3, 1)
    assert cache.bytes == 3 * s == _recount(cache, be)
    # lowering the cap evicts at once, oldest first
    cache.max_bytes = s
    assert list(cache.layers) == [keys[3]] and cache.evictions == 3
    assert cache.bytes == s == _recount(cache, be)
    cache.clear()
    assert cache.bytes == 0 == _recount(cache, be) and not cache.layers


def test_cap_never_evicts_the_entry_just_inserted():
    be, (A, B) = _hqq_layers(2)
    cache = QuantCache(max_bytes=0)
    cache.put(("a", 4, "hqq", "cpu", "float32"), A, be)
    assert list(cache.layers) == [("a", 4, "hqq", "cpu", "float32")]
    assert cache.bytes == apply_mod.layer_bytes(A, be) > 0
    cache.put(("b", 4, "hqq", "cpu", "float32"), B, be)
    assert list(cache.layers) == [("b", 4, "hqq", "cpu", "float32")] and cache.evictions == 1
    assert cache.bytes == _recount(cache, be)


@pytest.mark.parametrize("backend", ["hqq", "gptq"])
def test_quantize_model_hits_move_entries_to_mru(backend):
    """4-bit, 8-bit, 4-bit again (hits), then 2-bit: the cap evicts 8-bit layers, never the re-used 4-bit ones."""
    model = tiny_llama(seed=0)
    space = _space(model)
    ids = calib_for(backend, model.config.vocab_size)
    be = get_backend(backend)
    cache = quant_cache(model)
    quantize_model(model, space, space.uniform(4, 0), be, calib_ids=ids)
    b4 = cache.bytes
    quantize_model(model, space, space.uniform(8, 0), be, calib_ids=ids)
    set_quant_cache_limit(model, cache.bytes)  # exactly the 4- and 8-bit layers
    assert cache.evictions == 0
    n = len(space.module_names)
    quantize_model(model, space, space.uniform(4, 0), be, calib_ids=ids)
    assert cache.hits == n
    q2 = _qlayers(quantize_model(model, space, space.uniform(2, 0), be, calib_ids=ids), space)
    bits_left = [k[1] for k in cache.layers]
    assert bits_left.count(4) == n and bits_left.count(2) == n
    assert 0 < cache.evictions == 3 * n - len(cache.layers) and 0 < bits_left.count(8) < n
    assert cache.bytes == _recount(cache, be) == _exact_bytes(model, cache, be) <= cache.max_bytes
    assert cache.bytes >= b4 + sum(apply_mod.layer_bytes(q, be) for q in q2.values())
    # the re-used 4-bit layers are still served from the cache
    misses, hits = cache.misses, cache.hits
    quantize_model(model, space, space.uniform(4, 0), be, calib_ids=ids)
    assert (cache.misses - misses, cache.hits - hits) == (0, n)


def test_none_backend_caches_nothing():
    model = tiny_llama(seed=0)
    space = SearchSpace.from_model(model, bits=(16,), ranks=(0,), granularity="block")
    q = quantize_model(model, space, space.uniform(16, 0), "none")
    cache = quant_cache(model)
    assert cache.bytes == 0 and not cache.layers and cache.misses == 0
    assert (
        q.get_submodule(space.module_names[0]).weight.data_ptr()
        == model.get_submodule(space.module_names[0]).weight.data_ptr()
    )


# ------------------------------------------------------------------ defaults and the environment
def test_default_cap_is_half_the_model_with_a_floor(monkeypatch):
    monkeypatch.delenv(CACHE_BYTES_ENV, raising=False)
    model = tiny_llama(seed=0)
    tensors = [*model.parameters(), *model.buffers()]
    own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    model_bytes = sum(own.values())
    assert quant_cache(model).max_bytes == max(2**30, model_bytes // 2) == 2**30
    monkeypatch.setattr(layer_cache, "MIN_DEFAULT_CACHE_BYTES", 0)  # the cap is computed where the cache lives
    assert default_cache_limit(model) == model_bytes // 2
    assert QuantCache().max_bytes == 4 * 2**30
    with pytest.raises(ValueError, match="max_bytes"):
        QuantCache(max_bytes=-1)


@pytest.mark.parametrize(
    ("value", "want"), [("12345", 12345), ("1MiB", 2**20), ("2GB", 2 * 10**9), ("none", None)]
)
def test_env_var_sets_the_cap(monkeypatch, value, want):
    monkeypatch.setenv(CACHE_BYTES_ENV, value)
    assert quant_cache(nn.Linear(4, 4)).max_bytes == want
    assert QuantCache().max_bytes == want


def test_env_cap_applies_to_quantize_model(monkeypatch):
    be, (A,) = _hqq_layers(1)
    one = apply_mod.layer_bytes(A, be)  # one 64x64 layer; the tiny model's q_proj is 64x64 too
    monkeypatch.setenv(CACHE_BYTES_ENV, str(one))
    model = tiny_llama(seed=0)
    space = _space(model)
    quantize_model(model, space, space.uniform(4, 0), "hqq")
    cache = quant_cache(model)
    assert cache.max_bytes == one and len(cache.layers) == 1
    assert cache.evictions == len(space.module_names) - 1


def test_env_var_rejects_junk(monkeypatch):
    monkeypatch.setenv(CACHE_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match=CACHE_BYTES_ENV):
        quant_cache(nn.Linear(4, 4))


# ------------------------------------------------------------------ GPTQ statistics on the CPU
def test_gptq_calibration_stats_come_back_on_cpu():
    model = tiny_llama(seed=0)
    space = _space(model)
    ids = calib_for("gptq", model.config.vocab_size)
    stats = GPTQBackend().calibrate(model, space.module_names, ids)
    assert set(stats) == set(space.module_names)
    for name, H in stats.items():
        in_f = model.get_submodule(name).in_features
        assert H.device.type == "cpu" and H.dtype == torch.float32 and H.shape == (in_f, in_f)
    # q/k/v (and gate/up) read one input: they still share one H object after the move
    assert stats["model.layers.0.self_attn.q_proj"] is stats["model.layers.0.self_attn.v_proj"]
    assert stats["model.layers.0.mlp.gate_proj"] is stats["model.layers.0.mlp.up_proj"]
    assert stats["model.layers.0.self_attn.q_proj"] is not stats["model.layers.0.self_attn.o_proj"]


@pytest.mark.cuda
def test_gptq_cuda_calibration_returns_cpu_hessians_and_quantize_moves_them():
    model = tiny_llama(seed=0).cuda()
    space = _space(model)
    ids = calib_for("gptq", model.config.vocab_size)
    be = GPTQBackend()
    stats = be.calibrate(model, space.module_names, ids)
    assert all(H.device.type == "cpu" for H in stats.values())
    name = space.module_names[0]
    lin = model.get_submodule(name)
    q_cpu_h = be.quantize(lin, 4, calib=stats[name])
    q_gpu_h = be.quantize(lin, 4, calib=stats[name].cuda())
    assert q_cpu_h.qweight.is_cuda
    assert torch.equal(q_cpu_h.qweight, q_gpu_h.qweight) and torch.equal(q_cpu_h.scales, q_gpu_h.scales)
