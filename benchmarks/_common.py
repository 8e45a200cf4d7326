"""What the SmolLM2 benchmarks share: a resumable JSON cache, the model in the precision's dtype, the compare
harness's budgets and the library's final recipe (``TrainSpec``, ``final_steps``, test loss on 64 test blocks)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import autoqra
from autoqra.api import prepare
from autoqra.config import OptimizeConfig
from autoqra.evaluators.finetune import FinetuneEvaluator, heldout_metrics
from autoqra.precision import compute_dtype, cpu_name, resolve_precision
from autoqra.space import Assignment

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
FINAL_SEEDS = (0, 1)
FINAL_TEST_BLOCKS = 64

__all__ = ["FINAL_SEEDS", "FINAL_TEST_BLOCKS", "RESULTS", "ROOT", "Cache", "budgets", "cpu_name", "final_scores",
           "load"]


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


def final_scores(model, tok, cfg: OptimizeConfig, a: Assignment, seed: int, cache: Cache | None = None) -> dict:
    """The library's final recipe (``cfg.train``, ``final_steps``, its schedule) with training seed ``seed``:
    test loss on 64 test blocks and loss on the whole validation split; cached by (assignment, seed, steps)."""
    steps = cfg.resolved("final_steps")
    key = f"final:{a.to_json()}:{seed}" + ("" if steps == 60 else f":{steps}")
    if cache is not None and cache.get(key) is not None:
        return cache.get(key)
    su = prepare(model, cfg, tokenizer=tok)
    ev = FinetuneEvaluator(model, su.space.with_unquantized(), su.backend, data=su.evaluator.data, tokenizer=tok,
                           train=cfg.train, eval_blocks=FINAL_TEST_BLOCKS, eval_split="test", seed=seed,
                           track_peak=False, precision=su.precision)
    pm = ev.build(a)
    ev.fit(pm, steps)
    out = {"test": ev.score(pm)[1]["loss"],
           "val": heldout_metrics(pm, ev.data.validation, ev.eval_batch_size, ev.precision)["loss"]}
    if cache is not None:
        cache.put(key, out)
    return out
