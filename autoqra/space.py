r"""The search space: units (decoder blocks or single modules) × a bit ladder × a rank ladder.

A unit is a named group of weight tensors (:mod:`autoqra.units`): by default every weight matrix of the
decoder blocks (``nn.Linear`` incl. fused projections, GPT-2 ``Conv1D``, mixture-of-experts tensors), routers
and norms aside. The share of decoder weights the space covers is kept in :attr:`SearchSpace.coverage`.

With ``embeddings="search"`` the token embedding and the output head join as units of their own
(one unit when tied): they have their own bit options (:data:`EMBEDDING_BITS` that the backend stores,
plus 16) and no LoRA rank. **Per-unit options**: :meth:`SearchSpace.unit_bits` / :meth:`SearchSpace.unit_ranks`;
the integer encoding indexes each unit's own options (``upper`` is per unit), so every searcher proposes
allowed options only. A unit's options are never more than the space's ladders (``len(unit_bits(u)) <=
len(bits)``): tables of width ``len(bits)`` / ``len(ranks)`` hold every unit, padded past its ``upper``.
A rank given to a unit without one is accepted and means 0 (``space.encode`` maps it to 0).

Parts in their own modules: :class:`Assignment` (:mod:`autoqra.assignment`); finding and grouping a model's
units and the embedding / head units' bit options (:mod:`autoqra.space_units`); the peft ``LoraConfig`` of an
assignment (:mod:`autoqra.lora`). ``Assignment`` and ``EMBEDDING_BITS`` are re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
from torch import nn

from autoqra.assignment import Assignment
from autoqra.lora import lora_config
from autoqra.quant_backends import UNQUANTIZED_BITS
from autoqra.space_units import EMBEDDING_BITS, embedding_options, model_units  # noqa: F401
from autoqra.unit_types import GRANULARITIES
from autoqra.units import Coverage, Unit, WeightTensor

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = ["DEFAULT_BITS", "DEFAULT_RANKS", "Assignment", "Coverage", "SearchSpace", "Unit", "WeightTensor"]

#: The seven projections of a Llama-style block (the paper's targets). No longer the default: by default
#: every weight matrix of the decoder blocks is searched (``target_modules=None``); pass these to narrow.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_RANKS = (0, 4, 8, 16)
#: ``embeddings=``: ``"search"`` (embedding / head are units) or ``"keep"`` (16-bit, outside the space: the paper's).
EMBEDDING_MODES = ("search", "keep")
_BLOCK_RE = re.compile(r"^(.*\.(?:layers|h|blocks|layer)\.\d+)\.")


@attrs.define
class SearchSpace:
    """Units × bit ladder × rank ladder.

    Build with :meth:`from_model`. Ladders are sorted ascending; bits ``16`` means
    "not quantized", rank ``0`` means "no adapter". ``coverage`` (not part of :meth:`spec`) is the
    share of the decoder weights the units hold, when the space was built from a model.
    """

    units: tuple[Unit, ...]
    bits: tuple[int, ...]
    ranks: tuple[int, ...]
    granularity: str = "block"
    coverage: Coverage | None = attrs.field(default=None, eq=False, repr=False)
    #: ``((unit name, bit options), ...)`` of units with their own options (embedding / head; no rank).
    own_bits: tuple[tuple[str, tuple[int, ...]], ...] = attrs.field(
        default=(), converter=lambda v: tuple((str(n), tuple(sorted(int(b) for b in bs))) for n, bs in
                                              (v.items() if isinstance(v, dict) else v)))
    _ub: tuple[tuple[int, ...], ...] = attrs.field(init=False, eq=False, repr=False)
    _ur: tuple[tuple[int, ...], ...] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        own = dict(self.own_bits)
        unknown = set(own) - {u.name for u in self.units}
        if unknown:
            raise ValueError(f"own_bits names units that are not in the space: {sorted(unknown)}")
        self._ub = tuple(own.get(u.name, self.bits) for u in self.units)
        self._ur = tuple(self.ranks if u.has_rank else (0,) for u in self.units)
        for u, opts in zip(self.units, self._ub):
            if len(opts) > len(self.bits):
                raise ValueError(f"unit {u.name!r} has {len(opts)} bit options {list(opts)}, more than the ladder's "
                                 f"{len(self.bits)}; every unit's options must fit the ladder's width")

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        bits: Iterable[int] = DEFAULT_BITS,
        ranks: Iterable[int] = DEFAULT_RANKS,
        granularity: str = "block",
        target_modules: Sequence[str] | None = None,
        backend: Any = None,
        embeddings: str = "keep",
    ) -> SearchSpace:
        """Discover the units of a HF causal LM.

        By default every weight matrix inside the decoder blocks is searched (peft's "all-linear"
        meaning, found from the module tree, :func:`autoqra.units.discover`): ``nn.Linear`` weights
        (fused ``qkv_proj``/``gate_up_proj`` are ordinary members of their block), GPT-2 ``Conv1D``
        and the 3-D tensors of mixture-of-experts layers; routers and norms stay 16-bit. A coverage
        below 90 % is logged as a warning naming what is left out.

        Args:
            model: the (unquantized) model; the meta device is fine.
            bits: bit ladder; 16 = unquantized.
            ranks: rank ladder; 0 = no adapter.
            granularity: ``"block"`` (all weights of a decoder block share (bits, rank)), ``"sublayer"``
                (a block's attention and its MLP / experts are two units: the block's child that holds the
                weight) or ``"module"`` (one unit per module: a linear, or a whole experts module).
            target_modules: narrow the space to modules whose last name (``q_proj``, ``fc1``,
                ``experts``) or dotted name suffix is listed; an expert parameter name
                (``gate_up_proj``) selects its experts module. Default: everything.
            backend: optional backend (name or object); its supported bits are checked now, and it decides
                which bit options the embedding / head units get (default: HQQ's).
            embeddings: ``"search"``: the token embedding and the output head become units (one when tied)
                with bits :data:`EMBEDDING_BITS` (where the backend stores them) or 16 and no rank;
                ``"keep"`` (default here; :class:`~autoqra.config.Config` defaults to ``"search"``): they
                stay 16-bit outside the space.
        """
        if embeddings not in EMBEDDING_MODES:
            raise ValueError(f"embeddings={embeddings!r} is not allowed; use one of {list(EMBEDDING_MODES)}")
        bits_t, ranks_t = _ladder("bits", bits, 1, 16), _ladder("ranks", ranks, 0, 4096)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r} is not allowed; use one of {list(GRANULARITIES)}")
        units, cov, own = model_units(model, bits_t, granularity, target_modules, backend, embeddings)
        return cls(units=units, bits=bits_t, ranks=ranks_t, granularity=granularity, coverage=cov, own_bits=own)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SearchSpace:
        """Inverse of :meth:`spec` and :meth:`to_dict` (the coverage comes back when the dict has it)."""
        cov = Coverage.from_dict(spec["coverage"]) if spec.get("coverage") else None
        return cls(units=tuple(Unit.from_spec(u) for u in spec["units"]), bits=tuple(spec["bits"]),
                   ranks=tuple(spec["ranks"]), granularity=spec["granularity"], coverage=cov,
                   own_bits=spec.get("unit_bits") or {})

    def to_dict(self) -> dict[str, Any]:
        """:meth:`spec` plus the coverage (for saving; :meth:`spec` alone identifies the space in caches)."""
        return {**self.spec(), **({"coverage": self.coverage.to_dict()} if self.coverage else {})}

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
        d: dict[str, Any] = {
            "units": [u.to_spec() for u in self.units],
            "bits": list(self.bits),
            "ranks": list(self.ranks),
            "granularity": self.granularity,
        }
        if self.own_bits:
            d["unit_bits"] = {n: list(b) for n, b in self.own_bits}
        return d

    # ------------------------------------------------------ per-unit options
    def unit_bits(self, u: int) -> tuple[int, ...]:
        """Bit options of unit ``u`` (ascending; the ladder unless the unit has its own)."""
        return self._ub[u]

    def unit_ranks(self, u: int) -> tuple[int, ...]:
        """Rank options of unit ``u`` (``(0,)`` for a unit without a rank)."""
        return self._ur[u]

    @property
    def all_bits(self) -> tuple[int, ...]:
        """Every bit option of any unit (the ladder plus the embedding / head units' own), ascending."""
        return tuple(sorted(set(self.bits).union(*self._ub)))

    @property
    def has_own(self) -> bool:
        """Whether some unit has its own options (embedding / head units)."""
        return bool(self.own_bits)

    def kind_of(self, u: int) -> str:
        """``"block"``, ``"embedding"`` or ``"head"`` (:attr:`autoqra.units.Unit.kind`)."""
        return self.units[u].kind

    def validate(self, a: Assignment) -> None:
        """Raise ``ValueError`` if ``a`` does not belong to this space."""
        if a.units != self.unit_names:
            raise ValueError(f"assignment units do not match the space ({len(a.units)} vs {self.n_units} units)")
        bad_b = sorted({b for b, ub in zip(a.bits, self._ub) if b not in ub})
        ranks_ok = set(self.ranks) | {0}  # a unit without a rank accepts any ladder rank (it means 0)
        bad_r = sorted({r for r, u in zip(a.ranks, self.units) if r not in (self.ranks if u.has_rank else ranks_ok)})
        if bad_b or bad_r:
            own = {n: list(b) for n, b in self.own_bits}
            raise ValueError(
                f"assignment uses bits {bad_b} / ranks {bad_r} outside the ladders "
                f"bits={list(self.bits)} ranks={list(self.ranks)}" + (f" (own bit options: {own})" if own else "")
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
        """Every block unit at ``bits`` and ``rank`` (both must be on the ladders); embedding / head units
        keep 16 bits (the reference the budgets ``"4bit"`` etc. name), rank 0."""
        own = dict(self.own_bits)
        return self.make([UNQUANTIZED_BITS if u.name in own else bits for u in self.units],
                         [rank if u.has_rank else 0 for u in self.units])

    def uniform_encoded(self, bit_idx: int, rank_idx: int | np.ndarray) -> np.ndarray:
        """The encoding of every block unit at ladder index ``bit_idx`` and rank index ``rank_idx`` (an int or
        one per unit), embedding / head units at 16 bits (their top), rank 0 (the encoding of :meth:`uniform`)."""
        n = self.n_units
        up = self.upper
        names = dict(self.own_bits)
        own = np.array([u.name in names for u in self.units], dtype=bool)
        xb = np.where(own, up[:n], bit_idx)
        xr = np.minimum(np.broadcast_to(np.asarray(rank_idx, dtype=np.int64), (n,)), up[n:])
        return np.concatenate([xb, xr]).astype(np.int64)

    def minimum(self) -> Assignment:
        """Every unit at its lowest option (embedding / head units at their lowest bits)."""
        return self.decode(np.zeros(2 * self.n_units, dtype=np.int64))

    def maximum(self) -> Assignment:
        """Every unit at its highest option."""
        return self.decode(self.upper)

    def sample(self, rng: np.random.Generator) -> Assignment:
        """A uniformly random assignment (each unit's options uniformly)."""
        return self.decode(rng.integers(0, self.upper + 1))

    # --------------------------------------------------------------- encoding
    @property
    def upper(self) -> np.ndarray:
        """Inclusive upper bounds of the integer encoding, per variable (lower bounds are 0): each unit's
        bit options, then each unit's rank options (0 for a unit without a rank)."""
        return np.array([len(b) - 1 for b in self._ub] + [len(r) - 1 for r in self._ur], dtype=np.int64)

    def encode(self, a: Assignment) -> np.ndarray:
        """Indices into each unit's options ``[bit_idx_1..L, rank_idx_1..L]`` as an int array of length 2L
        (for units without own options: ladder indices)."""
        self.validate(a)
        bi = [ub.index(b) for b, ub in zip(a.bits, self._ub)]
        ri = [ur.index(r) if r in ur else 0 for r, ur in zip(a.ranks, self._ur)]
        return np.array(bi + ri, dtype=np.int64)

    def decode(self, x: Sequence[int] | np.ndarray) -> Assignment:
        """Inverse of :meth:`encode`; values are clipped to each unit's options."""
        x = np.clip(np.rint(np.asarray(x)).astype(np.int64), 0, self.upper)
        n = self.n_units
        return Assignment(self.unit_names, [ub[i] for ub, i in zip(self._ub, x[:n])],
                          [ur[i] for ur, i in zip(self._ur, x[n:])])

    def bits_grid(self) -> np.ndarray:
        """``(n_units, len(bits))``: the bit value of each unit's option index (padded with its top option)."""
        nb = len(self.bits)
        return np.array([list(ub) + [ub[-1]] * (nb - len(ub)) for ub in self._ub], dtype=np.int64)

    def ranks_grid(self) -> np.ndarray:
        """``(n_units, len(ranks))``: the rank of each unit's option index (padded with its top option)."""
        nr = len(self.ranks)
        return np.array([list(ur) + [ur[-1]] * (nr - len(ur)) for ur in self._ur], dtype=np.int64)

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
    @property
    def tensors(self) -> list[WeightTensor]:
        """Every weight tensor of every unit, in unit order."""
        return [t for u in self.units for t in u.tensors]

    def module_map(self, a: Assignment) -> dict[str, tuple[int, int]]:
        """``{full_module_name: (bits, rank)}`` for every module in the space (linears, experts modules,
        embedding and head; rank 0 for units without one)."""
        self.validate(a)
        return {m: (b, r if u.has_rank else 0) for u, b, r in zip(self.units, a.bits, a.ranks) for m in u.modules}

    def tensor_map(self, a: Assignment) -> dict[str, tuple[WeightTensor, int, int]]:
        """``{full tensor name: (tensor, bits, rank)}`` for every weight tensor in the space."""
        self.validate(a)
        return {t.name: (t, b, r if u.has_rank else 0) for u, b, r in zip(self.units, a.bits, a.ranks)
                for t in u.tensors}

    def lora_config(self, a: Assignment, alpha_ratio: float = 2.0, dropout: float = 0.0,  # noqa: D417
                    alpha: float | None = None, **kw: Any) -> LoraConfig:
        """A peft ``LoraConfig`` realising the ranks of ``a`` (rank 0 → ``exclude_modules``).

        α = ``alpha`` for every module when given (scaling α/r: the update size no longer grows with
        the rank), else ``alpha_ratio`` · r per module (the paper; scaling constant, so a rank-16
        adapter trains like a rank-8 one at twice the learning rate), via ``rank_pattern`` /
        ``alpha_pattern``.
        Pattern keys are full dotted module names; peft matches them as ``(.*[.])?name$`` so
        ``layers.1.…`` never matches ``layers.11.…``. Linear (and ``Conv1D``) modules are
        ``target_modules``; expert tensors are ``target_parameters`` (full parameter names, peft's
        ``ParamWrapper``; :mod:`autoqra.quant_backends._experts` gives it a quantized base).
        """
        return lora_config(self.tensor_map(a), alpha_ratio, dropout, alpha, **kw)


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
