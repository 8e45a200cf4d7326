r"""The search space: units (decoder blocks or single linears) × a bit ladder × a rank ladder."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import numpy as np
from peft import LoraConfig
from torch import nn

from autoqra.quant_backends import UNQUANTIZED_BITS, get_backend

#: Linear-layer suffixes of a Llama-style decoder block (the paper's seven projections).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_RANKS = (0, 4, 8, 16)
_BLOCK_RE = re.compile(r"^(.*\.(?:layers|h|blocks|layer)\.\d+)\.")


@attrs.frozen
class Unit:
    """One searchable unit: a name and the full names and ``(out, in)`` shapes of its linears."""

    name: str
    modules: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]

    @property
    def n_weights(self) -> int:
        """Number of weights (elements) in all linears of the unit."""
        return sum(o * i for o, i in self.shapes)

    @property
    def lora_params_per_rank(self) -> int:
        """LoRA parameters per unit of rank: ``sum(in + out)`` over the unit's linears."""
        return sum(o + i for o, i in self.shapes)


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


def _linears(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets and _BLOCK_RE.match(name):
            out.append((name, (mod.out_features, mod.in_features)))
    return out


@attrs.define
class SearchSpace:
    """Units × bit ladder × rank ladder.

    Build with :meth:`from_model`. Ladders are sorted ascending; bits ``16`` means
    "not quantized", rank ``0`` means "no adapter".
    """

    units: tuple[Unit, ...]
    bits: tuple[int, ...]
    ranks: tuple[int, ...]
    granularity: str = "block"

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        bits: Iterable[int] = DEFAULT_BITS,
        ranks: Iterable[int] = DEFAULT_RANKS,
        granularity: str = "block",
        target_modules: Sequence[str] | None = None,
        backend: Any = None,
    ) -> SearchSpace:
        """Discover the units of a HF causal LM.

        Args:
            model: the (unquantized) model; the meta device is fine.
            bits: bit ladder; 16 = unquantized.
            ranks: rank ladder; 0 = no adapter.
            granularity: ``"block"`` (all linears of a decoder block share (bits, rank)) or ``"module"``.
            target_modules: linear-name suffixes to search over (default: the seven projections).
            backend: optional backend (name or object); its supported bits are checked now.
        """
        bits_t, ranks_t = _ladder("bits", bits, 1, 16), _ladder("ranks", ranks, 0, 4096)
        if granularity not in ("block", "module"):
            raise ValueError(f"granularity={granularity!r} is not allowed; use 'block' or 'module'")
        targets = tuple(target_modules) if target_modules else DEFAULT_TARGETS
        lins = _linears(model, targets)
        if not lins:
            raise ValueError(
                f"no nn.Linear named {list(targets)} inside decoder blocks (…layers.N.…) was found in "
                f"{type(model).__name__}; pass target_modules= with the suffixes of your model's linears"
            )
        if backend is not None:
            get_backend(backend).check_bits(bits_t)
        if granularity == "module":
            units = tuple(Unit(n, (n,), (s,)) for n, s in lins)
        else:
            groups: dict[str, list[tuple[str, tuple[int, int]]]] = {}
            for n, s in lins:
                groups.setdefault(_BLOCK_RE.match(n).group(1), []).append((n, s))  # type: ignore[union-attr]
            units = tuple(Unit(k, tuple(n for n, _ in v), tuple(s for _, s in v)) for k, v in groups.items())
        return cls(units=units, bits=bits_t, ranks=ranks_t, granularity=granularity)

    # ------------------------------------------------------------------ basics
    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def unit_names(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units)

    @property
    def module_names(self) -> list[str]:
        return [m for u in self.units for m in u.modules]

    def spec(self) -> dict[str, Any]:
        return {
            "units": [[u.name, list(u.modules), [list(s) for s in u.shapes]] for u in self.units],
            "bits": list(self.bits),
            "ranks": list(self.ranks),
            "granularity": self.granularity,
        }

    def validate(self, a: Assignment) -> None:
        """Raise ``ValueError`` if ``a`` does not belong to this space."""
        if a.units != self.unit_names:
            raise ValueError(f"assignment units do not match the space ({len(a.units)} vs {self.n_units} units)")
        bad_b = sorted(set(a.bits) - set(self.bits))
        bad_r = sorted(set(a.ranks) - set(self.ranks))
        if bad_b or bad_r:
            raise ValueError(
                f"assignment uses bits {bad_b} / ranks {bad_r} outside the ladders "
                f"bits={list(self.bits)} ranks={list(self.ranks)}"
            )

    def with_unquantized(self) -> SearchSpace:
        """This space with bits 16 (unquantized) added to the ladder (evaluators and priors need it)."""
        return attrs.evolve(self, bits=tuple(sorted(set(self.bits) | {UNQUANTIZED_BITS})))

    # ------------------------------------------------------------ construction
    def make(self, bits: Sequence[int], ranks: Sequence[int]) -> Assignment:
        a = Assignment(self.unit_names, bits, ranks)
        self.validate(a)
        return a

    def uniform(self, bits: int, rank: int) -> Assignment:
        """Every unit at ``bits`` and ``rank`` (both must be on the ladders)."""
        return self.make([bits] * self.n_units, [rank] * self.n_units)

    def minimum(self) -> Assignment:
        return self.uniform(self.bits[0], self.ranks[0])

    def maximum(self) -> Assignment:
        return self.uniform(self.bits[-1], self.ranks[-1])

    def sample(self, rng: np.random.Generator) -> Assignment:
        """A uniformly random assignment."""
        x = np.concatenate(
            [rng.integers(0, len(self.bits), self.n_units), rng.integers(0, len(self.ranks), self.n_units)]
        )
        return self.decode(x)

    # --------------------------------------------------------------- encoding
    @property
    def upper(self) -> np.ndarray:
        """Inclusive upper bounds of the integer encoding (lower bounds are 0)."""
        return np.array([len(self.bits) - 1] * self.n_units + [len(self.ranks) - 1] * self.n_units)

    def encode(self, a: Assignment) -> np.ndarray:
        """Ladder indices ``[bit_idx_1..L, rank_idx_1..L]`` as an int array of length 2L."""
        self.validate(a)
        bi = {b: i for i, b in enumerate(self.bits)}
        ri = {r: i for i, r in enumerate(self.ranks)}
        return np.array([bi[b] for b in a.bits] + [ri[r] for r in a.ranks], dtype=np.int64)

    def decode(self, x: Sequence[int] | np.ndarray) -> Assignment:
        """Inverse of :meth:`encode`; values are clipped to the ladders."""
        x = np.clip(np.rint(np.asarray(x)).astype(np.int64), 0, self.upper)
        n = self.n_units
        return Assignment(self.unit_names, [self.bits[i] for i in x[:n]], [self.ranks[i] for i in x[n:]])

    def ordinal(self, a: Assignment) -> np.ndarray:
        """Ladder positions scaled to [0, 1] (the paper's s_q, s_r), length 2L, float."""
        x = self.encode(a).astype(float)
        return x / np.maximum(self.upper, 1)

    def neighbours(self, a: Assignment) -> list[Assignment]:
        """All assignments one ladder step away on exactly one variable."""
        x = self.encode(a)
        out = []
        for j in range(len(x)):
            for d in (-1, 1):
                if 0 <= x[j] + d <= self.upper[j]:
                    y = x.copy()
                    y[j] += d
                    out.append(self.decode(y))
        return out

    # ------------------------------------------------------------ module maps
    def module_map(self, a: Assignment) -> dict[str, tuple[int, int]]:
        """``{full_module_name: (bits, rank)}`` for every linear in the space."""
        self.validate(a)
        return {m: (b, r) for u, b, r in zip(self.units, a.bits, a.ranks) for m in u.modules}

    def lora_config(self, a: Assignment, alpha_ratio: float = 2.0, dropout: float = 0.0,  # noqa: D417
                    alpha: float | None = None, **kw: Any) -> LoraConfig:
        """A peft ``LoraConfig`` realising the ranks of ``a`` (rank 0 → ``exclude_modules``).

        α = ``alpha`` for every module when given (scaling α/r: the update size no longer grows with
        the rank), else ``alpha_ratio`` · r per module (the paper; scaling constant, so a rank-16
        adapter trains like a rank-8 one at twice the learning rate), via ``rank_pattern`` /
        ``alpha_pattern``.
        Pattern keys are full dotted module names; peft matches them as ``(.*[.])?name$`` so
        ``layers.1.…`` never matches ``layers.11.…``.
        """
        mm = self.module_map(a)
        adapted = {m: r for m, (_, r) in mm.items() if r > 0}
        if not adapted:
            raise ValueError("every unit has rank 0: there is nothing to fine-tune")
        base_r = max(adapted.values())
        return LoraConfig(
            r=base_r,
            lora_alpha=alpha if alpha is not None else alpha_ratio * base_r,
            lora_dropout=dropout,
            target_modules=sorted(adapted),
            exclude_modules=sorted(m for m, (_, r) in mm.items() if r == 0) or None,
            rank_pattern=dict(adapted),
            alpha_pattern={m: alpha if alpha is not None else alpha_ratio * r for m, r in adapted.items()},
            bias="none",
            task_type="CAUSAL_LM",
            **kw,
        )


def _ladder(field: str, values: Iterable[int], lo: int, hi: int) -> tuple[int, ...]:
    try:
        vals = tuple(sorted({int(v) for v in values}))
    except (TypeError, ValueError):
        raise ValueError(f"{field}={values!r} must be a list of integers") from None
    if not vals:
        raise ValueError(f"{field} must not be empty")
    bad = [v for v in vals if not lo <= v <= hi]
    if bad:
        raise ValueError(f"{field}={list(vals)} has values {bad} outside [{lo}, {hi}]")
    return vals
