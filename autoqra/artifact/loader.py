"""Loading an export of :mod:`autoqra.artifact.export` (meta-device model, quantized layers swapped in, adapter attached)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from autoqra.artifact.format import (
    INFO_FILE,
    Artifact,
    ArtifactError,
    _check_files,
    _check_versions,
    read_info,
)
from autoqra.evaluators.data import ByteTokenizer
from autoqra.quant_backends import QuantBackend, backend_from_spec
from autoqra.quant_backends._experts import lora_custom_modules as experts_lora_modules
from autoqra.quant_backends._experts import quiet_pattern_warnings
from autoqra.quant_backends._experts import rebuild as rebuild_experts
from autoqra.units import is_linear_like


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, leaf = name.rpartition(".")
    try:
        return (model.get_submodule(mod_name) if mod_name else model), leaf
    except AttributeError:
        raise ArtifactError(f"the export names tensor {name!r}, which the model built from config.json lacks") from None


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod, leaf = _owner(model, name)
    if leaf in mod._parameters:
        mod._parameters[leaf] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = t
    else:
        raise ArtifactError(f"base.safetensors holds {name!r}, which the model built from config.json lacks")


def load_artifact(directory: str | Path, device: str | torch.device = "cpu", *, allow_version_mismatch: bool = False) -> Artifact:
    """Load an export written by :meth:`autoqra.Result.export` (in any process, no re-quantization).

    Args:
        directory: the export folder.
        device: where the weights go.
        allow_version_mismatch: load even when the quantization library's version differs (warns).

    Returns:
        :class:`Artifact` with ``model`` (PEFT model with the adapter, or the merged model), ``tokenizer``
        (None when the export has none) and ``info`` (the validated ``autoqra.json``).

    Raises:
        ArtifactError: a missing file, a checksum/format/version mismatch or a malformed field.
    """

    d = Path(directory)
    info = read_info(d)
    try:
        backend = backend_from_spec(info["backend"])
    except (ValueError, KeyError) as e:
        raise ArtifactError(f"{d / INFO_FILE}: bad backend spec: {e}") from None
    _check_versions(info, backend, allow_version_mismatch)
    _check_files(d, info)
    device = str(device)
    config = AutoConfig.from_pretrained(d)  # JSON; remote code is never trusted
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    rebuild_experts(model, info.get("experts") or {}, device)  # quantized MoE experts: per-slice layer slots
    qt = load_file(d / "quantized.safetensors", device=device)
    used: set[str] = set()
    tied: dict[str, str] = {}
    for name, q in info["quantized"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"{INFO_FILE} names layer {name!r}, which this model has not") from None
        if "tied" in q:  # an output head served by a quantized embedding's storage
            tied[name] = str(q["tied"])
            continue
        keys = {k: f"{name}.{k}" for k in q.get("keys", ())}
        missing = [v for v in keys.values() if v not in qt]
        if missing or not (is_linear_like(old) or isinstance(old, nn.Embedding)):
            raise ArtifactError(f"quantized layer {name!r} is incomplete or not a linear layer ({missing[:3]})")
        try:
            new = backend.load_module({k: qt[v] for k, v in keys.items()}, q["meta"], device=device)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"cannot rebuild quantized layer {name!r}: {type(e).__name__}: {e}") from None
        used |= set(keys.values())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    for name, emb in tied.items():
        try:
            head = backend.tied_head(model.get_submodule(emb))
        except (AttributeError, ValueError) as e:
            raise ArtifactError(f"cannot rebuild the tied head {name!r} from {emb!r}: {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, head)
    if set(qt) - used:
        raise ArtifactError(f"quantized.safetensors has tensors no layer claims: {sorted(set(qt) - used)[:3]}")
    for name, t in load_file(d / "base.safetensors", device=device).items():
        _set_tensor(model, name, t)
    for name, target in info["aliases"].items():
        _set_tensor(model, name, _get_tensor(model, target))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ArtifactError(f"{d} is incomplete: no saved values for {left[:5]}{' ...' if len(left) > 5 else ''}")
    for p in model.parameters():
        p.requires_grad_(False)
    if info["adapter"]:
        model = _attach_adapter(model, d, backend)
    model.eval()
    return Artifact(model, _load_tokenizer(d, info, config), info)


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod, leaf = _owner(model, name)
    t = mod._parameters.get(leaf, mod._buffers.get(leaf))
    if t is None:
        raise ArtifactError(f"alias target {name!r} does not exist")
    return t


def _attach_adapter(model: nn.Module, d: Path, backend: QuantBackend) -> nn.Module:
    cfg = LoraConfig.from_pretrained(str(d))
    cfg._register_custom_module({**backend.lora_custom_modules(), **experts_lora_modules()})
    backend.prepare_for_peft(model)
    cfg.inference_mode = True
    with quiet_pattern_warnings():
        return PeftModel.from_pretrained(model, str(d), config=cfg, is_trainable=False)


def _load_tokenizer(d: Path, info: dict[str, Any], config: Any) -> Any:
    kind = (info.get("tokenizer") or {}).get("type")
    if kind == "hf":
        return AutoTokenizer.from_pretrained(str(d))
    if kind == "ByteTokenizer":
        return ByteTokenizer(int(info["tokenizer"].get("vocab_size") or config.vocab_size))
    return None

