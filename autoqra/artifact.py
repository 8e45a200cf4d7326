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

:func:`load` rebuilds the model on the meta device, swaps in the quantized layers, assigns the saved
tensors and attaches the adapter; its measured bytes equal the memory model's prediction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from autoqra.quant_backends import QuantBackend, backend_from_spec

log = logging.getLogger(__name__)

FORMAT = "autoqra.artifact/1"
INFO_FILE = "autoqra.json"
WEIGHT_FILES = ("config.json", "base.safetensors", "quantized.safetensors")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_MAX_INFO_BYTES = 64 * 2**20


class ArtifactError(ValueError):
    """An export directory is missing, incomplete, tampered with or from an incompatible version."""


def library_versions(backend: QuantBackend | None = None) -> dict[str, str | None]:
    """Versions of the libraries an artifact depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    libs = ["autoqra", "torch", "transformers", "peft", "safetensors"]
    libs += {"hqq": ["hqq"], "bnb": ["bitsandbytes"]}.get(backend.name if backend else "", [])
    for lib in libs:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    from safetensors.torch import save_file

    from autoqra.memory import measure_memory

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    is_peft = _is_peft(model)
    base = model.get_base_model() if is_peft else model
    quant: dict[str, dict[str, Any]] = {}
    qtensors: dict[str, torch.Tensor] = {}
    owned: set[int] = set()  # tensors inside quantized layers (peft may register a layer under two names)
    for name, mod in base.named_modules():
        if backend.owns(mod):
            clean = _clean_name(name)
            tensors, meta = backend.export_module(mod)
            quant[clean] = {"meta": meta, "keys": sorted(tensors)}
            qtensors.update({f"{clean}.{k}": v.cpu() for k, v in tensors.items()})
            owned |= {id(t) for t in [*mod.parameters(), *mod.buffers()]}
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
    from peft.tuners.lora import LoraLayer

    if not _is_peft(model):
        raise ValueError("the model has no adapter to merge")
    base = _shallow_tree_copy(model.get_base_model())  # replaced below; tensors are never written
    base.__dict__.pop("peft_config", None)
    for name, mod in list(base.named_modules()):
        if not isinstance(mod, LoraLayer):
            continue
        inner = mod.get_base_layer()
        delta = sum(mod.get_delta_weight(a) for a in mod.active_adapters if a in mod.lora_A)
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
        else:
            raise ValueError(f"cannot merge LoRA into {type(inner).__name__} layers ({name}): only 16-bit and HQQ "
                             "layers can be merged; export without merge")
        parent, _, child = _clean_name(name).rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, new)
    return base


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _shallow_tree_copy(module: nn.Module) -> nn.Module:
    """Copy the module tree (new module objects, same tensors) so replacing children leaves the original intact."""
    import copy

    new = copy.copy(module)
    new._modules = {k: (_shallow_tree_copy(m) if m is not None else None) for k, m in module._modules.items()}
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new


# ----------------------------------------------------------------------------------------- load
@attrs.define
class Artifact:
    """A loaded export: ``model, tokenizer = autoqra.load(dir)`` also works (iterable)."""

    model: nn.Module
    tokenizer: Any
    info: dict[str, Any]

    def __iter__(self):
        return iter((self.model, self.tokenizer))


def read_info(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``autoqra.json`` of an export (no weights are loaded).

    Raises:
        ArtifactError: missing directory/file, not JSON, wrong format or a malformed field.
    """
    d = Path(directory)
    f = d / INFO_FILE
    if not d.is_dir():
        raise ArtifactError(f"no export directory at {d}")
    if not f.is_file():
        raise ArtifactError(f"{d} is not an autoqra export: {INFO_FILE} is missing")
    if f.stat().st_size > _MAX_INFO_BYTES:
        raise ArtifactError(f"{f} is implausibly large ({f.stat().st_size} bytes)")
    try:
        info = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(info, dict):
        raise ArtifactError(f"{f} must hold a JSON object")
    fmt = info.get("format")
    if fmt != FORMAT:
        raise ArtifactError(f"{f} has format {fmt!r}; this autoqra reads {FORMAT!r} (version mismatch)")
    _expect(info, "backend", dict, f)
    _expect(info, "quantized", dict, f)
    _expect(info, "aliases", dict, f)
    _expect(info, "files", dict, f)
    _expect(info, "adapter", bool, f)
    for name, q in info["quantized"].items():
        if not isinstance(name, str) or not isinstance(q, dict) or not isinstance(q.get("meta"), dict) \
                or not isinstance(q.get("keys"), list) or not all(isinstance(k, str) for k in q["keys"]):
            raise ArtifactError(f"{f}: malformed entry for quantized layer {name!r}")
    for k, v in [*info["aliases"].items(), *info["files"].items()]:
        if not isinstance(k, str) or not isinstance(v, str):
            raise ArtifactError(f"{f}: malformed aliases/files entry {k!r}")
    need = set(WEIGHT_FILES) | (set(ADAPTER_FILES) if info["adapter"] else set())
    if not need <= set(info["files"]):
        raise ArtifactError(f"{f} does not list checksums for {sorted(need - set(info['files']))}")
    return info


def _expect(info: dict, key: str, typ: type, f: Path) -> None:
    if not isinstance(info.get(key), typ):
        raise ArtifactError(f"{f}: field {key!r} is missing or not a {typ.__name__}")


def _check_files(d: Path, info: dict[str, Any]) -> None:
    for name, digest in info["files"].items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise ArtifactError(f"{d / INFO_FILE}: bad file name {name!r}")
        p = d / name
        if not p.is_file():
            raise ArtifactError(f"{d} is incomplete: {name} is missing")
        if _sha256(p) != digest:
            raise ArtifactError(f"{p} does not match its checksum in {INFO_FILE} (modified or corrupted)")
    if (d / "adapter_model.bin").exists():
        raise ArtifactError(f"{d} holds adapter_model.bin: pickled weights are never loaded; use safetensors")


def _check_versions(info: dict[str, Any], backend: QuantBackend, allow_mismatch: bool) -> None:
    saved, now = info.get("versions") or {}, library_versions(backend)

    def minor(v: Any) -> tuple:
        return tuple(str(v).split(".")[:2]) if v else ()

    for lib in ("hqq", "bitsandbytes"):  # the quantized state format belongs to these libraries
        if lib in saved and minor(saved[lib]) != minor(now.get(lib)):
            msg = (f"the export was written with {lib} {saved[lib]} but {lib} {now.get(lib)} is installed; "
                   f"its quantized format may differ (install {lib}=={saved[lib]}, or pass allow_version_mismatch=True)")
            if not allow_mismatch:
                raise ArtifactError(msg)
            warnings.warn(msg, stacklevel=3)
    for lib in ("torch", "transformers", "peft"):
        if saved.get(lib) and minor(saved[lib]) != minor(now.get(lib)):
            log.warning("export written with %s %s, loading with %s", lib, saved[lib], now.get(lib))


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


def load(directory: str | Path, device: str | torch.device = "cpu", *, allow_version_mismatch: bool = False) -> Artifact:
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
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

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
    qt = load_file(d / "quantized.safetensors", device=device)
    used: set[str] = set()
    for name, q in info["quantized"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"{INFO_FILE} names layer {name!r}, which this model has not") from None
        keys = {k: f"{name}.{k}" for k in q["keys"]}
        missing = [v for v in keys.values() if v not in qt]
        if missing or not isinstance(old, nn.Linear):
            raise ArtifactError(f"quantized layer {name!r} is incomplete or not a linear layer ({missing[:3]})")
        try:
            new = backend.load_module({k: qt[v] for k, v in keys.items()}, q["meta"], device=device)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"cannot rebuild quantized layer {name!r}: {type(e).__name__}: {e}") from None
        used |= set(keys.values())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
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
    from peft import LoraConfig, PeftModel

    cfg = LoraConfig.from_pretrained(str(d))
    custom = backend.lora_custom_modules()
    if custom:
        cfg._register_custom_module(custom)
    backend.prepare_for_peft(model)
    cfg.inference_mode = True
    return PeftModel.from_pretrained(model, str(d), config=cfg, is_trainable=False)


def _load_tokenizer(d: Path, info: dict[str, Any], config: Any) -> Any:
    kind = (info.get("tokenizer") or {}).get("type")
    if kind == "hf":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(d))
    if kind == "ByteTokenizer":
        from autoqra.evaluators.data import ByteTokenizer

        return ByteTokenizer(int(info["tokenizer"].get("vocab_size") or config.vocab_size))
    return None
