r"""The unit data model: :class:`WeightTensor` (one weight tensor with its kind) and :class:`Unit` (a named
group of them, one bit-width and, where it has one, one LoRA rank).

Kinds and their shapes are described in :mod:`autoqra.units`; embedding and head tensors never get a LoRA
rank (:data:`NO_RANK_KINDS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

KINDS = ("linear", "experts", "embedding", "head")
#: Kinds that never get a LoRA adapter (a unit made of them has rank 0 only).
NO_RANK_KINDS = ("embedding", "head")

#: How weights group into units: ``"block"`` (a decoder block), ``"sublayer"`` (the block's attention, its MLP /
#: experts: the module right below the block that holds the weight), ``"module"`` (one linear or experts module).
GRANULARITIES = ("block", "sublayer", "module")


@attrs.frozen
class WeightTensor:
    """One weight tensor of a unit.

    Attributes:
        name: full parameter name (``model.layers.0.self_attn.q_proj.weight``,
            ``model.layers.0.mlp.experts.gate_up_proj``).
        kind: ``"linear"``, ``"experts"``, ``"embedding"`` or ``"head"``.
        shape: logical shape: ``(out, in)`` for ``linear``, ``(E, out, in)`` for ``experts``,
            ``(vocab, hidden)`` for ``embedding`` and ``head``.
        module: full name of the module that owns it (what :func:`autoqra.apply.quantized_layers` replaces).
        transposed: stored as ``(in, out)`` / ``(E, in, out)`` (GPT-2 ``Conv1D``, gpt-oss experts).
        tied: a ``head`` that is the embedding's own tensor (no bytes of its own; quantized with it).
    """

    name: str
    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    shape: tuple[int, ...] = attrs.field(converter=lambda s: tuple(int(x) for x in s))
    module: str
    transposed: bool = False
    tied: bool = False

    @property
    def n_experts(self) -> int:
        """Expert slices (1 for a linear)."""
        return self.shape[0] if self.kind == "experts" else 1

    @property
    def out_features(self) -> int:
        return self.shape[-2]

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def matrix(self) -> tuple[int, int]:
        """``(out, in)`` of one quantized matrix (one expert slice for ``experts``)."""
        return self.shape[-2], self.shape[-1]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def lora_params_per_rank(self) -> int:
        """LoRA parameters per unit of rank: ``E · (in + out)`` (peft's ``lora_A [r·E, in]``, ``lora_B [out, r·E]``)."""
        return self.n_experts * (self.in_features + self.out_features)

    @property
    def param(self) -> str:
        """The parameter's own name inside its module (``weight``, ``gate_up_proj``)."""
        return self.name.rsplit(".", 1)[-1]

    def to_list(self) -> list[Any]:
        return [self.name, self.kind, list(self.shape), self.module, self.transposed] + ([True] if self.tied else [])

    @classmethod
    def from_list(cls, v: Sequence[Any]) -> WeightTensor:
        return cls(v[0], v[1], tuple(v[2]), v[3], bool(v[4]) if len(v) > 4 else False, bool(v[5]) if len(v) > 5 else False)


def _linear_tensors(modules: Sequence[str], shapes: Sequence[Sequence[int]]) -> tuple[WeightTensor, ...]:
    return tuple(WeightTensor(f"{m}.weight", "linear", tuple(s), m) for m, s in zip(modules, shapes))


@attrs.frozen
class Unit:
    """One searchable unit: a name and its weight tensors.

    ``Unit(name, modules, shapes)`` builds a unit of ``nn.Linear`` weights (the form every unit had
    before other kinds existed); :meth:`of` builds one from any tensors.

    Attributes:
        name: the block prefix (``model.layers.3``) or, at module granularity, the module's name.
        modules: the distinct modules owning the tensors, in order (what is swapped when quantizing).
        shapes: one ``(out, in)`` per tensor (for ``experts``: one expert slice's); for a unit of
            linears, ``shapes[i]`` belongs to ``modules[i]``.
        tensors: the weight tensors with their kinds.
    """

    name: str
    modules: tuple[str, ...] = attrs.field(converter=tuple)
    shapes: tuple[tuple[int, int], ...] = attrs.field(converter=lambda v: tuple(tuple(int(x) for x in s) for s in v))
    tensors: tuple[WeightTensor, ...] = attrs.field(converter=tuple)

    @tensors.default
    def _linears(self) -> tuple[WeightTensor, ...]:
        return _linear_tensors(self.modules, self.shapes)

    @classmethod
    def of(cls, name: str, tensors: Sequence[WeightTensor]) -> Unit:
        """A unit of ``tensors`` (``modules`` and ``shapes`` derived from them)."""
        mods = tuple(dict.fromkeys(t.module for t in tensors))
        return cls(name, mods, tuple(t.matrix for t in tensors), tuple(tensors))

    @property
    def n_weights(self) -> int:
        """Number of weights (elements) in all tensors of the unit."""
        return sum(t.numel for t in self.tensors)

    @property
    def lora_params_per_rank(self) -> int:
        """LoRA parameters per unit of rank: ``sum(E · (in + out))`` over the unit's tensors (0 without a rank)."""
        return 0 if not self.has_rank else sum(t.lora_params_per_rank for t in self.tensors)

    @property
    def kind(self) -> str:
        """``"embedding"`` (an embedding, with its tied head if any), ``"head"`` (an untied output head) or
        ``"block"`` (linears / experts: bits and a rank)."""
        kinds = {t.kind for t in self.tensors}
        if "embedding" in kinds:
            return "embedding"
        return "head" if kinds == {"head"} else "block"

    @property
    def has_rank(self) -> bool:
        """Whether the unit takes a LoRA rank (embedding and head units do not)."""
        return not any(t.kind in NO_RANK_KINDS for t in self.tensors)

    @property
    def is_plain(self) -> bool:
        """Only untransposed ``nn.Linear`` weights (its spec is the short ``[name, modules, shapes]`` form)."""
        return self.tensors == _linear_tensors(self.modules, self.shapes)

    def to_spec(self) -> list[Any]:
        """``[name, modules, shapes]`` (+ ``tensors`` when any is not a plain linear weight)."""
        spec: list[Any] = [self.name, list(self.modules), [list(s) for s in self.shapes]]
        if not self.is_plain:
            spec.append([t.to_list() for t in self.tensors])
        return spec

    @classmethod
    def from_spec(cls, v: Sequence[Any]) -> Unit:
        if len(v) > 3:
            return cls.of(v[0], [WeightTensor.from_list(t) for t in v[3]])
        return cls(v[0], tuple(v[1]), tuple(tuple(s) for s in v[2]))
