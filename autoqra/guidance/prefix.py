r"""Replay the unchanged prefix of a decoder stack: a forward pass that only changed layers ``>= i``
recomputes those layers only.

The cost model's KL table (:func:`~autoqra.guidance.costmodel.quant_damage`) quantizes one unit at a time
and runs the whole model for every unit and bit-width, although the hidden states entering the unit's
first decoder layer are those of the unquantized model. :class:`PrefixReplay` records every decoder
layer's output on one reference pass; inside :meth:`PrefixReplay.below` the layers before ``i`` are
swapped for modules that return the recorded outputs (the embeddings, masks and rotary tables are still
computed by the model's own forward, which is cheap), so layers ``i..`` see bit-identical inputs and the
result equals a full pass. A replayed layer checks the shape of what it is given against what it
returns, so a pass over other inputs fails loudly instead of mixing batches.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn


class _Replay(nn.Module):
    """Stands in for one decoder layer: returns its recorded outputs, one per call, in call order."""

    def __init__(self, outputs: list[Any], index: int) -> None:
        super().__init__()
        self.outputs, self.index, self.calls = outputs, index, 0

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.calls >= len(self.outputs):
            raise RuntimeError(f"decoder layer {self.index} replayed {self.calls + 1} times; "
                               f"{len(self.outputs)} outputs were recorded (a pass over other inputs?)")
        out = self.outputs[self.calls]
        self.calls += 1
        first = out[0] if isinstance(out, tuple) else out
        if first.shape != hidden_states.shape:
            raise RuntimeError(f"decoder layer {self.index}: recorded output {tuple(first.shape)} does not match "
                               f"the input {tuple(hidden_states.shape)} (a pass over other inputs?)")
        return out


def decoder_layers(model: nn.Module, module_names: Sequence[str]) -> tuple[nn.ModuleList, str] | None:
    """The ``nn.ModuleList`` of decoder layers holding most of the named modules (``<list>.<i>.`` in their
    names; ties: the outermost list) and its dotted path in ``model``; None when no list holds any."""
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, mods in model.named_modules():
        if not name or not isinstance(mods, nn.ModuleList) or len(mods) < 2:
            continue
        pat = _layer_pattern(name)
        hits = sum(1 for n in module_names if pat.search(f"{n}."))
        if hits and (best is None or (hits, -len(name)) > (best[0], best[1])):
            best = (hits, -len(name), name, mods)
    return None if best is None else (best[3], best[2])


def _layer_pattern(list_path: str) -> re.Pattern:
    # module names may carry a wrapper's prefix (peft: base_model.model.<name>) or lack the list's
    tail = list_path.split(".")[-1]
    return re.compile(rf"(?:^|\.){re.escape(tail)}\.(\d+)\.")


def first_layer(module_names: Sequence[str], list_path: str) -> int:
    """The lowest decoder-layer index among ``module_names`` (0 when one lies outside the list)."""
    pat = _layer_pattern(list_path)
    idx = []
    for n in module_names:
        m = pat.search(f"{n}.")
        if m is None:
            return 0
        idx.append(int(m.group(1)))
    return min(idx) if idx else 0


class PrefixReplay:
    """Record the outputs of ``layers`` on reference passes, then replay the layers below ``i``.

    Usage::

        rp = PrefixReplay.find(model, module_names)
        with rp.record():
            ref = run(model)              # the reference passes (any number of batches)
        with rp.below(rp.first_layer(unit_modules)):
            out = run(model)              # the same passes; layers below the unit return the recorded outputs

    With ``layers=None`` (no decoder stack found, or replay switched off) both contexts do nothing and every
    pass runs whole.
    """

    def __init__(self, layers: nn.ModuleList | None, path: str = "") -> None:
        self.layers, self.path = layers, path
        self.outputs: list[list[Any]] = [[] for _ in layers or ()]

    @classmethod
    def find(cls, model: nn.Module, module_names: Sequence[str], enabled: bool = True) -> PrefixReplay:
        """A replay over ``model``'s decoder stack (:func:`decoder_layers`), inert when none is found or not ``enabled``."""
        found = decoder_layers(model, module_names) if enabled else None
        return cls(*found) if found else cls(None)

    def first_layer(self, module_names: Sequence[str]) -> int:
        """The layer a unit of ``module_names`` starts at (0 when inert: nothing is replayed)."""
        return first_layer(module_names, self.path) if self.layers is not None else 0

    @contextlib.contextmanager
    def record(self) -> Iterator[PrefixReplay]:
        if self.layers is None:
            yield self
            return
        self.outputs = [[] for _ in self.layers]
        hooks = [layer.register_forward_hook(self._hook(j)) for j, layer in enumerate(self.layers)]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    def _hook(self, j: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            self.outputs[j].append(output.detach() if isinstance(output, torch.Tensor) else output)
        return hook

    @contextlib.contextmanager
    def below(self, i: int) -> Iterator[PrefixReplay]:
        """Layers ``0..i-1`` replay their recorded outputs (``i = 0``: nothing is replayed)."""
        if i > 0 and (self.layers is None or not all(self.outputs[j] for j in range(i))):
            raise RuntimeError("PrefixReplay.below() before a recorded reference pass")
        originals = [self.layers[j] for j in range(i)] if i > 0 else []
        for j in range(i):
            self.layers[j] = _Replay(self.outputs[j], j)
        try:
            yield self
        finally:
            for j, layer in enumerate(originals):
                self.layers[j] = layer
