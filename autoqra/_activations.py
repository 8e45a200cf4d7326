r"""Activation-memory estimate for one LoRA training step of a decoder-only LM (fp32 compute).

The estimate is a per-token linear model in the model's dimensions, fitted on measured
peaks (``memory_trace.StorageTracker``) of tiny Llamas of five shapes, batch shapes
1×64 and 2×128, ranks 8/16, dropout on/off (40 runs, within ±15 %, most within ±3 %),
and checked on SmolLM2 (README: "activation estimate"). In bytes, with N = batch · seq tokens:

* logits, log-softmax and their gradients: ``16 · N · vocab``
* per decoder block: ``N · (13 · hidden + 27 · intermediate)``
* per LoRA module of rank r: ``4 · N · r`` (the ``x·A`` output) + ``5 · N · in_features`` when
  dropout > 0 (the dropped copy, fp32, and its 1-byte mask)
* per quantized module: ``backend.activation_delta[bits] · N · in_features`` (negative: a quantized
  layer's custom backward keeps less than ``nn.Linear``'s autograd; measured per backend against
  the unquantized path: HQQ −3.4, bnb nf4 −4.85 on SmolLM2; bnb 8-bit −2.0, GPTQ −4.75 from tiny
  Llamas scaled by the SmolLM2/tiny ratio of the first two)
* transients: ``4 · vocab · hidden`` (tied-weight copy) + ``32 · blocks · hidden²``

The measured peak includes LoRA gradients created during backward; those are counted
separately (``lora_grad_bytes``), so the estimate is compared with peak − gradient bytes.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from autoqra.quant_backends import UNQUANTIZED_BITS


def _dims(model: nn.Module) -> tuple[int, int, int, int]:
    cfg = getattr(model, "config", None)
    get = (lambda k, d=0: getattr(cfg, k, d) or d) if cfg is not None else (lambda k, d=0: d)
    hidden = get("hidden_size") or get("n_embd") or get("d_model")
    inter = get("intermediate_size") or get("n_inner") or 4 * hidden
    vocab = get("vocab_size")
    blocks = get("num_hidden_layers") or get("n_layer")
    return int(hidden), int(inter), int(vocab), int(blocks)


def activation_table(model: nn.Module, space, backend, train) -> tuple[int, np.ndarray, np.ndarray]:
    """Return ``(fixed, per_rank[u, rank_idx], per_bits[u, bits_idx])`` in bytes."""
    hidden, inter, vocab, blocks = _dims(model)
    n_tok = train.batch_size * train.seq_len
    fixed = 16 * n_tok * vocab + n_tok * blocks * (13 * hidden + 27 * inter)
    fixed += 4 * vocab * hidden + 32 * blocks * hidden * hidden
    dropout = train.lora_dropout > 0
    per_rank = np.zeros((space.n_units, len(space.ranks)), dtype=np.int64)
    per_bits = np.zeros((space.n_units, len(space.bits)), dtype=np.int64)
    delta = getattr(backend, "activation_delta", {}) or {}
    for u, unit in enumerate(space.units):
        ins = [i for _, i in unit.shapes]
        for j, r in enumerate(space.ranks):
            if r > 0:
                per_rank[u, j] = sum(4 * n_tok * r + (5 * n_tok * i if dropout else 0) for i in ins)
        for j, b in enumerate(space.bits):
            if b != UNQUANTIZED_BITS:
                per_bits[u, j] = int(round(delta.get(b, 0.0) * n_tok * sum(ins)))
    return int(fixed), per_rank, per_bits
