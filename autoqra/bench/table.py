r"""Benchmark report text: generated findings, markdown table and JSON output (see :mod:`autoqra.bench.harness`;
the report itself is assembled in :mod:`autoqra.bench.report`)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from autoqra.bench.plot import curve, feasible_high, write_curve
from autoqra.result import _jsonable

__all__ = ["FORMAT", "curve", "feasible_high", "findings", "markdown", "write_outputs"]

FORMAT = "autoqra.bench/1"
MB = 1e6


# ------------------------------------------------------------------ findings
def _row(rows: list[dict], rid: str) -> dict | None:
    return next((r for r in rows if r["id"] == rid and r["loss_mean"] is not None), None)


def _vs(a: dict, b: dict) -> str:
    """'by X nats (exceeds / within the seed spread)' for a's loss vs b's."""
    d = abs(a["loss_mean"] - b["loss_mean"])
    if a["loss_sd"] is None or b["loss_sd"] is None:
        return f"by {d:.4f} nats (one seed: spread unknown)"
    spread = a["loss_sd"] + b["loss_sd"]
    word = "more than" if d > spread else "within"
    return f"by {d:.4f} nats ({word} the seed spread, sd {a['loss_sd']:.4f} + {b['loss_sd']:.4f})"


def _same(a: dict, b: dict) -> bool:
    return a["assignment"] == b["assignment"] and a["backend"] == b["backend"]


def findings(rep: dict[str, Any]) -> list[str]:
    """Sentences generated from the numbers (never hard-coded claims)."""
    rows = [r for r in rep["rows"] if r["loss_mean"] is not None]
    if not rows:
        return ["No row has a final score yet."]
    out = []
    best = min(rows, key=lambda r: r["loss_mean"])
    out.append(f"Lowest test loss overall: {best['label']} ({best['loss_mean']:.4f}, "
               f"{best['model_bytes_predicted'] / MB:.2f} MB model bytes).")
    names = {"4bit": "the uniform-4-bit budget", "mid": "the mid 3/4-bit budget"}
    for a in rows:  # the searches (and their search-seed repeats) against the best uniform row that fits
        if a["kind"] != "search" or (a.get("parent") and not a.get("repeat")):
            continue
        bid = a.get("budget", "4bit")
        B = rep["budgets"][bid]
        me = _short(a)
        unif = [r for r in rows if r["kind"] == "uniform" and r["model_bytes_predicted"] <= B]
        if not unif:
            out.append(f"No uniform row fits {names[bid]} ({B:,} bytes); {me} there: {a['loss_mean']:.4f}.")
            continue
        u = min(unif, key=lambda r: r["loss_mean"])
        head = f"At {names[bid]} ({B:,} bytes) the best uniform row that fits is {u['label']} ({u['loss_mean']:.4f})"
        if _same(a, u):
            out.append(f"{head}; {me} chose exactly that assignment (identical final training): mixed precision "
                       "found nothing better at this budget.")
        elif a["loss_mean"] < u["loss_mean"]:
            out.append(f"{head}; {me} ({a['loss_mean']:.4f}) beats it {_vs(a, u)}.")
        else:
            out.append(f"{head}; {me} ({a['loss_mean']:.4f}) is worse {_vs(a, u)}: mixed precision did not "
                       "beat uniform at this budget.")
        hqq = [r for r in unif if r["backend"] == "hqq"]
        if u["backend"] != "hqq" and hqq:
            h = min(hqq, key=lambda r: r["loss_mean"])
            rel = "better than" if a["loss_mean"] < h["loss_mean"] else ("equal to" if _same(a, h) else "worse than")
            out.append(f"({me} searched HQQ only; against the best HQQ uniform row, {h['label']} "
                       f"({h['loss_mean']:.4f}), it is {rel} it.)")
    for r in rows:  # ablations, random search and search-seed repeats against the search they derive from
        a = _row(rows, r["parent"]) if r.get("parent") else None
        if a is None:
            continue
        me = a["label"] if r.get("repeat") else _short(a)
        if _same(a, r):
            out.append(f"{r['label']} chose the same point as {me}.")
        else:
            rel = "better" if r["loss_mean"] < a["loss_mean"] else "worse"
            out.append(f"{r['label']} ({r['loss_mean']:.4f}) is {rel} than {me} ({a['loss_mean']:.4f}) {_vs(r, a)}.")
    ref, a = _row(rows, "lora16-r8"), _row(rows, "autoqra-anchored") or _row(rows, "autoqra")  # the default first
    if a is not None and ref is not None:
        me = _short(a)
        out.append(f"16-bit LoRA r8 reaches {ref['loss_mean']:.4f} at {ref['model_bytes_predicted'] / MB:.2f} MB; "
                   f"{me} reaches {a['loss_mean']:.4f} ({a['loss_mean'] - ref['loss_mean']:+.4f} nats) with "
                   f"{a['model_bytes_predicted'] / ref['model_bytes_predicted']:.0%} of its model bytes.")
    ovh = [(r["search"]["overhead_fraction"], r["label"]) for r in rep["rows"] if r["search"]
           and r["search"].get("overhead_fraction") is not None and math.isfinite(r["search"]["overhead_fraction"])]
    if ovh:
        worst = max(ovh)
        out.append(f"Optimizer overhead outside the evaluator: at most {worst[0]:.2%} ({worst[1]}); goal ≤ 2 %: "
                   f"{'met' if worst[0] <= 0.02 else 'NOT met'}.")
    out.extend(_seed_winners(rep))
    out.extend(_efficiency(rep))
    return out


def _short(row: dict) -> str:
    """A row's label without its budget suffix."""
    return row["label"].split(" (≤")[0]


def _seed_winners(rep: dict[str, Any]) -> list[str]:
    """Searches whose chosen point is their first Phase I candidate (the warm-start seed)."""
    won = []
    for r in rep["rows"]:
        recs = (r.get("search") or {}).get("records") or []
        first = next((t for t in recs if t["phase"] == "phase1"), None)
        feas = [t for t in recs if feasible_high(t, r["search"]["budget_bytes"])]
        if r["kind"] == "search" and first and feas and max(feas, key=lambda t: t["score"])["assignment"] == first["assignment"]:
            won.append(r["label"])
    if not won:
        return []
    return [f"The chosen point is the search's first Phase I candidate (its warm-start seed; no later trial scored "
            f"higher at search fidelity) for: {'; '.join(won)}."]


def _efficiency(rep: dict[str, Any]) -> list[str]:
    parts = []
    for rid in ("autoqra", "autoqra-anchored", "nsga2", "random"):
        r = next((x for x in rep["rows"] if x["id"] == rid and x["search"]), None)
        if r is None:
            continue
        ev, st, b = curve(r["search"]["records"], r["search"]["budget_bytes"])
        if not b or not math.isfinite(b[-1]):
            continue
        i = b.index(b[-1])
        parts.append(f"{r['label']} {b[-1]:.4f} after {ev[i]} evaluations / {st[i]} steps (of {ev[-1]} / {st[-1]})")
    return ["Best search-fidelity score reached: " + "; ".join(parts) + "."] if parts else []


# ------------------------------------------------------------------ markdown
def _compact(a: dict | None) -> str:
    if not a:
        return "–"
    b, r = Counter(a["bits"]), Counter(a["ranks"])
    if len(b) == 1 and len(r) == 1:
        return f"all b{a['bits'][0]} r{a['ranks'][0]}"
    return " ".join(f"b{k}×{v}" for k, v in sorted(b.items(), reverse=True)) + " · " + \
        " ".join(f"r{k}×{v}" for k, v in sorted(r.items(), reverse=True))


def _secs(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _mb(x: int | None) -> str:
    return "–" if x is None else f"{x / MB:.2f}"


def _notes(r: dict, rows: list[dict], labels: dict[str, str]) -> str:
    notes = []
    s = r["search"]
    uni = next((u for u in rows if u["kind"] == "uniform" and u is not r and _same(u, r)), None)
    if r["kind"] != "uniform" and uni:
        notes.append(f"= {uni['label']}")
    if r.get("carried"):
        notes.append("carried over")
    if r["shared_with"]:
        notes.append(f"final training shared with {labels.get(r['shared_with'], r['shared_with'])}")
    if s and s.get("stopped"):
        notes.append(s["stopped"])
    if r["kind"] != "uniform" and r["assignment"] is None:
        notes.append("no feasible point found")
    return "; ".join(notes)


def markdown(rep: dict[str, Any]) -> str:
    """The results table with a header and generated findings."""
    b = rep["budgets"]
    seeds = rep["seeds"]
    lines = [
        f"# AutoQRA vs baselines — preset `{rep['preset']}`{' (PARTIAL: still running or killed)' if rep['partial'] else ''}",
        "",
        f"* model: `{rep['model']}` (fingerprint {rep['model_fingerprint'][:12]}); data: embedded pydoc task "
        f"(train {rep['data']['train_blocks']} / validation {rep['data']['validation_blocks']} / test "
        f"{rep['data']['test_blocks']} blocks of {rep['train']['seq_len']} tokens)",
        f"* budgets (model bytes): **B4 = {b['4bit']:,}** (uniform 4-bit HQQ r8), **Bmid = {b['mid']:,}** "
        "(half-way between uniform 3-bit and 4-bit HQQ r8)",
        f"* searches: preset `{rep['search_preset']}`{' + ' + str(rep['search_options']) if rep['search_options'] else ''}, bits {rep['bits']}, ranks "
        f"{rep['ranks']}, seed {rep['search_seed']} unless a row says otherwise, validation split; all searches share one "
        "trial store (common trials, e.g. baselines and an ablation's shared prefix, are read back); the ablations' "
        "*no surrogate* and *plain NSGA-II* get `max_trials` = the ablated search's number of evaluations; random "
        "search gets the default (anchored) AutoQRA search's number of Phase I+II high-fidelity evaluations",
        f"* final training (every row the same): {rep['final_steps']} LoRA steps, batch {rep['train']['batch_size']}×"
        f"{rep['train']['seq_len']}, lr {rep['train']['lr']}, then mean token loss on "
        f"{rep['final_eval_blocks'] or 'all'} **test** blocks; seeds {seeds}"
        f"{' (one seed only: no spread)' if len(seeds) < 2 else ''}; ± = sample sd over seeds",
        f"* wall time of this invocation {_secs(rep['wall_seconds'])}; compute in its trial stores + priors "
        f"{_secs(rep['compute_seconds'])}; evaluations run now {rep['n_run']}; torch threads "
        f"{rep['torch_threads'] or 'default'}; finished {rep['finished']}",
        *([f"* rows noted *carried over* come from `{c['from']}` as finished {c['finished']} (same recipe, checked; "
           f"not re-run now); compute in other work folders (earlier invocations) {_secs(c['compute_seconds'])}; "
           f"all compute behind this table {_secs(sum(rep['compute_by_work'].values()))}"]
          if (c := rep.get("carried")) else []),
        "",
        "| configuration | bits · ranks (units) | test loss ↓ | model MB pred / meas | train MB pred / meas | fits "
        "| evals low / high / final | search wall | overhead | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {r["id"]: r["label"] for r in rep["rows"]}
    for r in rep["rows"]:
        s = r["search"]
        loss = "–" if r["loss_mean"] is None else f"{r['loss_mean']:.4f}" + (
            f" ± {r['loss_sd']:.4f}" if r["loss_sd"] is not None else "") + f" (n={r['n_seeds']})"
        ev = s["evals"] if s else {}
        evs = f"{ev.get('low', 0)} / {ev.get('high', 0)} / {len(r['finals'])}" if s else f"– / – / {len(r['finals'])}"
        fits = ", ".join("B4" if f == "4bit" else "Bmid" for f in r["fits"]) or "none"
        ovh = s["overhead_fraction"] if s else None
        ovh_s = "–" if ovh is None or not math.isfinite(ovh) else f"{ovh:.2%}"
        lines.append(
            f"| {r['label']} | {_compact(r['assignment'])} | {loss} | {_mb(r['model_bytes_predicted'])} / "
            f"{_mb(r['model_bytes_measured'])} | {_mb(r['train_bytes_predicted'])} / {_mb(r['train_bytes_measured'])} "
            f"| {fits} | {evs} | {_secs(s['search_seconds']) if s else '–'} | {ovh_s} | {_notes(r, rep['rows'], labels)} |")
    lines += [
        "",
        "Evals: every evaluation a search used, its uniform/16-bit baselines included (read back from the shared "
        "store or run). Search wall = importance priors + Σ evaluation seconds of the search's trials (as stored when first run) + "
        "the optimizer's own time outside the evaluator in this invocation; overhead = the last over the total. "
        "Measured train MB = live model + AdamW state + the storage peak of one training step (CPU).",
        "",
        "## Findings",
        "",
        *[f"* {f}" for f in rep["findings"]],
        "",
    ]
    return "\n".join(lines)


def write_outputs(rep: dict[str, Any], out: str | Path, name: str, plot: bool = True) -> dict[str, Path]:
    """Write ``<out>/<name>.md``, ``.json`` and (``plot``) the search-efficiency ``.png``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{name}.md", "json": out / f"{name}.json"}
    for key, text in (("md", markdown(rep)), ("json", json.dumps(_jsonable(rep), indent=1, allow_nan=False))):
        tmp = paths[key].with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(paths[key])
    if plot:
        paths["png"] = write_curve(rep, out / f"{name}.png")
    return paths
