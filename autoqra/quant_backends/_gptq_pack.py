r"""GPTQ storage: exact bit packing of codes into int32 words.

Storage format (the one GPTQ checkpoints use, zero points stored as-is, i.e. the "v2" zeros):

* ``qweight``: int32 ``(ceil(in * bits / 32), out)``. Column ``o`` of the weight is a little-endian
  bit stream packed along ``in_features``: code ``k`` sits at bit ``k * bits`` of the stream, bit
  ``p`` of the stream is bit ``p % 32`` of word ``p // 32``. For 2/4/8 bits that is ``32 / bits``
  codes per word (code ``j`` of a word at bit ``j * bits``); for 3 bits it is exactly GPTQ's 3-bit
  layout (32 codes in 3 words, codes 10 and 21 straddle a word boundary). Shapes whose stream
  does not fill the last word are zero-padded to a whole word.
* ``scales``: ``(n_groups, out)`` in the compute dtype, ``n_groups = in / group_size``.
* ``qzeros``: int32 ``(n_groups, ceil(out * bits / 32))``, the same bit stream along ``out``.
* ``g_idx``: int32 ``(in,)`` group of each input column, only with ``act_order``.

Dequantization: ``W[o, k] = (q[k, o] - z[g(k), o]) * s[g(k), o]``.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def n_words(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes of ``bits`` bits."""
    return math.ceil(n * bits / 32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(n, m)`` in ``[0, 2**bits)`` along dim 0 into int32 ``(n_words(n, bits), m)``."""
    n, m = codes.shape
    q = codes.to(torch.int64)
    pos = torch.arange(n, device=q.device) * bits
    word, off = pos // 32, pos % 32
    words = torch.zeros(n_words(n, bits) + 1, m, dtype=torch.int64, device=q.device)
    # Fields never overlap, so adding equals OR-ing.
    words.index_add_(0, word, (q << off[:, None]) & _MASK32)
    spill = off + bits > 32
    if bool(spill.any()):
        words.index_add_(0, word[spill] + 1, q[spill] >> (32 - off[spill])[:, None])
    words = words[:-1]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_rows(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``(words, m)`` -> int32 codes ``(n, m)``."""
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # fast path: whole codes per word, int32 shifts (sign bits are masked away)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        q = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
        return q.reshape(-1, packed.shape[1])[:n]
    if bits == 3 and n % 32 == 0:
        return _unpack3(packed, n)
    pos = torch.arange(n, device=packed.device) * bits
    word, off = pos // 32, pos % 32
    u = packed.to(torch.int64) & _MASK32
    nxt = (word + 1).clamp(max=packed.shape[0] - 1)
    both = u[word] | (u[nxt] << 32)
    return ((both >> off[:, None]) & mask).to(torch.int32)


def _unpack3(packed: torch.Tensor, n: int) -> torch.Tensor:
    """3-bit fast path: every 3 words hold 32 codes; codes 10 and 21 straddle a word boundary."""
    w = packed.view(n // 32, 3, -1)
    w0, w1, w2 = w[:, 0:1], w[:, 1:2], w[:, 2:3]
    s = torch.arange(0, 30, 3, dtype=torch.int32, device=packed.device).view(1, -1, 1)
    c10 = ((w0 >> 30) & 3) | ((w1 & 1) << 2)
    c21 = ((w1 >> 31) & 1) | ((w2 & 3) << 1)
    parts = [(w0 >> s) & 7, c10, (w1 >> (s + 1)) & 7, c21, (w2 >> (s + 2)) & 7]
    return torch.cat(parts, 1).reshape(n, -1)
