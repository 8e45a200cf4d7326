r"""``autoqra.optimize(model, budget)``: the one-call entry point."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import attrs
from torch import nn

from autoqra.config import OptimizeConfig
from autoqra.evaluators.base import Evaluator
from autoqra.executors import EXECUTORS, Executor
from autoqra.executors.ray import require_ray
from autoqra.guidance.importance import Importance
from autoqra.optimizer import AutoQRA, RunSummary, SearchSettings
from autoqra.preparation import (
    cost_model_for,
    executor_for,
    final_evaluator,
    final_rung_dir,
    importance_for,
    prepare,
)
from autoqra.problem import Problem
from autoqra.progress import Progress
from autoqra.quant_backends import BACKENDS, QuantBackend
from autoqra.result import Result
from autoqra.store import TrialStore, model_fingerprint

log = logging.getLogger(__name__)


class _FromConfig:
    def __repr__(self) -> str:
        return "<the config's>"


_FROM_CONFIG: Any = _FromConfig()


def _config(config: Any, overrides: dict[str, Any]) -> OptimizeConfig:
    if config is None:
        base: dict[str, Any] = {}
    elif isinstance(config, OptimizeConfig):
        base = config.to_dict()
    elif isinstance(config, dict):
        base = dict(config)
    else:
        base = OptimizeConfig.from_file(config).to_dict()
    explicit = overrides.pop("_explicit", {})
    base.update({k: v for k, v in overrides.items() if v is not None})
    base.update(explicit)  # values where None means something (phase2=None skips Phase II)
    return OptimizeConfig.from_dict(base)


def optimize(
    model: nn.Module,
    budget: int | float | str | None = None,
    *,
    tokenizer: Any = None,
    backend: str | QuantBackend | None = None,
    evaluator: str | Evaluator | None = None,
    phase1: Any = None,
    phase2: Any = _FROM_CONFIG,
    max_trials: int | None = None,
    time_limit: float | None = None,
    store: str | Path | TrialStore | None = None,
    seed: int | None = None,
    config: OptimizeConfig | dict | str | Path | None = None,
    progress: bool | Progress = True,
    **options: Any,
) -> Result:
    """Search per-unit quantization bits and LoRA ranks for ``model`` under a hard memory budget.

    Args:
        model: an unquantized HF causal LM (never modified).
        budget: bytes, a size string (``"3.1GB"``) or a reference (``"4bit"`` = uniform-4-bit footprint
            at rank ≈ 8). Default ``"4bit"``.
        tokenizer: the model's tokenizer. When None it is loaded from where the model came from
            (``autoqra.models.load_model`` / ``name_or_path`` when that is a local directory); a tiny
            test model uses byte tokens; otherwise a ``ValueError`` asks for it.
        backend: ``"hqq"`` (default), ``"bnb"``, ``"gptq"``, ``"none"`` or a ``QuantBackend`` instance.
        evaluator: ``"finetune"`` (default), ``"lm_eval"`` or an ``Evaluator`` instance (built on the
            space with 16-bit added, so the 16-bit reference can be evaluated).
        phase1 / phase2: searcher names or instances; ``phase2=None`` skips Phase II (default: the config's).
        max_trials: cap on evaluations (every fidelity); time_limit: seconds.
        store: SQLite trial store path; re-running with the same store resumes (finished trials are
            read back, not re-run). Default: in memory.
        seed: drives LoRA init, data order, searchers and the surrogate.
        config: an :class:`OptimizeConfig`, a dict or a YAML/JSON path; explicit arguments win.
        progress: show progress: a live view on a terminal, plain lines on stderr otherwise (one per phase,
            per trial with done/planned, best and ETA, per preparation step); ``False``: only ``INFO`` records
            of the ``autoqra.progress`` logger. A :class:`~autoqra.progress.Progress` instance is used as given.
        **options: any other :class:`OptimizeConfig` field (``bits``, ``ranks``, ``preset``, ``alpha``...),
            e.g. ``executor="ray", workers=8, ray_address="auto"`` to run trials in parallel on Ray;
            ``executor`` may also be an :class:`~autoqra.executors.Executor` instance, which is bound to
            this search's evaluator and left open (one pool of workers for several searches);
            ``device="cuda"`` moves the model to the GPU first; ``precision="bf16"`` trains under
            bf16 autocast (default ``"auto"``: :mod:`autoqra.precision`).

    Returns:
        :class:`Result` with the Pareto front, the chosen point, baselines and the full history.
    """
    be_obj = backend if isinstance(backend, QuantBackend) else None
    ev_obj = evaluator if isinstance(evaluator, Evaluator) else None
    s1 = phase1 if isinstance(phase1, str) or phase1 is None else None
    s2 = None if phase2 is _FROM_CONFIG else phase2 if isinstance(phase2, str) or phase2 is None else None
    ex_obj = options.pop("executor") if isinstance(options.get("executor"), Executor) else None
    if ex_obj is not None and ex_obj.name in EXECUTORS:
        options["executor"] = ex_obj.name
    cfg = _config(config, {
        "budget": budget, "backend": backend if isinstance(backend, str) else (
            be_obj.name if be_obj is not None and getattr(be_obj, "name", None) in BACKENDS else None),
        "evaluator": evaluator if isinstance(evaluator, str) else None, "phase1": s1,
        "max_trials": max_trials, "time_limit": time_limit, "seed": seed, **options,
        "_explicit": {} if phase2 is _FROM_CONFIG or (phase2 is not None and not isinstance(phase2, str)) else {"phase2": s2},
    })
    if cfg.executor == "ray":  # a missing extra fails before any model work
        require_ray()
    prog = progress if isinstance(progress, Progress) else Progress(enabled=progress)
    with prog:
        res = _search(model, cfg, be_obj, ev_obj, ex_obj, tokenizer, store, phase1, phase2, prog)
    return res


def _search(model: nn.Module, cfg: OptimizeConfig, be_obj: QuantBackend | None, ev_obj: Evaluator | None,
            ex_obj: Executor | None, tokenizer: Any, store: Any, phase1: Any, phase2: Any, prog: Progress) -> Result:
    """:func:`optimize` after its arguments are resolved: prepare, guide, search (``prog``: its progress)."""
    st = store if isinstance(store, TrialStore) else TrialStore(store)
    su = prepare(model, cfg, be_obj, ev_obj, tokenizer, choose=True, store=st, progress=prog)
    device, precision, be, space, memory, budget_bytes, ev_obj = (
        su.device, su.precision, su.backend, su.space, su.memory, su.budget_bytes, su.evaluator)
    fp = model_fingerprint(model)
    st.check_compatible({"model": fp, "backend": be.spec(), "evaluator": ev_obj.spec()})
    cost_model = cost_model_for(space, be, ev_obj, cfg, st, prog) if cfg.guidance == "cost" else None
    importance = (Importance.from_cost_model(cost_model, space) if cost_model is not None
                  else importance_for(model, space, be, ev_obj, cfg, st, prog))
    settings = SearchSettings.from_config(
        cfg, phase1=phase1 if phase1 is not None and not isinstance(phase1, str) else None,
        phase2=phase2 if phase2 is not None and phase2 is not _FROM_CONFIG and not isinstance(phase2, str) else None)
    problem = Problem.build(space, memory, budget_bytes, target=cfg.target, importance=importance, seed=cfg.seed)
    final_root = final_rung_dir(st) if cfg.final_rung else None
    run = AutoQRA(problem, ev_obj, st, settings, fingerprint=fp, cost_model=cost_model,
                  progress=prog, executor=executor_for(ex_obj, ev_obj, cfg),
                  final_evaluator=final_evaluator(model, cfg, ev_obj, final_root, fp))
    try:
        out = run.run()
    finally:  # workers go (and Ray, if started here) even on Ctrl-C; finished trials are in the store
        if ex_obj is None:
            run.executor.close()
    res = _result(run, out, cfg, importance, st, final_root)
    res.info.update(formats=su.formats.to_dict() if su.formats is not None else None, tokenizer=su.tokenizer_name, device=str(device),
                    model_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                    precision=getattr(ev_obj, "precision", precision))
    return res


def _result(run: AutoQRA, out: RunSummary, cfg: OptimizeConfig, imp: Importance, st: TrialStore,
            final_root: Path | None = None) -> Result:
    history = run.trials()
    by_key = {t.key: t for t in history}
    baselines = {name: attrs.evolve(by_key[key], name=name) for name, key in out.baselines.items()}
    pareto = [by_key[t.key] for t in out.front]
    best = by_key[out.best.key] if out.best else None
    info = out.info()
    info["importance"] = imp.to_dict()
    info["importance_spearman"] = imp.spearman
    info["model_source"] = getattr(run.evaluator.model, "_autoqra_source", None) if hasattr(run.evaluator, "model") else None
    info["model_fingerprint"] = run.fingerprint
    info["backend_spec"] = run.memory.backend.spec()
    if run.final_rung is not None and final_root is not None:
        info["final_rung_dir"] = str(final_root)
    return Result(best=best, pareto=pareto, baselines=baselines, history=history, budget_bytes=run.budget_bytes,
                  target=run.target, space=run.space, config=cfg.to_dict(), info=info)
