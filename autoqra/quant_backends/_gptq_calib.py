r"""GPTQ calibration: the Hessians ``H = 2/n X^T X`` of every linear and expert slice, from one forward pass of
the unquantized model (:meth:`autoqra.quant_backends.gptq.GPTQBackend.calibrate`)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from autoqra.units import expert_params, is_linear_like

log = logging.getLogger("autoqra.quant_backends.gptq")  # the backend's messages


@torch.no_grad()
def collect_hessians(model: nn.Module, module_names: list[str], calib_ids: torch.Tensor,
                     batch_size: int) -> dict[str, Any]:
    """``{name: H}`` of the named linears (aliased linears share one tensor) and ``{name: {param: [H per
    expert]}}`` of the named experts modules, ``batch_size`` sequences per forward; see
    :meth:`~autoqra.quant_backends.gptq.GPTQBackend.calibrate`."""
    mods = dict(model.named_modules())
    experts = [n for n in dict.fromkeys(module_names) if n in mods and expert_params(mods[n])]
    for name in module_names:
        if name not in experts and not is_linear_like(mods.get(name, nn.Identity())):
            raise ValueError(f"module_names entry {name!r} is not an nn.Linear, Conv1D or experts module of the model")
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise ValueError(
            f"calib_ids must be a non-empty (n_seq, seq_len) tensor, got shape {tuple(calib_ids.shape)}"
        )
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    alias: dict[str, str] = {}
    last: list[Any] = [None, None]  # the last hooked input tensor and the module that owns its H

    def make_hook(name: str):
        def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0]
            if last[0] is x:  # same tensor object as the previous linear: share its H
                leader = last[1]
                if alias.setdefault(name, leader) != leader:
                    raise RuntimeError(
                        f"GPTQ calibration: {name!r} changed input sharing between batches"
                    )
                return
            if name in alias:
                raise RuntimeError(
                    f"GPTQ calibration: {name!r} no longer shares its input with {alias[name]!r}"
                )
            x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            if name not in sums:
                sums[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
                rows[name] = 0
            sums[name].addmm_(x2.t(), x2)
            rows[name] += x2.shape[0]
            last[0], last[1] = x, name

        return hook

    modes = {m: m.training for m in model.modules()}
    expert_sums = {n: ExpertHessians(mods[n]) for n in experts}
    handles = [mods[n].register_forward_hook(make_hook(n)) for n in dict.fromkeys(module_names) if n not in experts]
    handles += [mods[n].register_forward_hook(h.hook) for n, h in expert_sums.items()]
    try:
        model.eval()
        dev = next(model.parameters()).device
        kw = {"use_cache": False} if getattr(model, "config", None) is not None else {}
        for b in range(0, calib_ids.shape[0], batch_size):
            model(calib_ids[b : b + batch_size].to(dev), **kw)
            last[0] = last[1] = None
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    out: dict[str, torch.Tensor] = {}
    for name in list(sums):
        S = sums.pop(name)  # freed on the device as soon as its CPU copy exists
        out[name] = S.mul_(2.0 / rows[name]).cpu()
        del S
    for name, leader in alias.items():
        out[name] = out[leader]
    for name, h in expert_sums.items():
        out[name] = h.result()
    missing = [n for n in module_names if n not in out]
    if missing:
        raise RuntimeError(f"GPTQ calibration: these linears never ran in the forward pass: {missing}")
    log.info("GPTQ calibration: %d linears, %d distinct Hessians", len(out), len(sums))
    return out


class ExpertHessians:
    """Per-expert ``H = 2/n X^T X`` of a mixture-of-experts module, from its routed tokens (a forward hook).

    The first tensor (``gate_up_proj``) sees each expert's routed hidden states; the second
    (``down_proj``) the gated intermediate activations, recomputed here from the unquantized weights
    (one-shot, like the linears). An expert no token reached gets ``H = 0`` (GPTQ then rounds to nearest).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params = expert_params(module)
        self.sums: dict[str, list[torch.Tensor | None]] = {p: [None] * getattr(module, p).shape[0] for p in self.params}
        self.rows = [0] * getattr(module, self.params[0]).shape[0]

    def _add(self, p: str, e: int, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        s = self.sums[p][e]
        self.sums[p][e] = x.t() @ x if s is None else s.addmm_(x.t(), x)

    def _w(self, p: str, e: int) -> torch.Tensor:
        w = getattr(self.module, p)[e].float()
        return w if getattr(self.module, "is_transposed", False) else w.t()  # (in, out)

    def hook(self, mod: nn.Module, args: tuple, out: Any) -> None:
        hidden, idx = args[0], args[1]
        first, last = self.params
        bias = getattr(mod, "has_bias", False)
        for e in torch.unique(idx).tolist():
            if not 0 <= e < len(self.rows):
                continue
            tok = (idx == e).any(-1).nonzero()[:, 0]
            x = hidden[tok].float()
            self._add(first, e, x)
            h = x @ self._w(first, e) + (getattr(mod, f"{first}_bias")[e].float() if bias else 0)
            h = type(mod)._apply_gate(mod, h) if getattr(mod, "has_gate", True) else mod.act_fn(h)
            self._add(last, e, h)
            self.rows[e] += x.shape[0]

    def result(self) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        for p in self.params:
            w = getattr(self.module, p)
            n_in = w.shape[1] if getattr(self.module, "is_transposed", False) else w.shape[2]
            out[p] = [
                (s.mul_(2.0 / self.rows[e]).cpu() if s is not None else torch.zeros(n_in, n_in))
                for e, s in enumerate(self.sums[p])
            ]
        return out
