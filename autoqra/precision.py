r"""Devices and training precisions: what ``device=`` and ``precision=`` resolve to, detected, never assumed.

Precisions (``precision=``):

* ``"fp32"``: no autocast; quantized layers compute in fp32.
* ``"bf16"``: ``torch.autocast(dtype=torch.bfloat16)``; quantized layers (HQQ scale/zero, GPTQ scales,
  bitsandbytes compute) use bf16; LoRA weights and AdamW state stay fp32.
* ``"fp16"``: the same in float16, plus a ``GradScaler`` (fp16 gradients underflow without one).
* ``"auto"``: on CUDA, bf16 where the GPU has native bf16 (compute capability ≥ 8.0, Ampere and
  newer), else fp16 (``torch.cuda.is_bf16_supported()`` is true through emulation on older GPUs,
  so it is not used); on CPU, bf16 where the CPU has native bf16 instructions (AVX512-BF16 or
  AMX-BF16 in ``/proc/cpuinfo``), else fp32 (on an AVX2-only CPU a bf16 backward was measured ~20×
  slower than fp32).

The unquantized tensors of the model stay in the dtype the user loaded them in (the memory model
counts that dtype); :func:`autoqra.models.load_model` loads in the precision's dtype when asked.

Devices (``device=``): ``None`` = where the model already is; ``"auto"`` = ``"cuda"`` when a GPU is
visible, else ``"cpu"``; or any torch device string.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {v: k for k, v in DTYPES.items()}
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo(field: str) -> str | None:
    """The value of the first ``field`` line of /proc/cpuinfo (Linux), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return None


@functools.lru_cache(maxsize=1)
def cpu_bf16_native() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16 flags; Linux only)."""
    flags = set((_cpuinfo("flags") or "").split())
    return any(f in flags for f in _CPU_BF16_FLAGS)


def cpu_name() -> str:
    """This CPU's model name (/proc/cpuinfo; else what ``platform`` knows), for reports of measurements."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


def cuda_bf16_native(device: torch.device | str | int | None = None) -> bool:
    """Whether a CUDA GPU computes bf16 natively (compute capability ≥ 8.0)."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """``None`` -> the model's device (CPU without a model); ``"auto"`` -> cuda if visible, else cpu.

    Raises:
        ValueError: a CUDA device is asked for and none is visible, or the string is not a device.
    """
    if device is None:
        return model_device(model) if model is not None else torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:1' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} is not allowed here: no CUDA GPU is visible; use 'cpu' or 'auto'")
    return dev


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ``ValueError`` naming the allowed ones."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed; choose one of {list(PRECISIONS)}")
    return str(precision)


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``"fp32" | "bf16" | "fp16"`` for ``precision`` on ``device`` (see the module docstring for ``"auto"``)."""
    precision = check_precision(precision)
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if cuda_bf16_native(dev) else "fp16"
    if dev.type == "cpu":
        return "bf16" if cpu_bf16_native() else "fp32"
    return "fp32"


def compute_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a resolved precision (``"fp32"`` -> ``torch.float32``...)."""
    if precision not in DTYPES:
        raise ValueError(f"precision={precision!r} is not resolved; expected one of {list(DTYPES)}")
    return DTYPES[precision]


def precision_of(dtype: torch.dtype) -> str:
    """The precision name of a floating dtype (``torch.bfloat16`` -> ``"bf16"``)."""
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} is not a training precision; expected one of {list(_NAMES)}")
    return _NAMES[dtype]


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for a resolved ``precision`` (``"fp32"``: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=compute_dtype(precision))


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for fp16 training (``None`` for fp32/bf16, which do not underflow)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def describe(device: torch.device | str, precision: str) -> dict[str, Any]:
    """JSON-able identity of a device and a resolved precision (part of every evaluator ``spec()``)."""
    return {"device": torch.device(device).type, "precision": precision}
