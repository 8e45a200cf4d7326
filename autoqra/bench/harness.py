r"""Benchmark harness: AutoQRA against the baselines users would pick instead, at the same budget.

Rows (:data:`ROWS`): 16-bit LoRA, uniform HQQ / bnb-nf4 QLoRA-style points, random search with
AutoQRA's number of high-fidelity evaluations, the ablations (no priors, no surrogate, no Phase II),
plain NSGA-II, and AutoQRA at the uniform-4-bit budget and half-way between the 3- and 4-bit
footprints. Every row's chosen assignment gets the **same final training recipe**: a
:class:`FinetuneEvaluator` on the same model, data and :class:`TrainSpec`, ``final_steps`` optimizer
steps, scored on the held-out *test* split, once per seed of the preset.

Everything is resumable: searches share one trial store (``<work>/search.db``; same seed and
evaluator, so baselines and common prefixes are read back, not re-run) and final trainings live in
``<work>/final.db`` keyed by :func:`autoqra.store.trial_key`, so identical (assignment, backend,
seed) trainings are computed once and a killed benchmark re-runs nothing that finished.
Markdown/JSON are rewritten after every row; see :mod:`autoqra.bench.table` and
:mod:`autoqra.bench.plot`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import torch

from autoqra.api import optimize
from autoqra.bench.report import build_report, carry_rows
from autoqra.bench.rows import BENCH_PRESETS, ROWS, BenchPreset, RowSpec, fixed_assignment
from autoqra.bench.search import random_search, search_summary
from autoqra.bench.table import write_outputs
from autoqra.config import OptimizeConfig
from autoqra.evaluators.base import Fidelity
from autoqra.evaluators.build import build_evaluator
from autoqra.evaluators.data import ByteTokenizer, build_task_data
from autoqra.memory.model import MemoryModel
from autoqra.models import load_model
from autoqra.precision import compute_dtype, resolve_precision
from autoqra.quant_backends import backend_for_precision, backend_from_spec
from autoqra.space import SearchSpace
from autoqra.stages.runner import TrialRunner
from autoqra.store import TrialStore, model_fingerprint, trial_key

log = logging.getLogger(__name__)

__all__ = ["BENCH_PRESETS", "ROWS", "Bench", "BenchPreset", "RowSpec", "copy_store", "run_bench"]


def copy_store(src: Path, dst: Path) -> bool:
    """Copy a SQLite trial store (WAL-safe, via the backup API) when ``dst`` does not exist yet."""
    if dst.exists() or not src.is_file():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(f"file:{src}?mode=ro", uri=True)) as s, \
            contextlib.closing(sqlite3.connect(tmp)) as d:
        s.backup(d)
    shutil.move(tmp, dst)
    return True


@contextlib.contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Bench:
    """Runs the rows of one preset; :meth:`run` returns the JSON-able report (also written to ``out``)."""

    def __init__(self, preset: str | BenchPreset, out: str | Path = "benchmarks/results",
                 work: str | Path | None = None, seeds: int | None = None, progress: bool = False,
                 rows: tuple[RowSpec, ...] = ROWS, threads: int | None = None, merge: bool = False) -> None:
        self.p = BENCH_PRESETS[preset] if isinstance(preset, str) else preset
        if threads is not None:
            self.p = attrs.evolve(self.p, threads=threads)
        if seeds is not None:
            if seeds < 1:
                raise ValueError(f"seeds={seeds!r} is not allowed; it must be >= 1")
            self.p = attrs.evolve(self.p, seeds=tuple(range(seeds)))
        self.out = Path(out)
        self.work = Path(work) if work is not None else Path("benchmarks/runs") / self.p.name
        self.progress, self.rows, self.merge = progress, rows, merge
        self.name = f"compare_{self.p.name}"
        self.searches: dict[str, Any] = {}
        self.report: dict[str, Any] = {}
        self.final_owner: dict[str, str] = {}
        self.n_run = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        p = self.p
        for name, src in p.seed_stores.items():
            if copy_store(Path(src), self.work / name):
                log.info("copied the search store %s into %s", src, self.work / name)
        self.precision = resolve_precision(p.precision, "cpu")
        self.model, self.tok = load_model(p.model, dtype=compute_dtype(self.precision))
        self.fp = model_fingerprint(self.model)
        tok = self.tok or ByteTokenizer(self.model.config.vocab_size)
        self.data = build_task_data("pydoc", tok, block_size=p.train.seq_len, seed=p.search_seed)
        self.space = SearchSpace.from_model(self.model, p.bits, p.ranks, "block")
        self.backends = {k: backend_for_precision(k, self.precision) for k in ("hqq", "bnb")}
        self.backends["hqq+emb"] = self.backends["hqq"]  # the space with the embedding / head as units
        emb = SearchSpace.from_model(self.model, p.bits, p.ranks, "block", backend=self.backends["hqq"],
                                     embeddings="search")
        self.spaces = {"hqq": attrs.evolve(self.space, bits=tuple(sorted({*p.bits, 16}))),
                       "bnb": attrs.evolve(self.space, bits=(4, 8, 16)),
                       "hqq+emb": attrs.evolve(emb, bits=tuple(sorted({*p.bits, 16})))}
        self.memory = {k: MemoryModel(self.model, s, self.backends[k], train=p.train, precision=self.precision)
                       for k, s in self.spaces.items()}
        mm = self.memory["hqq"]
        b3, b4 = (mm.predict(self.space.uniform(b, 8)).model_bytes for b in (3, 4))
        self.budgets = {"4bit": b4, "mid": (b3 + b4) // 2}
        self.search_stores: dict[str, Any] = {}  # one per (search seed, guidance, budget): a store pins its recipe
        self.final_store = TrialStore(self.work / "final.db")
        self.evaluators: dict[tuple, Any] = {}

    def stores(self) -> list[Any]:
        """Every trial store of this benchmark (searches, final trainings)."""
        return [st for st in (*getattr(self, "search_stores", {}).values(), getattr(self, "final_store", None))
                if st is not None]

    def store_for(self, cfg: dict[str, Any], budget: str, name: str | None = None):
        """The search store of a search configuration: ``name`` (a row's own), else
        ``search-s<seed>-<guidance>[-r<ranks>]-<budget>.db`` (a rank ladder other than the preset's gets its own
        store)."""
        ranks = "" if list(cfg["ranks"]) == list(self.p.ranks) else "-r" + "-".join(str(r) for r in cfg["ranks"])
        name = name or f"search-s{int(cfg['seed'])}-{cfg.get('guidance', 'cost')}{ranks}-{budget}.db"
        if name not in self.search_stores:
            self.search_stores[name] = TrialStore(self.work / name)
        return self.search_stores[name]

    def close(self) -> None:
        for st in self.stores():
            st.close()

    # ----------------------------------------------------------------- search
    def search_config(self, row: RowSpec) -> dict[str, Any]:
        """OptimizeConfig fields of a search row (passed as ``config=`` so ``phase2=None`` survives)."""
        p = self.p
        cfg = {"preset": p.search_preset, "bits": list(p.bits), "ranks": list(p.ranks), "train": p.train.to_dict(),
               "backend": "hqq", "seed": p.search_seed, "precision": self.precision, **p.search_options,
               **row.options}
        if row.match_evals:
            cfg["max_trials"] = int(self.search(row.match_evals).info["n_evals"])
        return cfg

    def search(self, row_id: str):
        """The :class:`Result` of a search row (run, or read back from the store)."""
        if row_id not in self.searches:
            row = {r.id: r for r in (*ROWS, *self.rows)}[row_id]
            log.info("search %s: budget %s bytes", row.label, f"{self.budgets[row.budget]:,}")
            cfg = self.search_config(row)
            self.searches[row_id] = optimize(self.model, self.budgets[row.budget], tokenizer=self.tok,
                                             store=self.store_for(cfg, row.budget, row.store), progress=self.progress,
                                             config=cfg)
            self.n_run += int(self.searches[row_id].info.get("n_run", 0))
        return self.searches[row_id]

    def search_summary(self, res) -> dict[str, Any]:
        """Evaluations per fidelity, standalone search wall time and overhead of one search."""
        return search_summary(res)

    def random_search(self, row: RowSpec):
        """See :func:`autoqra.bench.search.random_search` (matched to the row's parent search)."""
        best, summary, n_run = random_search(self, row.parent or "guided")
        self.n_run += n_run
        return best, summary

    # ------------------------------------------------------------ final runs
    def final_evaluator(self, backend: str, seed: int):
        """The final recipe (:func:`~autoqra.evaluators.build.build_evaluator`) on the test split at ``seed``."""
        if (backend, seed) not in self.evaluators:
            cfg = OptimizeConfig(train=self.p.train, seed=self.p.search_seed, precision=self.precision)
            self.evaluators[backend, seed] = build_evaluator(
                cfg, self.model, "test", final=True, space=self.spaces[backend], backend=self.backends[backend],
                data=self.data, tokenizer=self.tok, eval_blocks=self.p.final_eval_blocks, seed=seed, track_peak=True)
        return self.evaluators[backend, seed]

    def final(self, row: RowSpec, a, backend: str, seed: int) -> dict[str, Any]:
        """Final training of ``a`` at ``seed`` (read back from the final store when already done)."""
        ev = self.final_evaluator(backend, seed)
        fid = Fidelity(self.p.final_steps, "final")
        key = trial_key(a, fid, ev.spec(), ev.backend.spec(), self.fp)
        if not self.final_store.has(key):
            log.info("final training %s seed %d (%d steps)", row.label, seed, fid.steps)
        mm = self.memory[backend]
        runner = TrialRunner(self.final_store, ev, mm.predict, lambda x: mm.predict(x).model_bytes, None,
                             backend_spec=ev.backend.spec(), fingerprint=self.fp, seed=seed)
        runner.tags = {"row": row.id, "backend": backend}
        t, ran = runner.trial(a, fid, "final")
        self.n_run += int(ran)
        owner = self.final_owner.setdefault(key, row.id)
        r = t.result
        log.info("  %s seed %d: %s test loss %.4f (%.0f s%s)", row.label, seed, r.status, -r.score, r.seconds,
                 "" if owner == row.id else f", shared with {owner}")
        return {"seed": seed, "key": key, "status": r.status, "score": r.score if r.ok else None,
                "metrics": r.metrics, "memory": r.memory, "seconds": r.seconds,
                "shared_with": None if owner == row.id else owner}

    def carried_rows(self) -> dict[str, Any]:
        """The rows of the existing ``<out>/<name>.json`` that this invocation does not run (``merge``).

        See :func:`autoqra.bench.report.carry_rows`; a report of another recipe is refused.
        """
        return carry_rows(self, self.out / f"{self.name}.json", {r.id for r in self.rows})

    # -------------------------------------------------------------------- run
    def row_point(self, row: RowSpec):
        """``(assignment, backend, search summary)`` of a row (searches run here)."""
        if row.kind == "uniform" and row.emb_bits == 16:
            space = self.spaces[row.backend]
            return space.uniform(row.bits, row.rank), row.backend, None
        if row.kind in ("uniform", "rule"):  # the embedding / head at emb_bits (issue 23's fixed rows)
            rule = 8 if row.kind == "rule" else None
            return fixed_assignment(self.spaces["hqq+emb"], row.bits, row.rank, row.emb_bits, rule), "hqq+emb", None
        if row.kind == "random":
            best, summary = self.random_search(row)
            a = best.assignment if best else None
            return a, self.backend_key(a), summary
        res = self.search(row.id)
        a = res.best.assignment if res.best else None
        return a, self.backend_key(a, res), self.search_summary(res)

    def backend_key(self, a, res: Any = None) -> str:
        """``"hqq+emb"`` for an HQQ assignment naming the embedding / head units (a search's default), else ``"hqq"``;
        for a search ``res`` that chose its formats (``info["formats"]``), that key plus the chosen group sizes
        (``"hqq+emb/g4=32"``), registered here with the search's backend, space and memory model."""
        key = "hqq+emb" if a is not None and a.units != self.space.unit_names else "hqq"
        spec = (res.info.get("backend_spec") or {}) if res is not None and res.info.get("formats") else {}
        gs = spec.get("group_size")
        if not isinstance(gs, dict) or spec == self.backends[key].spec():
            return key
        base = self.backends[key].group_sizes
        name = key + "/g" + ",".join(f"{b}={g}" for b, g in sorted((int(b), g) for b, g in gs.items())
                                     if base.get(b) != g)
        if name not in self.backends:
            be = backend_from_spec(spec)
            sp = SearchSpace.from_model(self.model, self.p.bits, self.p.ranks, "block", backend=be,
                                        embeddings="search" if key == "hqq+emb" else "keep")
            self.backends[name] = be
            self.spaces[name] = attrs.evolve(sp, bits=tuple(sorted({*self.p.bits, 16})))
            self.memory[name] = MemoryModel(self.model, self.spaces[name], be, train=self.p.train,
                                            precision=self.precision)
        return name

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.setup()
        carried = self.carried_rows() if self.merge else {}
        rows: dict[str, dict[str, Any]] = {}
        points: dict[str, tuple] = {}
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            with _threads(self.p.threads):
                for i, seed in enumerate(self.p.seeds):
                    for row in self.rows:
                        if i == 0:
                            log.info("row %s", row.label)
                            points[row.id] = self.row_point(row)
                            a, backend, summary = points[row.id]
                            rows[row.id] = {"id": row.id, "label": row.label, "kind": row.kind, "backend": backend,
                                            "budget": row.budget, "options": row.options, "parent": row.parent,
                                            "repeat": row.repeat,
                                            "search": summary,
                                            "assignment": a.to_dict() if a else None, "finals": [],
                                            "memory_predicted": self.memory[backend].predict(a).to_dict() if a else None}
                        a, backend, _ = points[row.id]
                        if a is not None:
                            rows[row.id]["finals"].append(self.final(row, a, backend, seed))
                        self.report = build_report(self, rows, started, time.perf_counter() - t0, partial=True,
                                                   carried=carried)
                        write_outputs(self.report, self.out, self.name, plot=False)
            self.report = build_report(self, rows, started, time.perf_counter() - t0, partial=False,
                                           carried=carried)
            write_outputs(self.report, self.out, self.name, plot=True)
        finally:
            self.close()
        return self.report


def run_bench(preset: str = "quick", out: str | Path = "benchmarks/results", work: str | Path | None = None,
              seeds: int | None = None, progress: bool = False, threads: int | None = None,
              rows: list[str] | None = None, merge: bool = False) -> dict[str, Any]:
    """Run (or resume) the benchmark of ``preset``; writes ``<out>/compare_<preset>.{md,json,png}``.

    ``rows``: only these row ids (e.g. to compute some rows in a second process sharing the work
    folder; give it another ``out`` so the two do not overwrite each other's table).
    ``merge``: keep the other rows of an existing ``<out>/compare_<preset>.json`` (same model, data,
    budgets and final-training recipe, else ``ValueError``) in the written table, marked as carried
    over; the rows run now replace theirs. This adds rows to a committed table without re-running it.
    """
    if preset not in BENCH_PRESETS:
        raise ValueError(f"preset={preset!r} is not allowed; choose one of {list(BENCH_PRESETS)}")
    ids = [r.id for r in ROWS]
    unknown = sorted(set(rows or ()) - set(ids))
    if unknown:
        raise ValueError(f"unknown row ids {unknown}; the rows are {ids}")
    preset_rows = BENCH_PRESETS[preset].rows
    chosen = tuple(r for r in ROWS if (rows is None or r.id in rows) and (preset_rows is None or r.id in preset_rows))
    return Bench(preset, out=out, work=work, seeds=seeds, progress=progress, threads=threads, rows=chosen,
                 merge=merge).run()
