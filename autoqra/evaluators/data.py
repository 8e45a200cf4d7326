"""Fine-tuning text data: embedded pydoc task, user JSONL, instruction JSONL, ``datasets``; packing; batches.

Everything is deterministic: splits and data order come from SHA-256 and ``torch.Generator`` seeds, never
from Python's randomised ``hash()``. Nothing is downloaded (``datasets`` runs with the offline flags set).

This module is the public data API. Sources and splits live in :mod:`.sources`, tokenising, packing and
batches in :mod:`.packing`, the packaged lm-eval task in :mod:`.tasks.build`; their names are re-exported
here, so ``from autoqra.evaluators.data import ...`` works for all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from autoqra.evaluators.packing import TaskData, batches, build_task_data, iter_steps, pack
from autoqra.evaluators.sources import (  # noqa: F401 - the private helpers too, for old imports
    _HF_SUFFIX,
    PYDOC_SPLIT_FILE,
    SPLITS,
    TASKS_DIR,
    Source,
    TextSplits,
    _carve,
    _field,
    _from_split_dict,
    format_instruction,
    jsonl_texts,
    load_hf_texts,
    load_text_task,
    load_texts,
    read_jsonl,
    split_groups,
    stable_hash,
)
from autoqra.evaluators.tasks.build import mc_task_dir

__all__ = [
    "PYDOC_SPLIT_FILE",
    "SPLITS",
    "TASKS_DIR",
    "ByteTokenizer",
    "Source",
    "TaskData",
    "TextSplits",
    "batches",
    "build_task_data",
    "format_instruction",
    "iter_steps",
    "jsonl_texts",
    "load_hf_texts",
    "load_text_task",
    "load_texts",
    "mc_task_dir",
    "pack",
    "read_jsonl",
    "split_groups",
    "stable_hash",
]

log = logging.getLogger(__name__)


class ByteTokenizer:
    """Minimal deterministic tokenizer for models without one: UTF-8 bytes -> ids, EOS is the last id.

    Bytes map to ``b % min(256, vocab_size - 1)`` (lossless when ``vocab_size >= 257``); the EOS id is
    ``vocab_size - 1`` and never collides with a byte id.

    Args:
        vocab_size: the model's vocabulary size (>= 2).
    """

    def __init__(self, vocab_size: int = 512) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_id = vocab_size - 1
        self._n = min(256, vocab_size - 1)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (``add_special_tokens`` is accepted for HF compatibility and ignored)."""
        return [b % self._n for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode` (exact when ``vocab_size >= 257``); EOS ids are dropped."""
        return bytes(int(i) for i in ids if int(i) != self.eos_token_id).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size
