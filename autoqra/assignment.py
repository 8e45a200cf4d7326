r"""An :class:`Assignment`: one bit-width and one LoRA rank per unit of a search space (hashable, JSON)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

if TYPE_CHECKING:
    from autoqra.space import SearchSpace


@attrs.frozen(eq=True, hash=True)
class Assignment:
    """Per-unit bit-widths and LoRA ranks. Hashable; JSON round-trips.

    ``bits[i]`` is the bit-width of unit ``units[i]`` (16 = unquantized); ``ranks[i]`` its
    LoRA rank (0 = no adapter).
    """

    units: tuple[str, ...] = attrs.field(converter=tuple)
    bits: tuple[int, ...] = attrs.field(converter=lambda v: tuple(int(x) for x in v))
    ranks: tuple[int, ...] = attrs.field(converter=lambda v: tuple(int(x) for x in v))

    def __attrs_post_init__(self) -> None:
        if not (len(self.units) == len(self.bits) == len(self.ranks)):
            raise ValueError(
                f"Assignment needs one bits and one rank per unit; got {len(self.units)} units, "
                f"{len(self.bits)} bits, {len(self.ranks)} ranks"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"units": list(self.units), "bits": list(self.bits), "ranks": list(self.ranks)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Assignment:
        return cls(d["units"], d["bits"], d["ranks"])

    @classmethod
    def from_json(cls, s: str) -> Assignment:
        return cls.from_dict(json.loads(s))

    def mean_bits(self, space: SearchSpace) -> float:
        """Weight-count-weighted mean bit-width."""
        w = np.array([u.n_weights for u in space.units], dtype=float)
        return float(np.dot(w, self.bits) / w.sum())

    def short(self) -> str:
        """Compact text: ``b4r8 b3r16 ...``."""
        return " ".join(f"b{b}r{r}" for b, r in zip(self.bits, self.ranks))
