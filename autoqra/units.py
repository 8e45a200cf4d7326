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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs
from torch import nn

log = logging.getLogger(__name__)

KINDS = ("linear", "experts", "embedding", "head")
#: Kinds that never get a LoRA adapter (a unit made of them has rank 0 only).
NO_RANK_KINDS = ("embedding", "head")
#: Parameter names of a transformers-5 experts module (``@use_experts_implementation``) that hold experts.
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")
#: Share of decoder weights in the space below which :meth:`Coverage.warn` warns.
COVERAGE_WARN = 0.90


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


# ------------------------------------------------------------------------------------------ discovery
def conv1d_class() -> type[nn.Module] | None:
    """transformers' GPT-2 ``Conv1D`` (``None`` if it cannot be imported)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2 ``Conv1D``."""
    conv = conv1d_class()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


def expert_params(module: nn.Module) -> tuple[str, ...]:
    """Names of the 3-D expert tensors of a supported experts module (``()`` if it is not one).

    Supported: transformers' standard experts modules (``@use_experts_implementation``: the flags
    ``has_gate``/``is_transposed`` are set) without a post-expert norm, holding ``gate_up_proj`` (or
    ``up_proj``) and ``down_proj`` as 3-D parameters with the experts on dim 0.
    """
    if not hasattr(module, "has_gate") or getattr(module, "has_post_expert_norm", False):
        return ()
    first = "gate_up_proj" if module.has_gate else "up_proj"
    names = (first, "down_proj")
    ps = [getattr(module, n, None) for n in names]
    if not all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in ps):
        return ()
    if len({p.shape[0] for p in ps}) != 1:
        return ()
    return names


def decoder_blocks(model: nn.Module) -> list[str]:
    """Full names of the decoder blocks: the children of the model's largest ``nn.ModuleList`` whose items
    share one class (by parameter count; works on the meta device). ``[]`` if there is none."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > best_n:
            best, best_n = name, n
    if best is None:
        return []
    return [f"{best}.{i}" if best else str(i) for i in range(len(model.get_submodule(best)))]


def _n_experts(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 1:
            return v
    return 0


def _is_router(name: str, module: nn.Module, out_features: int, n_experts: int) -> bool:
    """A mixture-of-experts router/gate (kept 16-bit): its output is the expert count (or one gate)."""
    if n_experts == 0:
        return False
    leaf = name.rsplit(".", 1)[-1].lower()
    cls = type(module).__name__.lower()
    return "router" in cls or leaf in ("gate", "router") or out_features in (n_experts, 1)


@attrs.frozen
class Found:
    """A weight matrix inside the decoder blocks: a :class:`WeightTensor`, or why it is left out.

    ``reason``: ``None`` (a candidate for the space), ``"router"`` (kept 16-bit by design, not counted
    in coverage) or a sentence saying why autoqra cannot quantize it (counted as left out).
    """

    block: str
    tensor: WeightTensor
    reason: str | None = None


def discover(model: nn.Module) -> list[Found]:
    """Every floating-point weight matrix (``dim >= 2``) inside the decoder blocks, in module order.

    Kinds: ``nn.Linear`` and ``Conv1D`` weights are ``linear``; the 3-D tensors of a supported experts
    module (:func:`expert_params`) are ``experts``; routers are found by their output size (the expert
    count, or 1 for a shared-expert gate) or name; any other matrix is reported with a reason.
    """
    n_exp = _n_experts(model)
    conv = conv1d_class()
    out: list[Found] = []
    for block in decoder_blocks(model):
        for mname, mod in model.get_submodule(block).named_modules(prefix=block):
            if isinstance(mod, nn.Linear) or (conv is not None and isinstance(mod, conv)):
                w = mod.weight
                transposed = not isinstance(mod, nn.Linear)
                o, i = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
                t = WeightTensor(f"{mname}.weight", "linear", (o, i), mname, transposed)
                out.append(Found(block, t, "router" if _is_router(mname, mod, o, n_exp) else None))
                continue
            experts = expert_params(mod)
            for pname, p in mod.named_parameters(recurse=False):
                if p.dim() < 2 or not p.is_floating_point():
                    continue
                full = f"{mname}.{pname}"
                if pname in experts:
                    tr = bool(getattr(mod, "is_transposed", False))
                    e, a, b = p.shape
                    shape = (e, b, a) if tr else (e, a, b)
                    out.append(Found(block, WeightTensor(full, "experts", shape, mname, tr)))
                elif p.dim() == 2 and _is_router(mname, mod, p.shape[0], n_exp):
                    out.append(Found(block, WeightTensor(full, "linear", tuple(p.shape), mname), "router"))
                else:
                    why = (f"a {p.dim()}-D parameter of {type(mod).__name__} (only nn.Linear, Conv1D and "
                           "transformers' standard experts modules are quantized)")
                    shape = tuple(p.shape[:2]) + ((p[0, 0].numel(),) if p.dim() > 2 else ())
                    kind = "linear" if p.dim() == 2 else "experts"
                    out.append(Found(block, WeightTensor(full, kind, shape, mname), why))
    return out


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def embedding_units(model: nn.Module) -> list[Unit]:
    """The token embedding and the output head as units: one unit (named after the embedding module) when the
    head is tied to the embedding, else one each. Works on the meta device.

    Found through ``get_input_embeddings()`` (an ``nn.Embedding``) and ``get_output_embeddings()`` (an
    ``nn.Linear`` of ``(vocab, hidden)``, tied when it holds the embedding's very tensor). A model without
    them (or with other module types) yields ``[]``.
    """
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    emb_name = _module_name(model, emb) if isinstance(emb, nn.Embedding) else None
    head_name = _module_name(model, head) if isinstance(head, nn.Linear) else None
    units: list[Unit] = []
    tied = emb_name is not None and head_name is not None and head.weight is emb.weight
    if emb_name is not None:
        tensors = [WeightTensor(f"{emb_name}.weight", "embedding", tuple(emb.weight.shape), emb_name)]
        if tied:
            tensors.append(WeightTensor(f"{head_name}.weight", "head", tuple(head.weight.shape), head_name, tied=True))
        units.append(Unit.of(emb_name, tensors))
    if head_name is not None and not tied:
        units.append(Unit.of(head_name, [WeightTensor(f"{head_name}.weight", "head", tuple(head.weight.shape), head_name)]))
    return units


def matches(t: WeightTensor, targets: Sequence[str]) -> bool:
    """Whether ``target_modules`` entries select ``t``: an entry equal to the module's last name
    (``q_proj``, ``c_attn``, ``experts``), to the parameter name of an expert tensor (``gate_up_proj``:
    all expert tensors of that module then come along), or a dotted suffix of the module name."""
    leaf = t.module.rsplit(".", 1)[-1]
    for s in targets:
        if s == leaf or t.module.endswith("." + s):
            return True
        if t.kind == "experts" and s in EXPERT_PARAMS:
            return True
    return False


def suffix(t: WeightTensor) -> str:
    """The ``target_modules`` entry that selects ``t`` (its module's last name)."""
    return t.module.rsplit(".", 1)[-1]


# ------------------------------------------------------------------------------------------ coverage
@attrs.frozen
class Coverage:
    """Share of the decoder blocks' weights (elements of weight matrices, routers excluded) in the space.

    Attributes:
        covered / total: weight elements in the space / in all decoder weight matrices but routers.
        left_out: ``(tensor name, elements, reason)`` of the matrices not in the space.
        suggest: ``target_modules`` entries that would add the left-out weights autoqra can quantize.
    """

    covered: int
    total: int
    left_out: tuple[tuple[str, int, str], ...] = ()
    suggest: tuple[str, ...] = ()

    @property
    def share(self) -> float:
        return self.covered / self.total if self.total else 1.0

    def line(self) -> str:
        """``covered: 99.8 % of decoder weights`` (plus what is left out, when something is)."""
        s = f"covered: {100 * self.share:.1f} % of decoder weights"
        if self.left_out:
            s += f" ({len(self.left_out)} weight matrices left out)"
        return s

    def warning(self) -> str | None:
        """The warning text when the share is below :data:`COVERAGE_WARN`, else ``None``."""
        if self.share >= COVERAGE_WARN:
            return None
        names = ", ".join(n for n, _, _ in self.left_out[:8]) + (" ..." if len(self.left_out) > 8 else "")
        msg = f"only {100 * self.share:.1f} % of the decoder weights are in the search space; left out (16-bit): {names}"
        if self.suggest:
            msg += f"; target_modules={list(self.suggest)} would add them"
        why = sorted({r for _, _, r in self.left_out if r != "not in target_modules"})
        if why:
            msg += "; cannot be quantized: " + "; ".join(why)
        return msg

    def to_dict(self) -> dict[str, Any]:
        return {"covered": self.covered, "total": self.total, "share": self.share,
                "left_out": [list(x) for x in self.left_out], "suggest": list(self.suggest)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Coverage:
        return cls(int(d["covered"]), int(d["total"]), tuple(tuple(x) for x in d.get("left_out", ())),
                   tuple(d.get("suggest", ())))


def coverage(found: Sequence[Found], chosen: Sequence[WeightTensor]) -> Coverage:
    """The :class:`Coverage` of ``chosen`` tensors among everything :func:`discover` found."""
    names = {t.name for t in chosen}
    total = covered = 0
    left: list[tuple[str, int, str]] = []
    suggest: dict[str, None] = {}
    for f in found:
        if f.reason == "router":
            continue
        total += f.tensor.numel
        if f.tensor.name in names:
            covered += f.tensor.numel
        elif f.reason is None:
            left.append((f.tensor.name, f.tensor.numel, "not in target_modules"))
            suggest[suffix(f.tensor)] = None
        else:
            left.append((f.tensor.name, f.tensor.numel, f.reason))
    return Coverage(covered, total, tuple(left), tuple(suggest))
