r"""Activation-memory estimate for one LoRA training step of a decoder-only LM.

A per-token linear model in the model's dimensions, one coefficient set per training precision,
fitted on measured peaks (:func:`autoqra.memory.trace.measure_peak`, the CPU storage tracker) of
one forward+backward. The measured peak includes LoRA gradients created during backward; those are
counted separately (``lora_grad_bytes``), so the estimate is compared with peak − gradient bytes.
In bytes, with N = batch · seq tokens:

**fp32** (no autocast). Fitted on tiny Llamas of five shapes, batch shapes 1×64 and 2×128, ranks
8/16, dropout on/off (40 runs, within ±15 %, most within ±3 %), and checked on SmolLM2 (README:
"activation estimate"):

* logits, log-softmax and their gradients: ``16 · N · vocab``
* per decoder block: ``N · (13 · hidden + 27 · intermediate)``
* per LoRA module of rank r: ``4 · N · r`` (the ``x·A`` output) + ``5 · N · in_features`` when
  dropout > 0 (the dropped copy, fp32, and its 1-byte mask)
* per quantized module: ``backend.activation_delta[bits] · N · in_features`` (negative: a quantized
  layer's custom backward keeps less than ``nn.Linear``'s autograd; measured per backend against
  the unquantized path on SmolLM2, batch 4×128, dropout 0: HQQ −7.27 and GPTQ −6.48 with autoqra's
  dequantize-matmul (it keeps no input for backward), bnb nf4 −6.57, bnb 8-bit −5.87 (tiny Llamas need
  −5.8 / −5.1 / −5.2 / −4.6, so they are estimated up to ~12 % low); with dropout 0.05 these were
  −3.4 (hqq's own backward) / −4.75 / −4.85 / −2.0)
* transients: ``4 · vocab · hidden`` (tied-weight copy) + ``32 · blocks · hidden²``

**bf16 / fp16** (``torch.autocast`` in that dtype, frozen weights and quantization compute dtype
in it, LoRA weights fp32). ``W`` = Σ ``in · out`` over the searched linears, ``e = 2`` bytes:

* logits: ``max(12 · N · vocab, dequant · max_module(in · out))`` — the peak is either at the loss
  backward (fp32 log-softmax, its gradient and the NLL gradient alive) or, for small batches of a
  model with large layers, inside the first quantized layer's backward (its dequantization
  temporaries alive); ``dequant`` bytes per weight: HQQ 5, GPTQ 7 (int32 unpacking), bnb 2,
  unknown backends 2, 0 with the ``none`` backend or a ladder without quantized bits
* per decoder block: ``N · (9.25 · hidden + 7.25 · intermediate)``
* per LoRA module of rank r: ``2 · N · r`` (bf16 ``x·A``) + ``2 · N · in`` (peft casts the input
  to the fp32 adapter dtype, autocast back to bf16: a copy per module) − ``2 · r · (in + out)``
  (autocast's cached bf16 copy of A and B, +2 per parameter, minus the fp32 gradient, −4, that
  ``lora_grad_bytes`` counts but that does not exist yet at the peak) + ``4 · N · in`` when
  dropout > 0 (the fp32 dropout mask)
* per quantized module: ``−e · in · out + views + tok · N · in``: the tracker counts the storage
  of every pre-existing tensor an op returns a view of (``weight.t()``), so an unquantized frozen
  weight shows up in the peak; a quantized layer removes that and adds the quantized storages its
  dequantization views (``views`` from ``backend.weight_bytes``: HQQ none, bnb the packed weight,
  GPTQ and unknown backends packed + metadata); ``tok``: bnb 8-bit 1.0, else 0
* transients: ``e · (vocab · hidden + W)`` (the frozen weights' views, lm_head included)

How the bf16/fp16 numbers were fitted: the terms were traced op by op (which tensors are alive at
the peak) and the mechanistic ones kept (logits 12, LoRA 2/2/−2/4, the weight views, bnb 8-bit
``tok`` = 1.0, confirmed by a free least-squares fit: 1.01); the two per-block coefficients are a
least-squares fit on relative error (9.18, 7.25, rounded) and ``dequant`` was chosen on a grid
(HQQ 5 and GPTQ 7 instead of the traced 6 and 8 balance the two peak locations). Runs, per
precision (330): tiny Llamas (hidden, intermediate, blocks, vocab) = (128, 256, 2, 512),
(256, 512, 2, 1024), (128, 384, 4, 512), (256, 768, 3, 2048), (384, 1024, 2, 1024); batch 1×64 and
2×128; backends none, HQQ 4, bnb nf4 and 8-bit, GPTQ 4 (compute dtype = the precision's);
uniform assignments at ranks 8/16 with dropout 0 and 0.05, two mixed ones (alternating quantized /
16-bit units and rank / 0); HQQ and GPTQ at 2/3/8 bits. bf16 and fp16 peaks were byte-identical
run by run (same element size, same graph), so the two fits coincide.

Reached (both precisions): tiny runs −10.3 % … +10.4 % (mean |error| 2.7 %; worst: the 384-hidden
shape at 1×64 with HQQ/GPTQ, where the peak sits inside a quantized layer's backward and the
``max`` above is only approximate; none −3.5 … +4.2 %, bnb −5.0 … +5.3 %); SmolLM2-135M, batch
4×128, r8, out of sample: none and HQQ 4, dropout 0.05 and 0, −1.0 % … −0.3 %; bnb 4/8 and GPTQ 4
(``--smollm2 all``) −1.4 % … −0.3 %. The fit assumes frozen weights stored in the compute dtype
(``load_model(dtype=torch.bfloat16)``); with fp32 weights under bf16 autocast a tiny check was
+3 … +5 %. Note that the tracker's view counting (above, and the fp32 "transients") makes the
estimate count the frozen unquantized weights a second time (they are in ``model_bytes`` too):
the estimate follows the measurement, not device memory. ``benchmarks/studies/activation_fit.py``
reproduces the runs (``benchmarks/studies/results/activation_fit.json``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from torch import nn

from autoqra.quant_backends import UNQUANTIZED_BITS

PRECISIONS = ("fp32", "bf16", "fp16")


class Coef16(NamedTuple):
    """Bytes per unit of each term of the 16-bit (autocast) estimate; see the module docstring."""

    elem: int = 2  #: bytes per frozen-weight element (the compute dtype)
    logits: float = 12.0  #: per token · vocab
    block_hidden: float = 9.25  #: per token · block · hidden
    block_inter: float = 7.25  #: per token · block · intermediate
    lora_rank: float = 2.0  #: per token · rank, per LoRA module
    lora_in: float = 2.0  #: per token · in_features, per LoRA module
    lora_param: float = -2.0  #: per LoRA parameter
    dropout: float = 4.0  #: per token · in_features, per LoRA module, when dropout > 0


class Quant16(NamedTuple):
    """Per-backend terms of a quantized module under 16-bit autocast."""

    views: tuple[str, ...]  #: which of ``weight_bytes``' (packed, meta) the tracker sees as views
    dequant: float  #: dequantization temporaries, bytes per weight of the largest quantized module
    tok: dict[int, float]  #: bytes per token · in_features, by bits (absent: 0)


#: Per precision: the coefficients and the per-backend quantized-module terms (fitted separately;
#: bf16 and fp16 measured byte-identical peaks).
COEF16: dict[str, Coef16] = {"bf16": Coef16(), "fp16": Coef16()}
QUANT16: dict[str, dict[str, Quant16]] = {
    p: {
        "hqq": Quant16(views=(), dequant=5.0, tok={}),
        "bnb": Quant16(views=("packed",), dequant=2.0, tok={8: 1.0}),
        "gptq": Quant16(views=("packed", "meta"), dequant=7.0, tok={}),
    }
    for p in ("bf16", "fp16")
}
#: Backends without a fitted entry: assume every quantized storage is viewed and one dequantized weight.
QUANT16_DEFAULT = Quant16(views=("packed", "meta"), dequant=2.0, tok={})


def _dims(model: nn.Module) -> tuple[int, int, int, int]:
    """``(hidden, intermediate, vocab, blocks)``; for a mixture-of-experts model the intermediate size is
    what one token runs through: ``top_k`` experts' intermediate size plus a shared expert's."""
    cfg = getattr(model, "config", None)
    get = (lambda k, d=0: getattr(cfg, k, d) or d) if cfg is not None else (lambda k, d=0: d)
    hidden = get("hidden_size") or get("n_embd") or get("d_model")
    inter = get("intermediate_size") or get("n_inner") or get("ffn_dim") or 4 * hidden
    top_k = _top_k(model)
    if top_k:
        inter = top_k * (get("moe_intermediate_size") or inter) + get("shared_expert_intermediate_size")
    vocab = get("vocab_size")
    blocks = get("num_hidden_layers") or get("n_layer")
    return int(hidden), int(inter), int(vocab), int(blocks)


def _top_k(model: nn.Module) -> int:
    """Experts each token is routed to (0 for a dense model)."""
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "moe_top_k", None)
    return int(v) if isinstance(v, int) else 0


def _routed(model: nn.Module, t) -> int:
    """How many times each token passes through tensor ``t``: 1 for a linear, top-k for experts."""
    return max(1, _top_k(model)) if t.kind == "experts" else 1


def activation_table(
    model: nn.Module, space, backend, train, precision: str = "fp32"
) -> tuple[int, np.ndarray, np.ndarray]:
    """Return ``(fixed, per_rank[u, rank_idx], per_bits[u, bits_idx])`` in bytes.

    Args:
        model: the unquantized source model (the meta device is fine).
        space: the search space.
        backend: a :class:`~autoqra.quant_backends.QuantBackend` instance.
        train: the :class:`~autoqra.config.TrainSpec` (batch shape, LoRA dropout).
        precision: training precision, ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid; allowed: {', '.join(map(repr, PRECISIONS))}")
    if precision != "fp32":
        return _table_16bit(model, space, backend, train, precision)
    hidden, inter, vocab, blocks = _dims(model)
    n_tok = train.batch_size * train.seq_len
    fixed = 16 * n_tok * vocab + n_tok * blocks * (13 * hidden + 27 * inter)
    fixed += 4 * vocab * hidden + 32 * blocks * hidden * hidden
    dropout = train.lora_dropout > 0
    per_rank = np.zeros((space.n_units, len(space.ranks)), dtype=np.int64)
    per_bits = np.zeros((space.n_units, len(space.bits)), dtype=np.int64)
    delta = getattr(backend, "activation_delta", {}) or {}
    bgrid, rgrid = _grids(space)
    for u, unit in enumerate(space.units):
        # (tokens through the tensor, in_features): routed tokens for experts (each token visits top-k);
        # an embedding lookup runs no matmul (0); a quantized head runs the dequantize-matmul like a linear
        ins = [(n_tok * _routed(model, t), t.in_features) for t in unit.tensors if t.kind != "embedding"]
        for j, r in enumerate(rgrid[u]):
            if r > 0:
                per_rank[u, j] = sum(4 * n * r + (5 * n * i if dropout else 0) for n, i in ins)
        for j, b in enumerate(bgrid[u]):
            if b != UNQUANTIZED_BITS:
                per_bits[u, j] = int(round(delta.get(int(b), 0.0) * sum(n * i for n, i in ins)))
    return int(fixed), per_rank, per_bits


def _table_16bit(model: nn.Module, space, backend, train, precision: str) -> tuple[int, np.ndarray, np.ndarray]:
    c = COEF16[precision]
    q = QUANT16[precision].get(getattr(backend, "name", ""), QUANT16_DEFAULT)
    hidden, inter, vocab, blocks = _dims(model)
    n = train.batch_size * train.seq_len
    # embedding / head tensors are in the fixed terms already (vocab · hidden); their per-bits term below
    tensors = [t for unit in space.units for t in unit.tensors if t.kind not in ("embedding", "head")]
    quantizes = bool(getattr(backend, "supported_bits", ())) and any(b != UNQUANTIZED_BITS for b in space.bits)
    dequant = q.dequant * max((o * i for o, i in (t.matrix for t in tensors)), default=0) if quantizes else 0.0
    peak = max(c.logits * n * vocab, dequant)
    fixed = peak + n * blocks * (c.block_hidden * hidden + c.block_inter * inter)
    fixed += c.elem * (vocab * hidden + sum(t.numel for t in tensors))
    dropout = train.lora_dropout > 0
    per_rank = np.zeros((space.n_units, len(space.ranks)), dtype=np.int64)
    per_bits = np.zeros((space.n_units, len(space.bits)), dtype=np.int64)
    bgrid, rgrid = _grids(space)
    for u, unit in enumerate(space.units):
        for j, r in enumerate(rgrid[u]):
            if r > 0:
                per_rank[u, j] = round(
                    sum(
                        c.lora_rank * nt * r + (c.lora_in + (c.dropout if dropout else 0.0)) * nt * t.in_features
                        + c.lora_param * r * t.lora_params_per_rank
                        for t in unit.tensors
                        for nt in (n * _routed(model, t),)
                    )
                )
        for j, b in enumerate(bgrid[u]):
            if b != UNQUANTIZED_BITS:
                b = int(b)
                # a quantized head removes the frozen head's weight view like any quantized linear; an
                # embedding lookup views no weight (a tied head counts once, as the head)
                per_bits[u, j] = round(sum(
                    t.n_experts * _quant_delta(c, q, backend, t.out_features, t.in_features, b, 0)
                    + q.tok.get(b, 0.0) * n * _routed(model, t) * t.in_features
                    # a quantized head's dequantization temporaries (vocab · hidden) may be the new peak
                    + (max(0.0, q.dequant * t.numel - peak) if t.kind == "head" else 0.0)
                    for t in unit.tensors if t.kind != "embedding"))
    return int(round(fixed)), per_rank, per_bits


def _grids(space) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's bit / rank value per option index (``SearchSpace.bits_grid``; plain ladders for old spaces)."""
    if hasattr(space, "bits_grid"):
        return space.bits_grid(), space.ranks_grid()
    n = space.n_units
    return np.tile(np.asarray(space.bits), (n, 1)), np.tile(np.asarray(space.ranks), (n, 1))


def _quant_delta(c: Coef16, q: Quant16, backend, out_f: int, in_f: int, bits: int, n_tok: int) -> float:
    """Bytes one quantized ``(out_f, in_f)`` module adds (negative: saves) against the unquantized one."""
    packed, meta = backend.weight_bytes(out_f, in_f, bits)
    views = (packed if "packed" in q.views else 0) + (meta if "meta" in q.views else 0)
    return -c.elem * in_f * out_f + views + q.tok.get(bits, 0.0) * n_tok * in_f
