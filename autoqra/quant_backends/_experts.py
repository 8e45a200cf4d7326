r"""Mixture-of-experts tensors quantized per expert slice, and LoRA on them through peft's ``target_parameters``.

transformers 5 stores a layer's experts as 3-D parameters (``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``; gpt-oss transposed ``[E, in, out]``), not ``nn.Linear``.
:func:`quantize_experts` turns such a module into a :class:`QuantizedExperts`: each expert slice of
each expert tensor becomes one quantized layer of the backend (``backend.quantize`` of a linear whose
weight is the slice, so its bytes are exactly ``E × backend.weight_bytes(out, in, bits)``), held in
``quant[<param>][e]``. The router and the MoE block's forward are untouched: the block still routes
tokens and calls ``experts(hidden_states, top_k_index, top_k_weights)``; :meth:`QuantizedExperts.forward`
runs the experts' own eager computation (the expert loop of transformers' experts modules, their own
``_apply_gate`` and activation, biases), with each slice's matmul done by its quantized layer.

**LoRA.** peft targets 3-D expert parameters with ``LoraConfig(target_parameters=[...])``: a
``ParamWrapper`` per parameter (nested when one module has two) holding ``lora_A [r·E, in]`` and
``lora_B [out, r·E]`` (expert ``e``'s update is ``B[:, :, e] @ A[e]``). Its own forward adds
``B @ A`` to the dense parameter through ``torch.nn.utils.parametrize``, which needs a dense weight. A
quantized module has none, so each expert parameter name is kept as a zero-storage placeholder
(a 0-stride view of one zero element, shape and dtype of the original: peft finds and sizes the
parameter from it) and :class:`ParamWrapper` here (a subclass of peft's, registered as a custom
module for :class:`QuantizedExperts`) hands its factors to the quantized module, which adds
``scaling · (dropout(x) @ A_eᵀ) @ B_eᵀ`` to each routed expert's output: the same update, never
materialising ``W + ΔW``. Adapter weights, names and config are peft's own (``save_pretrained`` /
``PeftModel.from_pretrained`` work; the adapter also loads onto the unquantized model with plain peft).
LoRA dropout works here (peft's ``ParamWrapper`` refuses dropout > 0). An experts module left at 16
bits but given a rank is wrapped the same way (:func:`dense_experts`, no copy: the original tensors).

Bytes of a quantized experts module: the backend layers' storages, plus one element (the original
dtype) per placeholder; biases (gpt-oss) stay in their original tensors.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.lora.layer import ParamWrapper as _PeftParamWrapper
from torch import nn

from autoqra.units import expert_params


def linear_shell(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An ``nn.Linear`` (no allocation of its own) whose weight is ``weight`` ``(out, in)``, for ``backend.quantize``."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


def as_linear(module: nn.Module) -> nn.Module:
    """``module`` itself if it is an ``nn.Linear``; a GPT-2 ``Conv1D`` as an ``nn.Linear`` shell (weight transposed)."""
    if isinstance(module, nn.Linear):
        return module
    return linear_shell(module.weight.detach().t().contiguous(), module.bias)


def expert_slice(module: nn.Module, param: str, e: int) -> torch.Tensor:
    """Expert ``e`` of ``module.<param>`` as an ``(out, in)`` matrix (a view unless stored transposed)."""
    w = getattr(module, param)[e]
    return w.t().contiguous() if getattr(module, "is_transposed", False) else w


def _placeholder(like: torch.Tensor, device: str | torch.device | None = None) -> nn.Parameter:
    """A parameter of ``like``'s shape and dtype (on ``device``, default ``like``'s) backed by one zero element."""
    z = torch.zeros((), dtype=like.dtype, device=like.device if device is None else device)
    return nn.Parameter(z.expand(like.shape), requires_grad=False)


def is_placeholder(t: torch.Tensor) -> bool:
    """Whether ``t`` is a :func:`_placeholder` (a 0-stride view of a single element)."""
    return t.dim() > 0 and all(s == 0 for s in t.stride()) and t.untyped_storage().nbytes() == t.element_size()


class QuantizedExperts(nn.Module):
    """An experts module whose expert tensors are per-slice quantized layers (or kept dense).

    Built by :func:`quantize_experts` / :func:`dense_experts` from a transformers experts module;
    it copies the source's flags (``has_gate``, ``has_bias``, ``is_transposed``), activation and
    other attributes, shares its biases, and calls the source class's ``_apply_gate``.

    Attributes:
        expert_params: names of the expert tensors (``("gate_up_proj", "down_proj")``).
        quant: ``{param: ModuleList of E quantized layers}`` for the quantized tensors.
        bits: ``{param: bits}`` (16 = dense).
    """

    def __init__(self, source: nn.Module, params: Sequence[str]) -> None:
        super().__init__()
        self.source_class = type(source)
        for k, v in vars(source).items():
            if not k.startswith("_") and k != "training":
                setattr(self, k, v)
        for k, m in source._modules.items():
            self.add_module(k, m)
        for k, p in source._parameters.items():
            if p is not None and k not in params:
                self.register_parameter(k, nn.Parameter(p.detach(), requires_grad=False))
        for k, b in source._buffers.items():
            self.register_buffer(k, b)
        self.expert_params = tuple(params)
        self.num_experts = int(getattr(source, params[0]).shape[0])
        self.is_transposed = bool(getattr(source, "is_transposed", False))
        self.has_gate = bool(getattr(source, "has_gate", True))
        self.has_bias = bool(getattr(source, "has_bias", False))
        self.quant = nn.ModuleDict()
        self.bits: dict[str, int] = {}
        self._lora: dict[str, list[tuple[torch.Tensor, torch.Tensor, float, nn.Module]]] = {}
        for p in params:
            self.register_parameter(p, nn.Parameter(getattr(source, p).detach(), requires_grad=False))
            self.bits[p] = 16

    # ------------------------------------------------------------------ structure
    def set_quantized(self, param: str, layers: Sequence[nn.Module], bits: int) -> None:
        """Hold ``param`` as ``layers`` (one per expert) and replace the dense tensor by a placeholder."""
        if len(layers) != self.num_experts:
            raise ValueError(f"{param}: {len(layers)} layers for {self.num_experts} experts")
        self.quant[param] = nn.ModuleList(layers)
        self._parameters[param] = _placeholder(self._parameters[param])
        self.bits[param] = int(bits)

    def placeholders(self) -> list[str]:
        """Names of the placeholder parameters (the quantized tensors)."""
        return [p for p in self.expert_params if p in self.quant]

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        # .to()/.cuda() would densify a 0-stride placeholder: move its one element and re-expand.
        shapes = {p: self._parameters[p].shape for p in self.placeholders()}
        for p in shapes:
            self._parameters[p] = nn.Parameter(self._parameters[p].as_strided((), ()), requires_grad=False)
        super()._apply(fn, recurse)
        for p, shape in shapes.items():
            self._parameters[p] = nn.Parameter(self._parameters[p].detach().expand(shape), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, bits={self.bits}, source={self.source_class.__name__}"

    # ------------------------------------------------------------------ forward
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.source_class._apply_gate(self, gate_up)

    def _proj(self, param: str, e: int, x: torch.Tensor) -> torch.Tensor:
        layers = self.quant[param] if param in self.quant else None
        if layers is not None:
            y = layers[e](x)
        else:
            w = getattr(self, param)[e]
            y = x @ w if self.is_transposed else nn.functional.linear(x, w)
        if self.has_bias:
            y = y + getattr(self, f"{param}_bias")[e]
        for A, B, scaling, dropout in self._lora.get(param, ()):
            r = A.shape[0] // self.num_experts
            a_e = A.view(self.num_experts, r, A.shape[-1])[e]  # (r, in)
            b_e = B.view(B.shape[0], r, self.num_experts)[:, :, e]  # (out, r)
            xa = dropout(x).to(A.dtype) @ a_e.t()
            y = y + (xa @ b_e.t() * scaling).to(y.dtype)
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """transformers' eager expert loop: each hit expert runs on its routed tokens, weighted and summed."""
        out = torch.zeros_like(hidden_states)
        n = self.num_experts
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        first, last = self.expert_params
        for e in hit[:, 0].tolist():
            if e == n:
                continue
            pos, tok = torch.where(mask[e])
            x = hidden_states[tok]
            h = self._proj(first, e, x)
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
            y = self._proj(last, e, h) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def quantize_experts(backend: Any, module: nn.Module, bits: int, calib: dict[str, Sequence[Any]] | None = None) -> QuantizedExperts:
    """Quantize every expert tensor of ``module`` per expert slice with ``backend`` (``module`` is not modified).

    Args:
        backend: a :class:`~autoqra.quant_backends.QuantBackend`.
        module: a transformers experts module (:func:`autoqra.units.expert_params` names its tensors).
        bits: bit-width of every slice.
        calib: ``{param: [stats of expert 0, 1, ...]}`` for backends that need calibration (GPTQ Hessians).
    """
    params = expert_params(module)
    if not params:
        raise ValueError(f"{type(module).__name__} is not a supported experts module")
    qe = QuantizedExperts(module, params)
    for p in params:
        layers = []
        for e in range(qe.num_experts):
            stats = calib[p][e] if calib is not None else None
            q = backend.quantize(linear_shell(expert_slice(module, p, e)), bits, calib=stats)
            q.requires_grad_(False)
            layers.append(q)
        qe.set_quantized(p, layers, bits)
    return qe


def dense_experts(module: nn.Module) -> QuantizedExperts:
    """``module`` as a :class:`QuantizedExperts` with dense tensors (shared storage), for LoRA at 16 bits."""
    if isinstance(module, QuantizedExperts):
        return module
    return QuantizedExperts(module, expert_params(module))


# ---------------------------------------------------------------------------------------- LoRA
class ParamWrapper(_PeftParamWrapper):
    """peft's ``ParamWrapper`` for :class:`QuantizedExperts`: same adapter weights, factored forward.

    Named like peft's class because peft recognises nested parameter wrappers by class name.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, config: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, parameter_name, _no_dropout(config), **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        p = getattr(config, "_autoqra_dropout", config.lora_dropout)
        super().update_layer(adapter_name, r, lora_alpha, _no_dropout(config), **kwargs)
        if p:
            self.lora_dropout[adapter_name] = nn.Dropout(p)

    def _experts(self) -> QuantizedExperts:
        base = self.get_base_layer()
        if not isinstance(base, QuantizedExperts):  # pragma: no cover - dispatched only for QuantizedExperts
            raise TypeError(f"autoqra's ParamWrapper wraps QuantizedExperts, not {type(base).__name__}")
        return base

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError("LoRA on quantized experts cannot be merged into their quantized slices; keep the adapter")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or not active:
            return self.base_layer(x, *args, **kwargs)
        base = self._experts()
        entries = [(self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a], self.lora_dropout[a]) for a in active]
        stack = base._lora.setdefault(self.parameter_name, [])
        stack.extend(entries)
        try:
            return self.base_layer(x, *args, **kwargs)
        finally:
            del stack[len(stack) - len(entries):]


def _no_dropout(config: Any) -> Any:
    """A shallow copy of a ``LoraConfig`` with ``lora_dropout=0`` (the real value kept as ``_autoqra_dropout``)."""
    if not config.lora_dropout:
        return config
    cfg = copy.copy(config)
    cfg._autoqra_dropout = config.lora_dropout
    cfg.lora_dropout = 0.0
    return cfg


@contextlib.contextmanager
def quiet_pattern_warnings():
    """Silence peft's "rank_pattern/alpha_pattern keys did not match any targeted module": it checks the keys
    against module names only, while the keys of expert parameters (``...experts.gate_up_proj``) do apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match",
                                category=RuntimeWarning)
        yield


def lora_custom_modules() -> dict[type[nn.Module], type[nn.Module]]:
    """``{QuantizedExperts: ParamWrapper}`` for ``LoraConfig._register_custom_module``."""
    return {QuantizedExperts: ParamWrapper}


# ---------------------------------------------------------------------------------------- export
def export_info(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {"params": [...], "bits": {param: bits}}}`` of every :class:`QuantizedExperts` in ``model``
    (names as in the plain model: peft's prefixes and ``.base_layer`` removed)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedExperts):
            clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
            out[clean] = {"params": list(mod.expert_params), "bits": dict(mod.bits)}
    return out


def placeholder_ids(model: nn.Module) -> set[int]:
    """``id`` of every placeholder parameter in ``model`` (not saved: :func:`rebuild` recreates them)."""
    return {id(getattr(m, p)) for m in model.modules() if isinstance(m, QuantizedExperts) for p in m.placeholders()}


def rebuild(model: nn.Module, info: dict[str, dict[str, Any]], device: str | torch.device = "cpu") -> None:
    """Turn the experts modules named in ``info`` (from :func:`export_info`) into :class:`QuantizedExperts`
    shells in place: dense tensors stay meta parameters (to be assigned), quantized ones get meta
    ``nn.Linear`` slots (to be swapped for the loaded layers) and a placeholder on ``device``."""
    for name, d in info.items():
        src = model.get_submodule(name)
        params = tuple(d["params"])
        if expert_params(src) != params:
            raise ValueError(f"{name}: expected experts tensors {list(params)}, the model has {list(expert_params(src))}")
        qe = QuantizedExperts(src, params)
        for p in params:
            b = int(d["bits"][p])
            if b == 16:
                continue
            w = getattr(src, p)
            o, i = (w.shape[2], w.shape[1]) if qe.is_transposed else (w.shape[1], w.shape[2])
            qe.set_quantized(p, [nn.Linear(i, o, bias=False, device="meta") for _ in range(qe.num_experts)], b)
            qe._parameters[p] = _placeholder(w, device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, qe)
