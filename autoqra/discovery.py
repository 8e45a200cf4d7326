r"""Discovery: the weight matrices of a model's decoder blocks and its embedding / head, found by walking the
module tree.

:func:`discover` walks the decoder blocks (the model's largest ``nn.ModuleList`` of identical blocks) and
returns every weight matrix in them as a :class:`~autoqra.unit_types.WeightTensor` with its kind, or the
reason it is left out (:class:`Found`); :func:`embedding_units` gives the token embedding and the output head
as units; :func:`matches` applies ``target_modules``.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from torch import nn

from autoqra.unit_types import Unit, WeightTensor

#: Parameter names of a transformers-5 experts module (``@use_experts_implementation``) that hold experts.
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


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
