r"""Figures of :mod:`autoqra.report.html`: score/memory scatter and search progress (the per-unit heatmap is
in :mod:`autoqra.report.layers`), plus the label helpers they share.

Every function builds a standalone :class:`matplotlib.figure.Figure` (Agg canvas, no pyplot
state) and never raises on a sparse result: missing pieces are skipped or noted on the figure.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.transforms import blended_transform_factory

PHASE_COLORS = {"baseline": "#555555", "phase1": "#1f77b4", "phase2": "#e8710a"}
MB = 1e6


def new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(min(w, 11.0), h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def phase_label(phase: str, config: dict[str, Any]) -> str:
    if phase == "baseline":
        return "uniform baselines"
    if phase in ("phase1", "phase2"):
        algo = config.get(phase)
        roman = "I" if phase == "phase1" else "II"
        return f"Phase {roman} ({algo})" if algo else f"Phase {roman}"
    return phase


def score_meaning(result) -> str:
    ev = result.config.get("evaluator") or "finetune"
    return "−held-out loss" if ev == "finetune" else f"the {ev} evaluator's metric"


def score_label(result) -> str:
    return f"score ({score_meaning(result)}, higher is better)"


def fmt_mb(v: float) -> str:
    """MB with precision matching the magnitude (tiny test models are well under 1 MB)."""
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def mean_bits(result, t) -> float:
    """Weight-weighted mean bit-width of a trial (NaN when the space does not fit the assignment)."""
    try:
        return t.assignment.mean_bits(result.space)
    except (ValueError, ZeroDivisionError, FloatingPointError):
        return math.nan


def is_16bit(t) -> bool:
    return bool(t.assignment.bits) and all(b >= 16 for b in t.assignment.bits)


def target_mb(result, t) -> float:
    return t.memory.bytes_for(result.target) / MB


def trial_labels(result) -> dict[str, str]:
    """``{key: label}``: baseline names, else ``"<phase> #<trial number>"`` (1-based history order)."""
    labels = {t.key: f"{t.phase} #{i}" for i, t in enumerate(result.history, 1)}
    labels.update({t.key: name for name, t in result.baselines.items()})
    return labels


def _focus(values: Sequence[float], drop_low: bool) -> tuple[float, float]:
    """Range of ``values`` without isolated outliers on one side (a gap > half the remaining spread)."""
    v = sorted(values) if drop_low else sorted(values, reverse=True)
    drop, limit = 0, max(1, len(v) // 5)
    while drop < limit and len(v) - drop >= 3:
        gap, rest = abs(v[drop + 1] - v[drop]), abs(v[-1] - v[drop + 1])
        if gap <= 0.5 * max(rest, 1e-12):
            break
        drop += 1
    kept = v[drop:]
    return min(kept), max(kept)


def _place_labels(fig: Figure, ax, items: list[tuple[float, float, str, dict]], pts: np.ndarray) -> None:
    """Annotate ``(x, y, text, style)`` items, greedily picking offsets that avoid other labels and points.

    ``pts`` rows are ``(x, y, radius in pixels)`` of the drawn markers.
    """
    r = fig.canvas.get_renderer()
    axbb = ax.get_window_extent(r)
    taken: list[Any] = []
    pix = ax.transData.transform(pts[:, :2]) if len(pts) else np.zeros((0, 2))
    rad = pts[:, 2] if len(pts) else np.zeros(0)
    offsets = ((12, 14), (30, 36), (16, 64), (60, 10), (30, 96), (90, 50), (20, 130))
    cands = [(sx * dx, sy * dy) for dx, dy in offsets for sy in (1, -1) for sx in (1, -1)]
    for x, y, text, style in items:
        best, best_cost = None, math.inf
        for dx, dy in cands:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                              ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top",
                              annotation_clip=False,
                              bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "0.6", "alpha": 0.92},
                              arrowprops={"arrowstyle": "-", "color": "0.35", "lw": 0.8}, zorder=6, **style)
            ann.get_window_extent(r)  # places the text; the box below excludes the arrow
            bb = Text.get_window_extent(ann, r).expanded(1.06, 1.2)
            cost = 100.0 * sum(bb.overlaps(t) for t in taken)
            covered = ((pix[:, 0] > bb.x0 - rad) & (pix[:, 0] < bb.x1 + rad)
                       & (pix[:, 1] > bb.y0 - rad) & (pix[:, 1] < bb.y1 + rad))
            cost += 3.0 * int(covered.sum())
            inside = bb.x0 >= axbb.x0 and bb.x1 <= axbb.x1 and bb.y0 >= axbb.y0 and bb.y1 <= axbb.y1
            cost += 0 if inside else 1000
            anchor = ax.transData.transform((x, y))
            centre = np.array([bb.x0 + bb.x1, bb.y0 + bb.y1]) / 2
            seg = anchor + np.linspace(0.25, 0.9, 6)[:, None] * (centre - anchor)  # along the leader line
            far = np.hypot(*(pix - anchor).T) > 3
            near = np.hypot(pix[None, :, 0] - seg[:, None, 0], pix[None, :, 1] - seg[:, None, 1]) < rad + 2
            cost += 3.0 * int((near.any(0) & far).sum()) + 0.01 * (abs(dx) + abs(dy))
            if cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (ann, bb), cost
            else:
                ann.remove()
        if best is not None:
            taken.append(best[1])


def pareto_figure(result) -> Figure:
    """Score vs memory of every trial, the front, budget, baselines and the chosen point."""
    fig = new_figure(10.5, 5.6)
    ax = fig.add_axes((0.08, 0.11, 0.62, 0.8))
    labels = trial_labels(result)
    hist = list(result.history)
    ok = [t for t in hist if t.result.ok]
    failed = [t for t in hist if not t.result.ok]
    budget = result.budget_bytes / MB
    ax.set_xlabel(f"{result.target} memory (MB, predicted; lower is better)")
    ax.set_ylabel(score_label(result))
    ax.set_title(f"Every trial: score vs {result.target} memory", fontsize=11, pad=16)
    ax.grid(alpha=0.3)
    if not ok:
        ax.text(0.5, 0.5, "no successful trial to plot", ha="center", transform=ax.transAxes)
    xs = [target_mb(result, t) for t in ok]
    ys = [t.score for t in ok]
    x_lo, x_hi = _focus(xs + [budget], drop_low=False) if ok else (0.0, budget)
    x_hi = max(x_hi, budget)
    span = max(x_hi - x_lo, 1e-3 * max(x_hi, 1e-9))
    x_lo, x_hi = x_lo - 0.06 * span, x_hi + 0.1 * span
    y_lo, y_hi = _focus(ys, drop_low=True) if ok else (-1.0, 0.0)
    yspan = max(y_hi - y_lo, 1e-3)
    y_lo, y_hi = y_lo - 0.12 * yspan, y_hi + 0.15 * yspan
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    fig_steps = {t.fidelity.name: t.fidelity.steps for t in hist}
    notes: list[tuple[float, float, str, dict]] = []
    off: list[str] = []
    placed = []
    for t, x, y in zip(ok, xs, ys):
        c = PHASE_COLORS.get(t.phase, "#2ca02c")
        low = t.fidelity.name == "low"
        px, py, mk = x, y, ("o" if low else "s")
        if x > x_hi or y < y_lo:
            px, py = min(x, x_hi), max(y, y_lo)
            mk = ">" if x > x_hi else "v"
            arrow = "▶" if x > x_hi else "▼"
            notes.append((px, py, f"{labels[t.key].split(' (')[0]} {arrow}", {"color": c}))
            off.append(f"{arrow} {labels[t.key]}: {fmt_mb(x)} MB, score {y:.3f}")
        ax.scatter([px], [py], s=42 if not low else 36, marker=mk, facecolors="none" if low else c,
                   edgecolors=c, linewidths=1.3, zorder=3, clip_on=False)
        placed.append((px, py, 5))
    for t in failed:
        x = max(min(target_mb(result, t), x_hi), x_lo)
        ax.scatter([x], [y_lo + 0.02 * yspan], marker="x", color="#d62728", s=40, zorder=3)
        placed.append((x, y_lo, 5))
    front = sorted(result.pareto, key=lambda t: target_mb(result, t))
    if front:
        fx = [target_mb(result, t) for t in front]
        fy = [t.score for t in front]
        if budget > fx[-1]:  # the front's best score holds up to the budget
            fx, fy = fx + [budget], fy + [fy[-1]]
        ax.step(fx, fy, where="post", color="#2ca02c", lw=1.8, alpha=0.8, zorder=2)
    ax.axvline(budget, color="#d62728", ls="--", lw=1.3, zorder=1)
    ax.text(budget, 1.01, f"budget {fmt_mb(budget)} MB", color="#d62728", fontsize=8, ha="center",
            va="bottom", transform=blended_transform_factory(ax.transData, ax.transAxes))
    items = []
    best = result.best
    if best is not None and best.result.ok:
        bx, by = min(target_mb(result, best), x_hi), max(best.score, y_lo)
        ax.scatter([bx], [by], marker="*", s=340, color="gold", edgecolors="black", linewidths=1.0, zorder=5)
        placed.append((bx, by, 14))
        name = labels.get(best.key, best.phase)
        items.append((bx, by, f"CHOSEN: {name}\nscore {best.score:.3f}, {fmt_mb(target_mb(result, best))} MB",
                      {"fontweight": "bold"}))
    for name, t in result.baselines.items():
        if t.result.ok and (best is None or t.key != best.key) and not any(name in o for o in off):
            items.append((target_mb(result, t), t.score, name, {"color": PHASE_COLORS["baseline"]}))
    ukey = result.info.get("best_utility_key")
    if ukey and best is not None and ukey != best.key:
        for t in ok:
            if t.key == ukey and t.fidelity.name != "low":
                alpha = result.config.get("alpha", "")
                items.append((target_mb(result, t), t.score, f"best utility (α={alpha})\n{labels[t.key]}",
                              {"color": PHASE_COLORS.get(t.phase, "k")}))
                break
    fig.canvas.draw()
    _place_labels(fig, ax, items + notes, np.array(placed, dtype=float).reshape(-1, 3))
    handles: list[Any] = [Patch(color=PHASE_COLORS.get(p, "#2ca02c"), label=phase_label(p, result.config))
                          for p in dict.fromkeys(t.phase for t in hist)]
    for fname, mk, face in (("low", "o", "none"), ("high", "s", "0.4")):
        if fname in fig_steps:
            handles.append(Line2D([], [], ls="", marker=mk, mfc=face, mec="0.4",
                                  label=f"{fname} fidelity ({fig_steps[fname]} training steps)"))
    handles.append(Line2D([], [], color="#2ca02c", lw=1.8, label="Pareto front (feasible, high fid.)"))
    handles.append(Line2D([], [], color="#d62728", ls="--", label="memory budget"))
    handles.append(Line2D([], [], ls="", marker="*", ms=14, mfc="gold", mec="black", label="chosen point"))
    if failed:
        handles.append(Line2D([], [], ls="", marker="x", color="#d62728",
                              label=f"failed trials ({len(failed)}), drawn at the bottom"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.72, 0.91), fontsize=8.5, frameon=False)
    if off:
        wrapped = [textwrap.fill(o, 50, subsequent_indent="    ") for o in off]
        fig.text(0.728, 0.12, "Off-scale, drawn at the plot edge:\n" + "\n".join(wrapped), fontsize=8,
                 va="bottom", ha="left", color="0.25", linespacing=1.4)
    return fig


def _zoom_on_gain(ax, best: np.ndarray, phases: list[str]) -> None:
    """When the search improved on the best baseline, zoom the score axis onto that gain (a 2-bit
    baseline far below would otherwise flatten it) and say that lower points are clipped."""
    base = [i for i, p in enumerate(phases) if p == "baseline"]
    if not base or len(best) == 0:
        return
    b0, fin = best[base[-1]], best[-1]
    if not (np.isfinite(b0) and np.isfinite(fin) and fin > b0 and np.nanmin(best[np.isfinite(best)]) < b0):
        return
    span = fin - b0
    ax.set_ylim(b0 - 1.5 * span, fin + 0.6 * span)
    ax.text(0.01, 0.96, f"zoomed on the gain over the best baseline ({b0:.4g}); earlier, lower points are off-axis",
            transform=ax.transAxes, ha="left", va="top", fontsize=7.5, color="0.3")


def progress_figure(result, series) -> Figure:
    """Best feasible score and hypervolume vs trial number and vs cumulative evaluation time."""
    fig = new_figure(10.5, 5.6)
    axes = fig.subplots(2, 2, sharey="row")
    n = len(series.trials)
    secs = np.asarray(series.seconds, dtype=float)
    minutes = n > 0 and secs[-1] > 300
    tx = secs / 60 if minutes else secs
    phases = list(series.phase)
    xs = ((np.asarray(series.trials, dtype=float), "trials evaluated (every fidelity)"),
          (tx, f"cumulative evaluation time ({'min' if minutes else 's'})"))
    ys = ((series.best, "best feasible\nhigh-fidelity score"),
          (np.asarray(series.hypervolume) / MB, "hypervolume\n(score × MB)"))
    for col, (x, xlabel) in enumerate(xs):
        for row, (y, ylabel) in enumerate(ys):
            ax = axes[row, col]
            ax.grid(alpha=0.3)
            if n == 0:
                ax.text(0.5, 0.5, "no trials", ha="center", transform=ax.transAxes)
                continue
            start = 0
            for i in range(1, n + 1):
                if i == n or phases[i] != phases[start]:
                    lo = (x[start - 1] if start else 0.0) if col else start + 0.5
                    ax.axvspan(lo, x[i - 1] if col else i + 0.5, color=PHASE_COLORS.get(phases[start], "0.5"),
                               alpha=0.09, lw=0)
                    start = i
            ax.step(x, y, where="post", color="black", lw=1.5)
            ax.plot(x, y, ".", color="black", ms=3)
            if col == 0 and np.isfinite(y[-1]):
                ax.text(0.99, 0.04, f"final: {y[-1]:.4g}", transform=ax.transAxes, ha="right", va="bottom",
                        fontsize=8.5, bbox={"fc": "white", "ec": "0.7", "boxstyle": "round,pad=0.25"})
            if row == 1:
                ax.set_xlabel(xlabel)
            if col == 0:
                ax.set_ylabel(ylabel)
    _zoom_on_gain(axes[0, 0], np.asarray(series.best, dtype=float), phases)
    shades = [Patch(alpha=0.3, color=PHASE_COLORS.get(p, "0.5"), label=phase_label(p, result.config))
              for p in dict.fromkeys(phases)]
    if shades:
        fig.legend(handles=shades, loc="upper right", ncol=len(shades), fontsize=8.5, frameon=False)
    fig.suptitle("Search progress of within-budget, fully trained (high-fidelity) trials", fontsize=10.5,
                 x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.965))
    return fig
