r"""Search-efficiency curve of the benchmark: best feasible high-fidelity score vs evaluations and vs steps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from autoqra._optional import require

#: id -> (label, colour, line style, width); AutoQRA wide underneath so the shared baseline prefix stays visible
_STYLE = {"autoqra": ("AutoQRA, paper Eq. 6 warm start", "#1f77b4", "-", 4.0),
          "nsga2": ("plain NSGA-II", "#ff7f0e", "--", 1.8),
          "random": ("random search", "#2ca02c", "-.", 1.8),
          "autoqra-anchored": ("AutoQRA, anchored warm start (default)", "#9467bd", "-", 2.2)}


def feasible_high(t: dict, budget: int) -> bool:
    """Whether a search record is an ok high-fidelity trial within ``budget`` bytes."""
    return t["fidelity"] == "high" and t["ok"] and t["model_bytes"] <= budget


def curve(records: list[dict], budget: int) -> tuple[list[int], list[int], list[float]]:
    """(evaluations, cumulative training steps, best feasible high-fidelity score so far) per evaluation."""
    evals, steps, best, cur, tot = [], [], [], -math.inf, 0
    for i, t in enumerate(records, 1):
        tot += int(t["steps"])
        if feasible_high(t, budget):
            cur = max(cur, float(t["score"]))
        evals.append(i)
        steps.append(tot)
        best.append(cur)
    return evals, steps, best


def curve_figure(rep: dict[str, Any]):
    """A matplotlib ``Figure`` with two panels (x = evaluations, x = cumulative training steps)."""
    Figure = require("matplotlib.figure", "the benchmark's efficiency plot").Figure
    fig = Figure(figsize=(11, 4.4), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    rows = {r["id"]: r for r in rep["rows"] if r.get("search")}
    finite: list[float] = []
    budget = rep["budgets"]["4bit"]
    zoom = axes[1].inset_axes((0.42, 0.3, 0.55, 0.4))  # the top of the curves, where the searches differ
    for rid, (label, color, ls, lw) in _STYLE.items():
        r = rows.get(rid)
        if r is None:
            continue
        recs = r["search"]["records"]
        ev, st, best = curve(recs, budget)
        ys = [b if math.isfinite(b) else math.nan for b in best]
        finite += [y for y in ys if math.isfinite(y)]
        hi = [(i, s, t["score"]) for i, s, t in zip(ev, st, recs)
              if feasible_high(t, budget)]
        for ax, xs, k in ((axes[0], ev, 0), (axes[1], st, 1), (zoom, st, 1)):
            ax.step(xs, ys, where="post", color=color, ls=ls, lw=lw, alpha=0.85 if lw > 2 else 1.0,
                    label=f"{label} ({len(recs)} evals)" if ax is axes[0] else None, zorder=4 if lw < 3 else 2)
            ax.scatter([h[k] for h in hi], [h[2] for h in hi], s=16, color=color, alpha=0.45, zorder=3)
    base = next((r for r in rep["rows"] if r["id"] == "autoqra" and r.get("search")), None)
    if base is not None:  # the uniform-4-bit r8 point at search fidelity (AutoQRA's own baseline trial)
        u = [t["score"] for t in base["search"]["records"]
             if t["phase"] == "baseline" and t["ok"] and t["model_bytes"] == budget]
        if u:
            for ax in axes:
                ax.axhline(u[0], color="grey", ls="--", lw=1)
            axes[0].annotate("uniform 4-bit r8 (search fidelity)", (1, u[0]), xytext=(2, 4),
                             textcoords="offset points", fontsize=8, color="dimgrey")
    _zoom(zoom, finite)
    if finite:
        top = max(finite)
        lo = sorted(finite)[len(finite) // 10]  # ignore the worst decile (e.g. a 2-bit first point)
        pad = max(0.05 * (top - lo), 1e-3)
        axes[0].set_ylim(lo - pad, top + 2 * pad)
    axes[0].set_xlabel("evaluations (all fidelities, baselines included)")
    axes[1].set_xlabel("cumulative LoRA training steps (cost-aware)")
    axes[0].set_ylabel("best feasible high-fidelity score (−val. loss)")
    for ax in axes:
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(loc="lower right", fontsize=9)
    else:
        axes[0].text(0.5, 0.5, "no search row in this table", ha="center", transform=axes[0].transAxes)
    fig.suptitle(f"Search efficiency at B4 = {budget / 1e6:.2f} MB — {rep['model']} (preset {rep['preset']}); "
                 "dots: each feasible high-fidelity trial", fontsize=10)
    return fig


def _zoom(ax, finite: list[float]) -> None:
    """Inset y range: the best curve values (within 0.1 of the top) or hidden when there is nothing to show."""
    top = max(finite) if finite else math.nan
    near = [y for y in finite if y >= top - 0.1]
    if not near:
        ax.set_visible(False)
        return
    lo = min(near)
    pad = max(0.15 * (top - lo), 5e-3)
    ax.set_ylim(lo - pad, top + pad)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("zoom on the top (x = steps)", fontsize=7.5)


def write_curve(rep: dict[str, Any], path: str | Path) -> Path:
    """Write the search-efficiency PNG to ``path``."""
    path = Path(path)
    fig = curve_figure(rep)
    fig.savefig(path)
    return path
