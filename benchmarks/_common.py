"""What the SmolLM2 benchmarks share: a resumable JSON cache, the model in the precision's dtype, the compare
harness's budgets and the library's final recipe (``TrainSpec``, ``final_steps``, test loss on 64 test blocks)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

import autoqra
from autoqra.config import PRESETS, OptimizeConfig
from autoqra.evaluators.finetune import FinetuneEvaluator, heldout_metrics
from autoqra.precision import compute_dtype, cpu_name, resolve_precision
from autoqra.preparation import prepare
from autoqra.quant_backends.hqq import DEFAULT_GROUP_SIZE
from autoqra.space import Assignment

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
FINAL_SEEDS = (0, 1)
FINAL_TEST_BLOCKS = 64

__all__ = ["EMBEDDING_UNITS", "FINALS", "FINAL_SEEDS", "FINAL_TEST_BLOCKS", "RESULTS", "ROOT", "SEARCHES", "Cache",
           "budgets", "chooses_formats", "chosen_options", "cpu_name", "demo_search", "final_key", "final_scores", "load", "search_key"]


class Cache:
    """A JSON file of finished measurements, rewritten (atomically) after each one; committed, so a benchmark
    resumes across sessions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


def load():
    """SmolLM2 and its tokenizer in the dtype ``precision="auto"`` trains in on this CPU (as ``make demo``)."""
    return autoqra.models.load_default(dtype=compute_dtype(resolve_precision("auto", torch.device("cpu"))))


def budgets(model, tok) -> dict[str, int]:
    """The compare harness's budgets: B4 = uniform 4-bit HQQ r8 model bytes; Bmid = half-way to uniform 3-bit r8."""
    su = prepare(model, OptimizeConfig(preset="demo", embeddings="keep"), tokenizer=tok)
    b4 = su.memory.predict(su.space.uniform(4, 8)).model_bytes
    b3 = su.memory.predict(su.space.uniform(3, 8)).model_bytes
    return {"B4": int(b4), "Bmid": int((b3 + b4) // 2)}


#: SmolLM2's embedding / head unit (tied): at 16 bits it is the same model as a space without it
EMBEDDING_UNITS = ("model.embed_tokens", "lm_head")
FINALS = RESULTS / "finals.cache.json"
SEARCHES = RESULTS / "searches.cache.json"


def options_tag(backend_options: dict | None) -> str:
    """``bo-<digest>`` of non-default backend options ('' for the default backend): keys of runs on another
    quantization format must not collide with the default's."""
    if not backend_options:
        return ""
    return "bo-" + hashlib.sha256(json.dumps(backend_options, sort_keys=True, default=str).encode()).hexdigest()[:8]


def final_key(a: Assignment, seed: int, steps: int = 60, backend_options: dict | None = None) -> str:
    """Cache key of one final training: the assignment without 16-bit embedding / head units (the same model
    with ``embeddings="keep"``), the training seed, the steps when not 60; with backend options, the steps and
    their :func:`options_tag` always (such keys are not :func:`parse_final_key`'s: pooled studies skip them)."""
    keep = [i for i, (u, b) in enumerate(zip(a.units, a.bits)) if not (u in EMBEDDING_UNITS and b == 16)]
    c = Assignment([a.units[i] for i in keep], [a.bits[i] for i in keep], [a.ranks[i] for i in keep])
    if backend_options:
        return f"final:{c.to_json()}:{seed}:{steps}:{options_tag(backend_options)}"
    return f"final:{c.to_json()}:{seed}" + ("" if steps == 60 else f":{steps}")


def parse_final_key(key: str) -> tuple[Assignment, int, int] | None:
    """``(assignment, seed, steps)`` of a :func:`final_key` of the default backend (None: not a final-training
    key, or one on other backend options)."""
    if not key.startswith("final:"):
        return None
    body, _, tail = key[len("final:"):].rpartition("}")
    parts = tail.lstrip(":").split(":")
    if len(parts) > 2:
        return None
    steps = int(parts[1]) if len(parts) > 1 else 60
    return Assignment.from_json(body + "}"), int(parts[0]), steps


def final_scores(model, tok, cfg: OptimizeConfig, a: Assignment, seed: int, cache: Cache | None = None) -> dict:
    """The library's final recipe (``cfg.train``, ``final_steps``, its schedule) with training seed ``seed``:
    test loss on 64 test blocks and loss on the whole validation split; cached by (assignment, seed, steps) in
    the benchmarks' shared ``results/finals.cache.json`` (``cache``: another file, for a study of its own)."""
    steps = cfg.resolved("final_steps")
    key = final_key(a, seed, steps, cfg.backend_options)
    cache = cache if cache is not None else Cache(FINALS)
    if cache.get(key) is not None:
        return cache.get(key)
    su = prepare(model, cfg, tokenizer=tok)
    if list(a.units) != list(su.space.unit_names):  # a space without the embedding unit: add it at 16 bits
        stray = [u for u in a.units if u not in su.space.unit_names]
        if stray:
            raise ValueError(f"units {stray[:3]} are not in the {cfg.granularity!r} space of cfg: pass the config "
                             "the assignment was searched with")
        bits = dict(zip(a.units, a.bits))
        ranks = dict(zip(a.units, a.ranks))
        a = Assignment(su.space.unit_names, [bits.get(u, 16) for u in su.space.unit_names],
                       [ranks.get(u, 0) for u in su.space.unit_names])
    ev = FinetuneEvaluator(model, su.space.with_unquantized(), su.backend, data=su.evaluator.data, tokenizer=tok,
                           train=cfg.train, eval_blocks=FINAL_TEST_BLOCKS, eval_split="test", seed=seed,
                           track_peak=False, precision=su.precision)
    pm = ev.build(a)
    ev.fit(pm, steps)
    out = {"test": ev.score(pm)[1]["loss"],
           "val": heldout_metrics(pm, ev.data.validation, ev.eval_batch_size, ev.precision)["loss"]}
    cache.put(key, out)
    return out


def search_key(name: str, seed: int, cfg: OptimizeConfig) -> str:
    """Cache key of one demo search: budget name, seed, rank ladder and a digest of the preset's sizes (the
    default ladder and the demo preset changed once; a key names exactly what ran)."""
    sizes = json.dumps({k: cfg.resolved(k) for k in sorted(PRESETS[cfg.preset])}, sort_keys=True)
    return (f"search:{name}:{seed}:r{'-'.join(map(str, cfg.ranks))}:e-{cfg.embeddings}:"
            f"{hashlib.sha256(sizes.encode()).hexdigest()[:8]}"
            + ("" if cfg.granularity == "block" else f":g-{cfg.granularity}")
            + (f":{options_tag(cfg.backend_options)}" if cfg.backend_options else "")
            + (":fmt-choose" if chooses_formats(cfg) else ""))


def chooses_formats(cfg: OptimizeConfig) -> bool:
    """Whether ``optimize`` measures and chooses group sizes under ``cfg`` (hqq, ``formats="choose"``, no
    ``group_size`` given): such a search is not the one the keys without this mark name (those were fixed)."""
    return cfg.formats == "choose" and cfg.backend == "hqq" and "group_size" not in cfg.backend_options


def chosen_options(backend_spec: dict | None) -> dict:
    """The backend options that rebuild a search's backend in the formats it chose: ``{"group_size": {bits: g}}``
    for the bit-widths not at hqq's default group size (``{}`` when none)."""
    gs = (backend_spec or {}).get("group_size")
    if not isinstance(gs, dict):
        return {} if gs in (None, DEFAULT_GROUP_SIZE) else {"group_size": gs}
    changed = {int(b): g for b, g in gs.items() if g != DEFAULT_GROUP_SIZE}
    return {"group_size": changed} if changed else {}


def demo_search(model, tok, name: str, budget: int, seed: int, work: Path | None = None,
                granularity: str | None = None, backend_options: dict | None = None, formats: str | None = None) -> dict:
    """One ``autoqra.optimize`` at the demo preset's defaults (final rung included) with search seed ``seed``
    (``granularity``: of the units, ``backend_options``: the backend's, ``formats``: ``"choose"`` / ``"fixed"``;
    the config's defaults unless a study asks for others), cached in the benchmarks'
    shared ``results/searches.cache.json`` (no_regret and every_byte read the same runs); its trial store lives
    under ``runs/searches/`` so an interrupted search resumes."""
    cfg = OptimizeConfig(budget=budget, preset="demo", seed=seed,
                         **({} if granularity is None else {"granularity": granularity}),
                         **({} if not backend_options else {"backend_options": backend_options}),
                         **({} if formats is None else {"formats": formats}))
    key = search_key(name, seed, cfg)
    cache = Cache(SEARCHES)
    if cache.get(key) is not None:
        return cache.get(key)
    work = work or ROOT / "runs" / "searches"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = autoqra.optimize(model, tokenizer=tok, config=cfg, store=work / f"{key.replace(':', '-')}.db",
                           progress=True)
    wall = time.perf_counter() - t0
    fr = res.info.get("final_rung") or []
    a = res.best.assignment
    out = {"budget": name, "budget_bytes": budget, "search_seed": seed, "cpu": cpu_name(),
           "precision": res.info.get("precision"), "search_wall_seconds": wall,
           "final_rung_seconds": res.info.get("final_rung_seconds"),
           "chosen": {**a.to_dict(), "model_bytes": res.best.memory.model_bytes},
           "chosen_label": next((e["label"] for e in fr if e["assignment"] == a.to_dict()), None),
           "embedding_bits": {u.name: b for u, b in zip(res.space.units, a.bits) if not u.has_rank},
           "baselines": {n: {**t.assignment.to_dict(), "model_bytes": t.memory.model_bytes}
                         for n, t in res.baselines.items()},
           "final_rung": [{"label": e["label"], "assignment": e["assignment"], "val_score": e["val_score"],
                           "top_rung_score": e["top_rung_score"]} for e in fr],
           "cost_model": res.info.get("cost_model") or {},
           "formats": res.info.get("formats"), "backend_options": chosen_options(res.info.get("backend_spec")), "stop_reasons": res.info.get("stop_reasons"),
           "evaluations": len(res.history), "key": key}
    cache.put(key, out)
    return out
