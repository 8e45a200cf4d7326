"""The export format of :mod:`autoqra.artifact.export`: file names, ``autoqra.json`` validation and integrity checks."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import attrs
from torch import nn

from autoqra.quant_backends import QuantBackend

log = logging.getLogger("autoqra.artifact")

FORMAT = "autoqra.artifact/1"
INFO_FILE = "autoqra.json"
WEIGHT_FILES = ("config.json", "base.safetensors", "quantized.safetensors")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_MAX_INFO_BYTES = 64 * 2**20


class ArtifactError(ValueError):
    """An export directory is missing, incomplete, tampered with or from an incompatible version."""


def library_versions(backend: QuantBackend | None = None) -> dict[str, str | None]:
    """Versions of the libraries an artifact depends on."""
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


@attrs.define
class Artifact:
    """A loaded export: ``model, tokenizer = autoqra.load_artifact(dir)`` also works (iterable)."""

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
        if isinstance(name, str) and isinstance(q, dict) and set(q) == {"tied"} and isinstance(q["tied"], str):
            continue  # an output head tied to a quantized embedding (no tensors of its own)
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

