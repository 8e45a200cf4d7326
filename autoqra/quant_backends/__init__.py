"""Quantization backends: one file each, registered by name (``"hqq"``, ``"bnb"``, ``"gptq"``, ``"none"``)."""

from autoqra.quant_backends.base import (
    UNQUANTIZED_BITS,
    QuantBackend,
    available_backends,
    backend_for_precision,
    backend_from_spec,
    generic_lora_class,
    get_backend,
    register_backend,
)
from autoqra.quant_backends.none import NoneBackend

__all__ = [
    "UNQUANTIZED_BITS",
    "QuantBackend",
    "NoneBackend",
    "available_backends",
    "backend_for_precision",
    "backend_from_spec",
    "generic_lora_class",
    "get_backend",
    "register_backend",
]

# Optional backends register themselves on import; their heavy libraries load lazily inside.
for _mod in ("hqq", "bnb", "gptq"):
    try:
        __import__(f"autoqra.quant_backends.{_mod}")
    except ModuleNotFoundError as _e:  # the file itself is missing (never the optional library)
        if _e.name != f"autoqra.quant_backends.{_mod}":
            raise
