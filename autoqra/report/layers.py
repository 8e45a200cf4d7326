"""The per-unit heatmap of :mod:`autoqra.report.html` (bits, ranks and importance priors of the chosen point)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from autoqra.report.plots import fmt_mb, mean_bits, new_figure, target_mb, trial_labels


def _strip_prefix(names: Sequence[str]) -> tuple[list[str], str]:
    if len(names) < 2:
        return list(names), ""
    pre = names[0]
    for n in names[1:]:
        while not n.startswith(pre):
            pre = pre[:-1]
    pre = pre[: pre.rfind(".") + 1] if "." in pre else pre
    return [n[len(pre):] for n in names], pre


def _unit_labels(space) -> tuple[list[str], str]:
    """Tick labels: block units without their common prefix (``0``, ``1``, ...), embedding / head units as
    ``embed`` (``embed+head`` when tied) and ``head``."""
    units = list(space.units)
    blocks = [u.name for u in units if getattr(u, "has_rank", True)]
    short, pre = _strip_prefix(blocks)
    it = iter(short)
    out = []
    for u in units:
        if getattr(u, "has_rank", True):
            out.append(next(it))
        elif u.kind == "embedding":
            out.append("embed+head" if len(u.tensors) > 1 else "embed")
        else:
            out.append("head")
    return out, pre


def _heat_row(ax, colour: Sequence[float], text: Sequence[str] | None, cmap: str, label: str,
              vmin: float, vmax: float) -> None:
    arr = np.asarray(colour, dtype=float)[None, :]
    im = ax.imshow(arr, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_yticks([0], [label], fontsize=8.5)
    for i, v in enumerate(text or []):
        rgba = im.cmap(im.norm(arr[0, i]))
        dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.55
        ax.text(i, 0, v, ha="center", va="center", fontsize=7.5, color="white" if dark else "black")


def _ladder_rows(result, t, tag: str, annotate: bool) -> list[tuple]:
    """Bits and rank rows of one trial; colour = position on the ladder, text = the value."""
    out = []
    for vals, ladder, what, cmap in ((t.assignment.bits, result.space.bits, "bits", "viridis"),
                                     (t.assignment.ranks, result.space.ranks, "LoRA rank", "Greens")):
        lad = sorted(set(ladder) | set(vals))
        idx = [lad.index(v) for v in vals]
        lo, hi = (0, len(lad) - 1) if what == "bits" else (-0.6, len(lad) - 1)
        text = [str(v) for v in vals] if annotate else None
        out.append((idx, text, cmap, f"{what}\n({tag})", lo, max(hi, 1)))
    return out


def layers_figure(result) -> Figure:
    """Heatmap rows: bits and ranks of the chosen point (and of the best-utility point when it differs),
    then the importance priors (when recorded)."""
    names = list(result.space.unit_names)
    n = len(names)
    annotate = 0 < n <= 48
    imp = result.info.get("importance") or {}
    shown = [("chosen", result.best)] if result.best is not None else []
    ukey = result.info.get("best_utility_key")
    if ukey and (result.best is None or ukey != result.best.key):
        cand = [t for t in result.history if t.key == ukey and t.result.ok]
        if cand:
            t = max(cand, key=lambda t: t.fidelity.steps)
            shown.append((f"best utility, {trial_labels(result)[t.key]}", t))
    rows: list[tuple] = []
    for tag, t in shown:
        if len(t.assignment.bits) == n:
            rows += _ladder_rows(result, t, tag, annotate)
    for key, lab in (("q", "I_q quant.\nsensitivity"), ("r", "I_r adaptation\ndemand")):
        v = imp.get(key)
        if v is not None and len(v) == n:
            vals = [float(x) if x is not None else math.nan for x in v]
            txt = [f"{x:.2f}".replace("0.", ".", 1) for x in vals] if annotate else None
            rows.append((vals, txt, "Reds", lab, 0.0, 1.0))
    fig = new_figure(10.5, 1.1 + 0.55 * max(len(rows), 1))
    if not rows or n == 0:
        fig.text(0.5, 0.5, "no chosen point and no importance priors in this result", ha="center")
        return fig
    short, pre = _unit_labels(result.space)
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (colour, txt, cmap, lab, lo, hi) in zip(axes, rows):
        _heat_row(ax, colour, txt, cmap, lab, lo, hi)
    step = max(1, math.ceil(n / 40))
    axes[-1].set_xticks(range(0, n, step), short[::step], fontsize=8, rotation=0 if n <= 40 else 90)
    blocks_only = [x for x, u in zip(short, result.space.units) if getattr(u, "has_rank", True)]
    axes[-1].set_xlabel(f"unit ({pre}N)" if pre and all(x.isdigit() for x in blocks_only) else "unit")
    best = result.best
    title = "No feasible point chosen" if best is None else (
        f"Chosen point: mean {mean_bits(result, best):.2f} bits, "
        f"{fmt_mb(target_mb(result, best))} MB {result.target} memory")
    if any(k in imp for k in ("q", "r")):
        title += "  ·  importance priors: 0–1, darker = more important"
    fig.suptitle(title, fontsize=10.5)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=0.3)
    return fig
