r"""What a search unit is made of: named weight tensors of a kind, found by walking the module tree.

A **unit** (one bit-width and, where it has one, one LoRA rank) is a named group of weight tensors.
Each :class:`WeightTensor` has a *kind*:

* ``linear``: a 2-D weight ``(out, in)`` of an ``nn.Linear`` (fused ``qkv_proj`` / ``gate_up_proj`` /
  ``query_key_value`` included) or of a GPT-2 ``Conv1D``, whose weight is stored transposed ``(in, out)``
  (``transposed=True``; ``shape`` is always the logical ``(out, in)``);
* ``experts``: a 3-D tensor of a mixture-of-experts layer, logical shape ``(E, out, in)``, stored
  ``(E, out, in)`` (Mixtral, Qwen3-MoE) or ``(E, in, out)`` (gpt-oss, ``transposed=True``), quantized per
  expert slice.
* ``embedding``: the input token embedding ``(vocab, hidden)`` (quantized rows, dequantized on lookup);
* ``head``: the output projection ``(vocab, hidden)``; when it is tied to the embedding (one tensor) it is
  listed with ``tied=True`` in the embedding's unit and holds no bytes of its own.

Embedding and head units (:func:`embedding_units`) have their own bit options and no LoRA rank
(:data:`NO_RANK_KINDS`). :func:`discover` walks the decoder blocks (the
model's largest ``nn.ModuleList`` of identical blocks) and returns every weight matrix in them with
its kind, or the reason it is left out (a router, or a layout autoqra cannot quantize), so coverage is
always known (:class:`Coverage`): nothing is matched against one family's projection names.

The parts live in their own modules and are re-exported here: the data model (:class:`WeightTensor`,
:class:`Unit`) in :mod:`autoqra.unit_types`, the module-tree walk (:func:`discover`, :func:`embedding_units`,
:func:`matches`, :func:`expert_params`, :func:`is_linear_like`) in :mod:`autoqra.discovery`, and
:class:`Coverage` in :mod:`autoqra.coverage`.
"""

from __future__ import annotations

from autoqra.coverage import COVERAGE_WARN, Coverage, coverage  # noqa: F401
from autoqra.discovery import (  # noqa: F401
    EXPERT_PARAMS,
    Found,
    conv1d_class,
    decoder_blocks,
    discover,
    embedding_units,
    expert_params,
    is_linear_like,
    matches,
    suffix,
)
from autoqra.unit_types import KINDS, NO_RANK_KINDS, Unit, WeightTensor  # noqa: F401
