"""Quantization backends: one file each, registered by name (``"hqq"``, ``"bnb"``, ``"gptq"``, ``"none"``).

:data:`BACKENDS` holds them; each backend module registers itself on import, and its library
(hqq, bitsandbytes, gptqmodel) loads only where it is used (:func:`autoqra._optional.require`).
"""

from autoqra.quant_backends import bnb, gptq, hqq  # noqa: F401 - each registers its backend
from autoqra.quant_backends.base import (
    BACKENDS,
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
    "BACKENDS",
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
