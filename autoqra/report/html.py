r"""A self-contained HTML report of a search :class:`~autoqra.result.Result`.

:func:`write_report` writes into one directory:

* ``pareto.png`` — score vs memory of every trial (phase = colour, fidelity = marker), the
  Pareto front, the budget, the uniform baselines and the chosen point;
* ``layers.png`` — the chosen point's per-unit bits and ranks beside the importance priors;
* ``progress.png`` — best feasible score and hypervolume vs trials and vs evaluation time;
* ``report.html`` — a summary, the three images (embedded as base64) and tables of the front
  and of the chosen assignment. No external file, stylesheet or script is referenced.

:func:`progress_series` exposes the numbers behind ``progress.png``.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import numpy as np

from autoqra.pareto import front_hypervolume
from autoqra.report import plots
from autoqra.report.layers import layers_figure
from autoqra.trial import Trial

if TYPE_CHECKING:
    from autoqra.result import Result

MB = 1e6


@attrs.frozen
class ProgressSeries:
    """Search progress after each trial of ``Result.history`` (evaluation order).

    Attributes:
        trials: 1..N.
        seconds: cumulative evaluation seconds (sum of ``EvalResult.seconds``).
        best: best score among ok, high-fidelity, within-budget trials so far (NaN before the first).
        hypervolume: 2-D hypervolume (score × bytes) of those trials so far.
        phase: phase of each trial.
        ref_score / ref_mem: hypervolume reference (worst high-fidelity score − 1e-3, budget × 1.0001).
    """

    trials: np.ndarray
    seconds: np.ndarray
    best: np.ndarray
    hypervolume: np.ndarray
    phase: tuple[str, ...]
    ref_score: float
    ref_mem: float


def _is_high(result: Result, t: Trial) -> bool:
    names = {h.fidelity.name for h in result.history}
    if "high" in names:
        return t.fidelity.name == "high"
    return t.fidelity.steps == max((h.fidelity.steps for h in result.history), default=0)


def _mem(result: Result, t: Trial) -> int:
    return t.memory.bytes_for(result.target)


def progress_series(result: Result) -> ProgressSeries:
    """Best feasible high-fidelity score and hypervolume after each trial (both non-decreasing)."""
    hist = list(result.history)
    high_ok = [t.score for t in hist if t.result.ok and _is_high(result, t)]
    ref_s = min(high_ok) - 1e-3 if high_ok else math.nan
    ref_m = result.budget_bytes * 1.0001
    best, hv, secs = [], [], []
    fs: list[float] = []
    fm: list[float] = []
    total, cur = 0.0, -math.inf
    for t in hist:
        total += max(float(t.result.seconds or 0.0), 0.0)
        if t.result.ok and _is_high(result, t) and _mem(result, t) <= result.budget_bytes:
            fs.append(t.score)
            fm.append(float(_mem(result, t)))
            cur = max(cur, t.score)
        secs.append(total)
        best.append(cur if math.isfinite(cur) else math.nan)
        hv.append(front_hypervolume(fs, fm, result.budget_bytes, ref_s))
    n = len(hist)
    return ProgressSeries(np.arange(1, n + 1), np.array(secs, dtype=float), np.array(best, dtype=float),
                          np.array(hv, dtype=float), tuple(t.phase for t in hist), ref_s, ref_m)


def _png(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    data = buf.getvalue()
    path.write_bytes(data)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _e(x: object) -> str:
    return html.escape(str(x))


def _mb(b: float | int | None) -> str:
    return "–" if b is None else f"{b / MB:,.2f}"


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    cls = [f" class={c}" if c else "" for c in classes or [""] * len(rows)]
    body = "".join(f"<tr{c}>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r, c in zip(rows, cls))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary(result: Result, labels: dict[str, str]) -> list[str]:
    budget, best, hist = result.budget_bytes, result.best, result.history
    what = "static model bytes (weights + quant metadata + unquantized tensors + LoRA)"
    if result.target != "model":
        what = "training bytes (model + LoRA gradients + optimizer state + activations)"
    out = [f"Budget: {_mb(budget)} MB of {what}" + (f", from budget = {result.config['budget']!r}."
                                                     if result.config.get("budget") else ".")]
    if best is None:
        out.append("No feasible point was found: nothing evaluated successfully within the budget.")
    else:
        out.append(f"Chosen point: {labels.get(best.key, best.phase)} — score {best.score:.4f} at "
                   f"{_mb(_mem(result, best))} MB (mean {plots.mean_bits(result, best):.2f} bits).")
    ok_base = [(n, t) for n, t in result.baselines.items() if t.result.ok]
    inb = [(n, t) for n, t in ok_base if _mem(result, t) <= budget and not plots.is_16bit(t)]
    if inb:
        n, t = max(inb, key=lambda nt: nt[1].score)
        if best is not None and t.key == best.key:
            out.append(f"The chosen point is the best uniform baseline within the budget ({n}): "
                       "the search found no mixed assignment that beat it.")
        elif best is not None:
            out.append(f"Best uniform baseline within budget: {n}, score {t.score:.4f} at "
                       f"{_mb(_mem(result, t))} MB; the chosen point is {best.score - t.score:+.4f} better.")
        else:
            out.append(f"Best uniform baseline within budget: {n}, score {t.score:.4f}.")
    for n, t in ok_base:
        if plots.is_16bit(t):
            rel = "" if best is None or not _mem(result, t) else (
                f"; the chosen point needs {100 * _mem(result, best) / _mem(result, t):.0f}% of its memory "
                f"and scores {abs(best.score - t.score):.4f} {'higher' if best.score > t.score else 'lower'}")
            out.append(f"16-bit reference {n}: score {t.score:.4f} at {_mb(_mem(result, t))} MB{rel}.")
    ukey = result.info.get("best_utility_key")
    if best is not None and ukey and ukey != best.key:
        for t in [h for h in hist if h.key == ukey and h.result.ok][-1:]:
            out.append(f"Best score/memory trade-off by utility (alpha={result.config.get('alpha', '?')}): "
                       f"{labels.get(t.key, t.phase)} — score {t.score:.4f} at {_mb(_mem(result, t))} MB "
                       f"(mean {plots.mean_bits(result, t):.2f} bits)"
                       + ("; the chosen point is the best score within the budget." if
                          result.config.get("choose_alpha", 1.0) == 1.0 else "."))
    cnt = Counter((t.phase, t.fidelity.name or str(t.fidelity.steps)) for t in hist)
    parts = [f"{p} {f}: {c}" for (p, f), c in cnt.items()]
    n_fail = sum(not t.result.ok for t in hist)
    out.append(f"Trials: {len(hist)} ({', '.join(parts) or 'none'}); failed: {n_fail}.")
    info = result.info
    ev = sum(max(float(t.result.seconds or 0), 0.0) for t in hist)
    wall = info.get("wall_seconds")
    out.append(f"Time: {ev:,.0f} s of evaluation in total (sum over trials)"
               + (f"; this run's wall time {wall:,.1f} s" if isinstance(wall, (int, float)) else "")
               + (f" ({info['n_run']} trials run now, the rest read from the trial store)"
                  if isinstance(info.get("n_run"), int) and info["n_run"] < len(hist) else "") + ".")
    stops = info.get("stop_reasons") or {}
    if stops:
        out.append("Stopped: " + "; ".join(f"{k}: {v}" for k, v in stops.items())
                   + (f" (run stopped early: {info['stopped']})" if info.get("stopped") else "") + ".")
    return out


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;
margin:1.5em auto;padding:0 1em;color:#222}h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
img{max-width:100%;border:1px solid #ddd}figcaption{color:#555;font-size:.9em;margin:.3em 0 1em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.chosen{background:#fff6cc;font-weight:bold}
code{font-size:.85em;word-break:break-word}"""


def _final_rung(result: Result) -> str:
    """The final rung's table (entrants, validation score after the final recipe, top-rung score), or ''."""
    fr = result.info.get("final_rung") or []
    if not fr:
        return ""
    chosen = result.best.assignment.to_dict() if result.best is not None else None
    order = sorted(fr, key=lambda e: -(e["val_score"] if e["val_score"] is not None else -math.inf))
    rows = [[e["label"], "uniform baseline" if e["uniform"] else "search candidate",
             f"{e['val_score']:.4f}" if e["val_score"] is not None else "failed",
             " / ".join(f"{v:.4f}" for v in e["val_scores"] if v is not None), f"{e['top_rung_score']:.4f}"]
            for e in order]
    cls = ["chosen" if e["assignment"] == chosen else "" for e in order]
    steps = result.config.get("final_steps") or "final_steps"
    return (f"<h2>Final rung ({len(fr)} entrants, trained with the final recipe: {_e(steps)} steps)</h2>"
            "<p>The answer is the entrant with the best mean validation score after exactly the training "
            "<code>Result.train()</code> runs; the fitting uniform baselines are entrants too.</p>"
            + _table(["entrant", "kind", "validation score (mean)", "per training seed", "top-rung score"], rows, cls))


def write_report(result: Result, out_dir: str | Path, *, title: str | None = None) -> Path:
    """Write ``pareto.png``, ``layers.png``, ``progress.png`` and ``report.html`` into ``out_dir``.

    Args:
        result: a search result (from :func:`autoqra.optimize` or :func:`autoqra.load_result`).
        out_dir: directory, created if needed; existing report files are overwritten.
        title: page title (default: ``"autoqra report"`` and the budget).

    Returns:
        Path of ``report.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = plots.trial_labels(result)
    series = progress_series(result)
    title = title or f"autoqra report — {_mb(result.budget_bytes)} MB {result.target} budget"
    imgs = {
        "pareto": (_png(plots.pareto_figure(result), out / "pareto.png"),
                   "Every evaluated candidate: score against memory. The green steps are the Pareto front "
                   "(best score reachable at each memory); candidates right of the dashed line break the "
                   "budget."),
        "layers": (_png(layers_figure(result), out / "layers.png"),
                   "Per-unit bits and LoRA ranks of the chosen point (and of the best-utility trade-off when "
                   "it differs), next to the importance priors measured before the search (I_q: damage from "
                   "quantizing the unit; I_r: how much an adapter there helps)."),
        "progress": (_png(plots.progress_figure(result, series), out / "progress.png"),
                     "How the search improved: best within-budget fully trained score and front hypervolume, "
                     "per trial and per second of evaluation (shading = phase)."),
    }
    best = result.best
    front = sorted(result.pareto, key=lambda t: _mem(result, t))
    rows, cls = [], []
    for t in front:
        m = t.memory
        meas = t.result.memory.get("model_bytes") if t.result.memory else None
        rows.append([labels.get(t.key, t.phase), t.phase, f"{t.score:.4f}",
                     f"{plots.mean_bits(result, t):.2f}", _mb(m.model_bytes), _mb(m.lora_bytes),
                     _mb(m.lora_grad_bytes), _mb(m.optimizer_bytes), _mb(m.activation_bytes),
                     _mb(m.train_bytes), _mb(meas)])
        cls.append("chosen" if best is not None and t.key == best.key else "")
    header = ["trial", "phase", "score", "mean bits", "model MB", "LoRA MB", "grad MB", "optimizer MB",
              "activation MB", "train MB", "measured model MB"]
    front_html = (_table(header, rows, cls) if rows
                  else "<p>The Pareto front is empty (no feasible high-fidelity trial).</p>")
    if best is not None:
        imp = result.info.get("importance") or {}
        n = len(best.assignment.units)

        def col(k: str) -> list[str]:
            v = imp.get(k)
            if not v or len(v) != n:
                return ["–"] * n
            return [f"{x:.3f}" if isinstance(x, (int, float)) else "–" for x in v]

        urows = [[u, b, r, q, ri] for u, b, r, q, ri in zip(best.assignment.units, best.assignment.bits,
                                                            best.assignment.ranks, col("q"), col("r"))]
        assign_html = (f"<p>Compact form: <code>{_e(best.assignment.short())}</code></p>"
                       + _table(["unit", "bits", "LoRA rank", "I_q", "I_r"], urows))
    else:
        assign_html = "<p>No chosen point.</p>"
    figs = "".join(f'<figure><img alt="{k}" src="{src}"><figcaption>{_e(cap)}</figcaption></figure>'
                   for k, (src, cap) in imgs.items())
    final_html = _final_rung(result)
    summary = "".join(f"<li>{_e(s)}</li>" for s in _summary(result, labels))
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"
            f"<p>Score = {_e(plots.score_meaning(result))} (higher is better). Memory figures are the "
            "memory model's exact prediction (1 MB = 10<sup>6</sup> bytes); the last front column is "
            f"measured on the live model.</p><h2>Summary</h2><ul>{summary}</ul><h2>Figures</h2>{figs}"
            f"{final_html}<h2>Pareto front ({len(front)} trials, by memory)</h2>{front_html}"
            f"<h2>Chosen per-unit assignment</h2>{assign_html}</body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
