r"""Deployable artifacts: export a trained model (quantized base + LoRA adapter) and load it anywhere.

Layout of an export directory (safetensors and JSON only — nothing is ever unpickled or executed)::

    autoqra.json                 assignment, backend spec, memory (predicted and measured), scores,
                                 library versions, SHA-256 of every weight file, per-layer quantizer meta
    config.json                  the base model's HF config
    base.safetensors             every unquantized tensor (embeddings, norms, 16-bit layers, buffers)
    quantized.safetensors        each quantized layer's own state (HQQ W_q/scale/zero, bnb packed
                                 weight + quant_state, GPTQ qweight/qzeros/scales): no re-quantization
    adapter_config.json          peft LoraConfig with per-module rank_pattern / alpha_pattern /
    adapter_model.safetensors    exclude_modules, and the trained LoRA weights (absent when merged)
    tokenizer files              when the model has a HF tokenizer

:func:`load_artifact` rebuilds the model on the meta device, swaps in the quantized layers, assigns the saved
tensors and attaches the adapter; its measured bytes equal the memory model's prediction.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from autoqra.artifact.format import (
    ADAPTER_FILES,
    FORMAT,
    INFO_FILE,
    WEIGHT_FILES,
    Artifact,
    ArtifactError,
    _sha256,
    library_versions,
    read_info,
)
from autoqra.artifact.loader import load_artifact
from autoqra.memory.model import measure_memory
from autoqra.quant_backends import QuantBackend
from autoqra.quant_backends._experts import export_info as experts_export_info
from autoqra.quant_backends._experts import placeholder_ids as experts_placeholder_ids
from autoqra.units import is_linear_like

__all__ = ["ADAPTER_FILES", "FORMAT", "INFO_FILE", "WEIGHT_FILES", "Artifact", "ArtifactError", "export_model",
           "library_versions", "load_artifact", "merge_adapter", "read_info"]

log = logging.getLogger(__name__)


def _clean_name(name: str) -> str:
    """Module/tensor name in the plain HF model (peft's ``base_model.model.`` and ``.base_layer`` removed)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "").replace(".quant_linear_module", "")


# --------------------------------------------------------------------------------------- export
def export_model(
    model: nn.Module,
    directory: str | Path,
    backend: QuantBackend,
    *,
    tokenizer: Any = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a PEFT model on a quantized base, or a plain/merged one) to ``directory``.

    Args:
        model: the trained model (see :meth:`autoqra.Result.train`).
        directory: output folder (created; existing autoqra files in it are replaced).
        backend: the backend that quantized its layers.
        tokenizer: saved alongside when it has ``save_pretrained``.
        info: extra JSON-able fields for ``autoqra.json`` (assignment, memory, scores...).

    Returns:
        The path of ``autoqra.json``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    is_peft = _is_peft(model)
    base = model.get_base_model() if is_peft else model
    quant: dict[str, dict[str, Any]] = {}
    qtensors: dict[str, torch.Tensor] = {}
    owned: set[int] = set()  # tensors inside quantized layers (peft may register a layer under two names)
    packed_at: dict[int, str] = {}  # storage of a packed weight -> the layer that exported it (tied heads)
    for name, mod in base.named_modules():
        if backend.owns(mod):
            clean = _clean_name(name)
            ptrs = [t.untyped_storage().data_ptr() for t in backend.module_tensors(mod)[0]]
            if ptrs and ptrs[0] in packed_at:  # a head tied to a quantized embedding: its storage, no copy
                quant[clean] = {"tied": packed_at[ptrs[0]]}
                owned |= {id(t) for t in [*mod.parameters(), *mod.buffers()]}
                continue
            packed_at.update(dict.fromkeys(ptrs, clean))
            tensors, meta = backend.export_module(mod)
            quant[clean] = {"meta": meta, "keys": sorted(tensors)}
            qtensors.update({f"{clean}.{k}": v.cpu() for k, v in tensors.items()})
            owned |= {id(t) for t in [*mod.parameters(), *mod.buffers()]}
    owned |= experts_placeholder_ids(base)  # zero-storage stand-ins of quantized expert tensors: rebuilt on load
    plain: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple, tuple], str] = {}
    for name, t in [*base.named_parameters(remove_duplicate=False), *base.named_buffers(remove_duplicate=False)]:
        if "lora_" in name or id(t) in owned:
            continue
        clean = _clean_name(name)
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in seen:
            aliases[clean] = seen[ident]
            continue
        seen[ident] = clean
        plain[clean] = t.detach().contiguous().cpu()
    save_file(plain, out / "base.safetensors")
    save_file(qtensors, out / "quantized.safetensors")
    (out / "config.json").write_text(base.config.to_json_string())
    for f in ADAPTER_FILES:
        (out / f).unlink(missing_ok=True)
    if is_peft:
        model.save_pretrained(out, safe_serialization=True)
    tok_info: dict[str, Any] = {"type": None}
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
        tok_info = {"type": "hf"}
    elif tokenizer is not None:
        tok_info = {"type": type(tokenizer).__name__, "vocab_size": getattr(tokenizer, "vocab_size", None)}
    extra = dict(info or {})
    measured = measure_memory(model).to_dict()
    files = [*WEIGHT_FILES, *(ADAPTER_FILES if is_peft else ())]
    doc = {
        "format": FORMAT,
        "versions": library_versions(backend),
        "backend": backend.spec(),
        "adapter": is_peft,
        "quantized": quant,
        "aliases": aliases,
        **({"experts": experts} if (experts := experts_export_info(base)) else {}),
        "tokenizer": tok_info,
        "memory": {"measured": measured, **extra.pop("memory", {})},
        "files": {f: _sha256(out / f) for f in files},
        **extra,
    }
    path = out / INFO_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)
    log.info("exported %s (%d quantized layers) to %s", "adapter + base" if is_peft else "model", len(quant), out)
    return path


def merge_adapter(model: nn.Module, backend: QuantBackend) -> nn.Module:
    """Fold the LoRA adapter into the base layers and return the plain model (``model`` is not modified).

    16-bit layers get ``W + ΔW`` exactly (as peft's merge). HQQ layers are dequantized, merged and
    **re-quantized** at their bits, so the merged model is not numerically the adapter model: compare
    their held-out losses (:meth:`autoqra.Result.export` records both). Other quantized layers
    (bitsandbytes, GPTQ) cannot be merged here.

    Raises:
        ValueError: a LoRA layer sits on a layer type that cannot be merged.
    """
    if not _is_peft(model):
        raise ValueError("the model has no adapter to merge")
    base = _shallow_tree_copy(model.get_base_model())  # replaced below; tensors are never written
    base.__dict__.pop("peft_config", None)
    for name, mod in list(base.named_modules()):
        if not isinstance(mod, LoraLayer):
            continue
        inner = mod.get_base_layer()
        delta = sum(mod.get_delta_weight(a) for a in mod.active_adapters if a in mod.lora_A)
        if getattr(mod, "fan_in_fan_out", False) and backend.owns(inner):
            delta = delta.t()  # peft turned fan_in_fan_out on for a GPT-2 Conv1D; quantized layers are (out, in)
        owned = backend.owns(inner)
        if owned and backend.name == "hqq":
            lin = nn.Linear(inner.in_features, inner.out_features, bias=inner.bias is not None, device="meta")
            lin.weight = nn.Parameter((inner.dequantize().float() + delta.float()).detach(), requires_grad=False)
            if inner.bias is not None:
                lin.bias = nn.Parameter(inner.bias.detach().float(), requires_grad=False)
            new = backend.quantize(lin, int(inner.meta["nbits"]))
        elif not owned and type(inner) is nn.Linear:
            new = nn.Linear(inner.in_features, inner.out_features, bias=inner.bias is not None,
                            device=inner.weight.device, dtype=inner.weight.dtype)
            new.weight = nn.Parameter((inner.weight + delta).detach(), requires_grad=False)
            if inner.bias is not None:
                new.bias = nn.Parameter(inner.bias.detach(), requires_grad=False)
        elif not owned and is_linear_like(inner):  # a 16-bit GPT-2 Conv1D: weight (in, out), delta from peft alike
            new = copy.copy(inner)
            new._parameters = {**inner._parameters,
                               "weight": nn.Parameter((inner.weight + delta).detach(), requires_grad=False)}
        else:
            raise ValueError(f"cannot merge LoRA into {type(inner).__name__} layers ({name}): only 16-bit and HQQ "
                             "layers can be merged; export without merge")
        parent, _, child = _clean_name(name).rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, new)
    return base


def _is_peft(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


def _shallow_tree_copy(module: nn.Module) -> nn.Module:
    """Copy the module tree (new module objects, same tensors) so replacing children leaves the original intact."""
    new = copy.copy(module)
    new._modules = {k: (_shallow_tree_copy(m) if m is not None else None) for k, m in module._modules.items()}
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new
