r"""Tokenising and packing texts into fixed-length blocks, and seeded batch order for training."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autoqra.evaluators.sources import SPLITS, Source, load_texts, stable_hash

log = logging.getLogger(__name__)


def pack(
    texts: Sequence[str], tokenizer: Any, block_size: int = 128, add_eos: bool = True, name: str = "texts"
) -> torch.Tensor:
    """Tokenize, join with EOS and cut into ``(n_blocks, block_size)`` int64 blocks (ragged tail dropped).

    Args:
        tokenizer: anything with ``encode(text, add_special_tokens=False)`` and ``eos_token_id`` (an HF
            tokenizer or :class:`ByteTokenizer`).
        name: used in error messages (e.g. the split name).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not texts:
        raise ValueError(f"{name}: empty dataset (no texts to pack)")
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ValueError("add_eos=True needs a tokenizer with an eos_token_id")
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t, add_special_tokens=False))
        if add_eos:
            ids.append(int(eos))
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"{name}: {len(ids)} tokens in total, fewer than one block of "
                         f"block_size={block_size} tokens; use a smaller block_size or more text")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


@dataclass(frozen=True)
class TaskData:
    """Packed token blocks per split, each ``LongTensor (n_blocks, block_size)``."""

    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    block_size: int
    source: str

    def fingerprint(self) -> str:
        """SHA-256 (hex, 16 chars) of all blocks: identifies the data in cache keys."""
        h = hashlib.sha256()
        for s in SPLITS:
            h.update(s.encode() + getattr(self, s).numpy().tobytes())
        return h.hexdigest()[:16]

    def spec(self) -> dict[str, Any]:
        """JSON-able identity: source, block size, blocks per split and the fingerprint."""
        return {"source": self.source, "block_size": self.block_size, "fingerprint": self.fingerprint(),
                **{f"{s}_blocks": int(getattr(self, s).shape[0]) for s in SPLITS}}


def build_task_data(
    source: Source = "pydoc", tokenizer: Any = None, block_size: int = 128, *, kind: str = "auto",
    text_field: str = "text", seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1),
    add_eos: bool = True,
) -> TaskData:
    """Load ``source`` (see :func:`load_texts`) and :func:`pack` every split.

    Args:
        tokenizer: an HF tokenizer, or ``ByteTokenizer(vocab_size)`` for models without one (required).
    """
    if tokenizer is None:
        raise ValueError("tokenizer is required; use ByteTokenizer(vocab_size) for a model without one")
    splits = load_texts(source, kind=kind, text_field=text_field, seed=seed, fractions=fractions)
    blocks = {s: pack(splits[s], tokenizer, block_size, add_eos, name=f"{source} [{s}]") for s in SPLITS}
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    log.info("task data %s: %s blocks of %d tokens", name, {s: len(b) for s, b in blocks.items()}, block_size)
    return TaskData(**blocks, block_size=block_size, source=name)


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(stable_hash("batches", seed, epoch))


def batches(
    blocks: torch.Tensor, batch_size: int, seed: int = 0, epoch: int = 0, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """One epoch of ``(batch_size, block_size)`` batches in a seeded order (depends on seed and epoch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    perm = torch.randperm(blocks.shape[0], generator=_generator(seed, epoch))
    stop = len(perm) - len(perm) % batch_size if drop_last else len(perm)
    for i in range(0, stop, batch_size):
        yield blocks[perm[i : i + batch_size]]


def iter_steps(blocks: torch.Tensor, batch_size: int, steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Exactly ``steps`` full batches, cycling over epochs (epoch ``e`` uses the order of
    ``batches(..., seed, epoch=e)``; a batch may straddle two epochs). Deterministic in ``seed``."""
    if batch_size < 1 or steps < 0:
        raise ValueError(f"batch_size must be >= 1 and steps >= 0, got {batch_size}, {steps}")
    buf: list[torch.Tensor] = []
    epoch = 0
    for _ in range(steps):
        while sum(len(b) for b in buf) < batch_size:
            buf.append(torch.randperm(blocks.shape[0], generator=_generator(seed, epoch)))
            epoch += 1
        flat = torch.cat(buf)
        yield blocks[flat[:batch_size]]
        buf = [flat[batch_size:]]
