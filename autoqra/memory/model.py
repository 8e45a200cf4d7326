r"""Exact memory accounting: analytic prediction from shapes, and measurement of live tensors.

Every figure is in **bytes** (int). ``MemoryModel.predict`` never quantizes anything: it sums
per-unit tables built once from the model's shapes and the backend's exact ``weight_bytes``,
so one call takes microseconds. ``measure_memory`` walks the live tensors of a (PEFT) model,
deduplicated by storage, including tensors backends keep outside ``parameters()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn

from autoqra.config import TrainSpec
from autoqra.memory.activations import activation_table
from autoqra.memory.budget import TARGETS, resolve_budget
from autoqra.quant_backends import UNQUANTIZED_BITS, QuantBackend, get_backend
from autoqra.quant_backends.base import BACKENDS
from autoqra.space import Assignment, SearchSpace

_FIELDS = (
    "quant_weight_bytes",
    "quant_meta_bytes",
    "unquantized_bytes",
    "lora_bytes",
    "lora_grad_bytes",
    "optimizer_bytes",
    "activation_bytes",
)


@attrs.frozen
class MemoryBreakdown:
    """Bytes by category.

    Attributes:
        quant_weight_bytes: packed quantized weights.
        quant_meta_bytes: quantization metadata (scales, zeros, absmax, codebooks).
        unquantized_bytes: every other parameter and buffer (embeddings, norms, lm_head, 16-bit units).
        lora_bytes: LoRA adapter parameters.
        lora_grad_bytes: gradients of the LoRA parameters.
        optimizer_bytes: optimizer state (AdamW: two moments + a step counter per tensor).
        activation_bytes: estimated peak of tensors allocated by one forward+backward (incl. logits).
    """

    quant_weight_bytes: int = 0
    quant_meta_bytes: int = 0
    unquantized_bytes: int = 0
    lora_bytes: int = 0
    lora_grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0

    @property
    def model_bytes(self) -> int:
        """Static footprint: quantized weights + metadata + unquantized tensors + LoRA parameters."""
        return self.quant_weight_bytes + self.quant_meta_bytes + self.unquantized_bytes + self.lora_bytes

    @property
    def train_bytes(self) -> int:
        """``model_bytes`` + LoRA gradients + optimizer state + activations."""
        return self.model_bytes + self.lora_grad_bytes + self.optimizer_bytes + self.activation_bytes

    def bytes_for(self, target: str) -> int:
        """Bytes on a budget target: ``"model"`` → :attr:`model_bytes`, ``"train"`` → :attr:`train_bytes`.

        Raises:
            ValueError: ``target`` is neither.
        """
        if target == "model":
            return self.model_bytes
        if target == "train":
            return self.train_bytes
        raise ValueError(f"target={target!r} is not allowed; choose one of {list(TARGETS)}")

    def to_dict(self) -> dict[str, int]:
        d = {f: getattr(self, f) for f in _FIELDS}
        d.update(model_bytes=self.model_bytes, train_bytes=self.train_bytes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryBreakdown:
        return cls(**{f: int(d.get(f, 0)) for f in _FIELDS})

    def __add__(self, other: MemoryBreakdown) -> MemoryBreakdown:
        return MemoryBreakdown(**{f: getattr(self, f) + getattr(other, f) for f in _FIELDS})


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class MemoryModel:
    """Analytic, exact memory model for one (model, space, backend, training setup).

    Args:
        model: the unquantized source model (the meta device is fine).
        space: the search space over the model's units.
        backend: quantization backend (name or instance); its bits are checked against the ladder.
        train: batch shape and optimizer setup for the training-time terms.
        lora_dtype: dtype peft gives LoRA weights (fp32: peft upcasts 16-bit adapters by default).
        precision: training precision of the activation estimate, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    """

    def __init__(
        self,
        model: nn.Module,
        space: SearchSpace,
        backend: str | QuantBackend = "hqq",
        train: TrainSpec | None = None,
        lora_dtype: torch.dtype = torch.float32,
        precision: str = "fp32",
    ) -> None:
        self.model = model
        self.space = space
        self.lora_dtype = lora_dtype
        self.backend = get_backend(backend)
        quant_bits = [b for b in space.all_bits if b != UNQUANTIZED_BITS]
        self.backend.check_bits(space.all_bits)
        self.train = train or TrainSpec()
        self.lora_elem = torch.empty((), dtype=lora_dtype).element_size()
        self.precision = precision
        self._activation = ActivationEstimator(model, space, self.backend, self.train, precision=precision)
        mods = dict(model.named_modules())
        in_space = {(t.module, t.param) for t in space.tensors}
        # Unquantized tensors outside the searched weights: dedup by object (tied embeddings).
        seen: set[int] = set()
        base = 0
        for name, mod in mods.items():
            for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if t is None or id(t) in seen or (name, pname) in in_space:
                    continue
                seen.add(id(t))
                base += _nbytes(t)
        self.base_bytes = base
        nb, nr = len(space.bits), len(space.ranks)
        # Per-unit tables indexed by each unit's own option index (the encoding of ``SearchSpace.encode``),
        # padded past a unit's last option with that option (a clipped index costs what decode gives).
        bgrid, rgrid = space.bits_grid(), space.ranks_grid()
        self._packed = np.zeros((space.n_units, nb), dtype=np.int64)
        self._meta = np.zeros((space.n_units, nb), dtype=np.int64)
        self._unq = np.zeros((space.n_units, nb), dtype=np.int64)
        self._lora_params = np.zeros((space.n_units, nr), dtype=np.int64)
        self._lora_tensors = np.zeros((space.n_units, nr), dtype=np.int64)
        for u_i, unit in enumerate(space.units):
            for t in unit.tensors:
                es = getattr(mods[t.module], t.param).element_size() if not t.tied else 0
                for b_i, b in enumerate(bgrid[u_i]):
                    if t.tied:  # a head tied to the embedding: the embedding's tensor holds its bytes
                        continue
                    if b == UNQUANTIZED_BITS:
                        self._unq[u_i, b_i] += t.numel * es
                    else:
                        p, m = self.backend.weight_bytes(t.out_features, t.in_features, int(b))
                        self._packed[u_i, b_i] += t.n_experts * p
                        self._meta[u_i, b_i] += t.n_experts * m
                        if t.kind == "experts":  # the zero-storage placeholder peft sizes LoRA from: one element
                            self._unq[u_i, b_i] += es
            # one LoRA target (an A and a B) per linear module and per expert tensor
            n_targets = len({t.module for t in unit.tensors if t.kind == "linear"}) + sum(
                t.kind == "experts" for t in unit.tensors)
            for r_i, r in enumerate(rgrid[u_i]):
                self._lora_params[u_i, r_i] = r * unit.lora_params_per_rank
                self._lora_tensors[u_i, r_i] = 2 * n_targets if r > 0 else 0
        self._bgrid = bgrid
        self._quant_bits = quant_bits
        self._rows = np.arange(space.n_units)

    def with_space(self, space: SearchSpace) -> MemoryModel:
        """The same model, backend and training setup over another space."""
        return MemoryModel(self.model, space, self.backend, self.train, self.lora_dtype, precision=self.precision)

    def predict(self, a: Assignment) -> MemoryBreakdown:
        """Exact static bytes and training-time bytes of ``a`` (activation term is an estimate)."""
        x = self.space.encode(a)
        n = self.space.n_units
        return self._predict_idx(x[:n], x[n:], a)

    def predict_encoded(self, x: np.ndarray) -> MemoryBreakdown:
        """Same as :meth:`predict` for an integer encoding from ``SearchSpace.encode``."""
        n = self.space.n_units
        return self._predict_idx(np.asarray(x[:n]), np.asarray(x[n:]), None)

    def _predict_idx(self, bi: np.ndarray, ri: np.ndarray, a: Assignment | None) -> MemoryBreakdown:
        rows = self._rows
        used = set(self._bgrid[rows, bi].tolist()) - {UNQUANTIZED_BITS}
        lora_p = int(self._lora_params[rows, ri].sum())
        lora_b = lora_p * self.lora_elem
        n_tensors = int(self._lora_tensors[rows, ri].sum())
        opt = self.train.optimizer_bytes(lora_b, n_tensors)
        return MemoryBreakdown(
            quant_weight_bytes=int(self._packed[rows, bi].sum()),
            quant_meta_bytes=int(self._meta[rows, bi].sum()) + self.backend.shared_bytes(sorted(used)),
            unquantized_bytes=self.base_bytes + int(self._unq[rows, bi].sum()),
            lora_bytes=lora_b,
            lora_grad_bytes=lora_b,
            optimizer_bytes=opt,
            activation_bytes=self._activation.estimate(bi, ri),
        )

    def model_bytes_encoded(self, X: np.ndarray) -> np.ndarray:
        """Vectorised ``model_bytes`` for a batch of encodings ``(n, 2L)`` (for searchers)."""
        X = np.atleast_2d(np.asarray(X, dtype=np.int64))
        n = self.space.n_units
        bi, ri = X[:, :n], X[:, n:]
        rows = self._rows[None, :]
        static = (self._packed[rows, bi] + self._meta[rows, bi] + self._unq[rows, bi]).sum(1)
        lora = self._lora_params[rows, ri].sum(1) * self.lora_elem
        vals = self._bgrid[rows, bi]
        shared = np.array(
            [self.backend.shared_bytes(sorted(set(row.tolist()) - {UNQUANTIZED_BITS})) for row in vals]
        )
        return static + lora + shared + self.base_bytes

    def budget_bytes(self, budget: int | float | str, rank: int | None = None, target: str = "model") -> int:
        """Resolve a budget to bytes. See :func:`autoqra.memory.budget.resolve_budget`."""
        return resolve_budget(budget, self, rank=rank, target=target)


class ActivationEstimator:
    """Estimate of the activation peak of one training step; see :mod:`autoqra.memory.activations`."""

    def __init__(
        self, model: nn.Module, space: SearchSpace, backend: QuantBackend, train: TrainSpec, precision: str = "fp32"
    ) -> None:
        self.fixed, self.per_rank_idx, self.per_bits_idx = activation_table(
            model, space, backend, train, precision=precision
        )
        self._rows = np.arange(space.n_units)

    def estimate(self, bi: np.ndarray, ri: np.ndarray) -> int:
        return int(self.fixed + self.per_rank_idx[self._rows, ri].sum() + self.per_bits_idx[self._rows, bi].sum())


# ---------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[Any, int]:
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device.type, t.untyped_storage().data_ptr())


def _storage_bytes(t: torch.Tensor) -> int:
    if t.device.type == "meta":
        return _nbytes(t)
    return t.untyped_storage().nbytes()


def _backends() -> list[QuantBackend]:
    out = []
    for cls in BACKENDS.values():
        try:
            inst = cls()
        except Exception:  # noqa: BLE001 - a backend needing args cannot own anything generic
            continue
        if inst.is_available():
            out.append(inst)
    return out


def measure_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryBreakdown:
    """Bytes of the live tensors a model (and optionally its optimizer) holds.

    Storages are deduplicated (tied weights and shared codebooks count once). Quantized layers
    are recognised by the registered backends, which also report tensors held outside
    ``parameters()``. LoRA tensors are those whose name contains ``lora_``. Gradients are
    the ``.grad`` of LoRA parameters; optimizer bytes are every tensor in ``optimizer.state``.
    ``activation_bytes`` is 0 here: the peak of a training step is measured by
    :func:`autoqra.memory.trace.measure_peak` (around one forward + backward).
    """
    seen: set[tuple[Any, int]] = set()
    acc = dict.fromkeys(_FIELDS, 0)

    def add(field: str, tensors: Iterable[torch.Tensor | None]) -> None:
        for t in tensors:
            if t is None:
                continue
            k = _storage_key(t)
            if k in seen:
                continue
            seen.add(k)
            acc[field] += _storage_bytes(t)

    backends = _backends()
    owned: set[int] = set()
    for mod in model.modules():
        for be in backends:
            if be.owns(mod):
                packed, meta, other = be.module_tensors(mod)
                add("quant_weight_bytes", packed)
                add("quant_meta_bytes", meta)
                add("unquantized_bytes", other)
                owned.update(id(m) for m in mod.modules())
                break
    for mname, mod in model.named_modules():
        if id(mod) in owned:
            continue
        for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            full = f"{mname}.{pname}"
            if "lora_" in full:
                add("lora_bytes", [t])
                if isinstance(t, nn.Parameter):
                    add("lora_grad_bytes", [t.grad])
            else:
                add("unquantized_bytes", [t])
    if optimizer is not None:
        for st in optimizer.state.values():
            add("optimizer_bytes", [v for v in st.values() if torch.is_tensor(v)])
    return MemoryBreakdown(**acc)
