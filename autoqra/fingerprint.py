"""Model identity for the trial store: a cheap, exact fingerprint of config, shapes and weights."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

_INT_VIEW = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}
_VOLATILE_CONFIG = ("transformers_version", "_name_or_path", "_commit_hash", "use_cache", "_attn_implementation_autoset")


def model_fingerprint(model: Any, n_edge: int = 3, n_values: int = 64) -> str:
    """Cheap identity of a model: config + parameter names/shapes/dtypes + a digest of the weights.

    For real (non-meta) tensors: the raw bits of the first/last ``n_values`` elements of the first
    and last ``n_edge`` parameters, and for *every* parameter the exact integer sum of its bit
    patterns (order-independent, so identical across thread counts and devices). Meta-device
    models hash config and shapes only. Volatile config fields (:data:`_VOLATILE_CONFIG`:
    ``transformers_version``, ``_name_or_path``, ``use_cache``...) are left out. Fingerprint the
    base model, before quantization/LoRA.

    Returns:
        Hex SHA-256 string.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        d = json.loads(cfg.to_json_string(use_diff=False))
        for k in _VOLATILE_CONFIG:
            d.pop(k, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    else:
        h.update(type(model).__name__.encode())
    params = list(model.named_parameters())
    edge = {id(p) for _, p in params[:n_edge] + params[-n_edge:]}
    with torch.no_grad():
        for name, p in params:
            h.update(f"|{name}:{tuple(p.shape)}:{p.dtype}".encode())
            size = p.element_size()
            if p.is_meta or size not in _INT_VIEW or p.numel() == 0:
                continue
            try:
                bits = p.detach().view(getattr(torch, _INT_VIEW[size]))
                # numpy sums int8..int32 exactly into int64 without an int64 copy; on GPU torch is fast
                cpu = bits.device.type == "cpu"
                total = bits.numpy().sum(dtype="int64") if cpu else bits.sum(dtype=torch.int64)
                h.update(b":%d" % (int(total) % 2**64))
                if id(p) in edge:
                    bits = bits.reshape(-1)
                    h.update(bits[:n_values].cpu().numpy().tobytes() + bits[-n_values:].cpu().numpy().tobytes())
            except (RuntimeError, TypeError):  # exotic tensor subclasses: shapes only
                h.update(b":?")
    return h.hexdigest()
