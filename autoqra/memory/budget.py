r"""Budgets: ints (bytes), size strings ("3.5GB", "900MiB") and references ("4bit", "16bit")."""

from __future__ import annotations

import re
from typing import Any, Protocol

import attrs

from autoqra.quant_backends import UNQUANTIZED_BITS
from autoqra.space import Assignment


class MemoryModel(Protocol):
    """What a budget needs of :class:`autoqra.memory.MemoryModel` (structural, so this module does not
    import the memory model that calls it)."""

    space: Any
    backend: Any

    def predict(self, a: Assignment) -> Any: ...

    def with_space(self, space: Any) -> MemoryModel: ...


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.I)
_REF_RE = re.compile(r"^\s*(\d+)\s*-?\s*bits?\s*$", re.I)
TARGETS = ("model", "train")


def parse_size(text: str) -> int:
    """``"3.5GB"`` → 3_500_000_000, ``"900MiB"`` → 943_718_400 (decimal and binary units)."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"budget={text!r} is not a size; use bytes (int), e.g. '3.5GB', '900MiB', or a reference like '4bit'"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _measure(mm: MemoryModel, a, target: str) -> int:
    bd = mm.predict(a)
    return bd.bytes_for(target)


def reference_bytes(mm: MemoryModel, bits: int, rank: int | None = None, target: str = "model") -> int:
    """Footprint of every unit at ``bits`` and ``rank`` (default rank: the ladder value closest to 8)."""
    space = mm.space
    if rank is None:
        nonzero = [r for r in space.ranks if r > 0] or list(space.ranks)
        rank = min(nonzero, key=lambda r: (abs(r - 8), r))
    # embedding / head units stay 16-bit in a reference (the budgets "4bit", ... mean what they meant before
    # those units joined the space)
    own = dict(getattr(space, "own_bits", ()))
    a = Assignment(space.unit_names, [UNQUANTIZED_BITS if u.name in own else bits for u in space.units],
                   [rank if u.has_rank else 0 for u in space.units])
    if bits != UNQUANTIZED_BITS:
        mm.backend.check_bits([bits])
    return _measure_any(mm, a, target)


def _measure_any(mm: MemoryModel, a, target: str) -> int:
    # the reference bits/rank may be off the ladder: predict through a temporary model of the same setup
    try:
        mm.space.validate(a)
    except ValueError:
        pass
    else:
        return _measure(mm, a, target)
    space = attrs.evolve(mm.space, bits=tuple(sorted(set(mm.space.bits) | set(a.bits))),
                         ranks=tuple(sorted(set(mm.space.ranks) | set(a.ranks))))
    return _measure(mm.with_space(space), a, target)


def resolve_budget(budget: int | float | str, mm: MemoryModel, rank: int | None = None, target: str = "model") -> int:
    """Resolve a budget to bytes and check it is reachable.

    Args:
        budget: bytes (int/float), a size string, or ``"<b>bit"`` = footprint of uniform b-bit at ``rank``.
        mm: the memory model of the search.
        rank: rank of a reference budget (default: ladder rank closest to 8).
        target: ``"model"`` (static bytes) or ``"train"`` (training-time bytes).

    Raises:
        ValueError: malformed budget, or one below the smallest feasible footprint (named in bytes).
    """
    if target not in TARGETS:
        raise ValueError(f"budget target={target!r} is not allowed; choose one of {list(TARGETS)}")
    if isinstance(budget, bool):
        raise ValueError(f"budget={budget!r} is not a size")
    if isinstance(budget, (int, float)):
        if budget <= 0:
            raise ValueError(f"budget={budget!r} must be positive (bytes)")
        value = int(budget)
    elif isinstance(budget, str):
        m = _REF_RE.match(budget)
        value = reference_bytes(mm, int(m.group(1)), rank, target) if m else parse_size(budget)
    else:
        raise ValueError(f"budget={budget!r} must be bytes (int), a size string or a reference like '4bit'")
    minimum = _measure(mm, mm.space.minimum(), target)
    if value < minimum:
        raise ValueError(
            f"budget {budget!r} = {value:,} bytes is below the smallest feasible {target} footprint "
            f"{minimum:,} bytes (every unit at {mm.space.bits[0]} bits, rank {mm.space.ranks[0]})"
        )
    return value
