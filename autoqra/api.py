r"""``autoqra.optimize(model, budget)``: the one-call entry point."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import attrs
from torch import nn

from autoqra.checkpoints import FinalCheckpoints
from autoqra.config import OptimizeConfig
from autoqra.evaluators.base import Evaluator
from autoqra.evaluators.build import build_evaluator
from autoqra.evaluators.finetune import FinetuneEvaluator
from autoqra.executors import EXECUTORS, Executor, make_executor
from autoqra.executors.ray import require_ray
from autoqra.guidance.costmodel import CostModel, measure_cost_model
from autoqra.guidance.importance import Importance, compute_importance
from autoqra.memory.model import MemoryModel
from autoqra.models import tokenizer_for
from autoqra.optimizer import AutoQRA, RunSummary, SearchSettings
from autoqra.precision import describe, model_device, resolve_device, resolve_precision
from autoqra.problem import Problem
from autoqra.progress import Progress
from autoqra.quant_backends import BACKENDS, QuantBackend, backend_for_precision
from autoqra.result import Result
from autoqra.space import SearchSpace
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


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    su = prepare(model, cfg, be_obj, ev_obj, tokenizer)
    device, precision, be, space, memory, budget_bytes, ev_obj = (
        su.device, su.precision, su.backend, su.space, su.memory, su.budget_bytes, su.evaluator)
    st = store if isinstance(store, TrialStore) else TrialStore(store)
    fp = model_fingerprint(model)
    st.check_compatible({"model": fp, "backend": be.spec(), "evaluator": ev_obj.spec()})
    cost_model = _cost_model(space, be, ev_obj, cfg, st, prog) if cfg.guidance == "cost" else None
    importance = (Importance.from_cost_model(cost_model, space) if cost_model is not None
                  else _importance(model, space, be, ev_obj, cfg, st, prog))
    settings = SearchSettings.from_config(
        cfg, phase1=phase1 if phase1 is not None and not isinstance(phase1, str) else None,
        phase2=phase2 if phase2 is not None and phase2 is not _FROM_CONFIG and not isinstance(phase2, str) else None)
    problem = Problem.build(space, memory, budget_bytes, target=cfg.target, importance=importance, seed=cfg.seed)
    final_root = final_rung_dir(st) if cfg.final_rung else None
    run = AutoQRA(problem, ev_obj, st, settings, fingerprint=fp, cost_model=cost_model,
                  progress=prog, executor=_executor(ex_obj, ev_obj, cfg),
                  final_evaluator=_final_evaluator(model, cfg, ev_obj, final_root, fp))
    try:
        out = run.run()
    finally:  # workers go (and Ray, if started here) even on Ctrl-C; finished trials are in the store
        if ex_obj is None:
            run.executor.close()
    res = _result(run, out, cfg, importance, st, final_root)
    res.info.update(tokenizer=su.tokenizer_name, device=str(device),
                    model_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                    precision=getattr(ev_obj, "precision", precision))
    return res


@attrs.frozen
class Setup:
    """What :func:`optimize` builds before it searches (also what benchmarks use to evaluate alike).

    Attributes:
        device / precision: where and how trials train (resolved).
        backend / space / memory: the backend (compute dtype of the precision), the search space, the
            memory model; budget_bytes: the resolved hard budget (bytes on ``cfg.target``).
        evaluator: the evaluator (built on the space with 16 bits added); tokenizer_name: which
            tokenizer the task data was built with.
    """

    device: Any
    precision: str
    backend: QuantBackend
    space: SearchSpace
    memory: MemoryModel
    budget_bytes: int
    evaluator: Evaluator
    tokenizer_name: str


def prepare(model: nn.Module, cfg: OptimizeConfig, backend: QuantBackend | None = None,
            evaluator: Evaluator | None = None, tokenizer: Any = None) -> Setup:
    """Resolve device and precision (moving the model if asked), build backend, space (``cfg.bits_for``: the
    backend's own subset of the default bit ladder unless ``bits`` are given), memory model, budget and
    evaluator (:func:`~autoqra.evaluators.build.build_evaluator`) exactly as :func:`optimize` does."""
    device = resolve_device(cfg.device, model)
    if device != model_device(model):
        log.info("moving the model to %s", device)
        model.to(device)
    precision = resolve_precision(cfg.precision, device)
    be = backend or backend_for_precision(cfg.backend, precision, cfg.backend_options)
    space = SearchSpace.from_model(model, cfg.bits_for(be), cfg.ranks, cfg.granularity, cfg.target_modules,
                                   backend=be, embeddings=cfg.embeddings)
    memory = MemoryModel(model, space, be, train=cfg.train, precision=precision)
    budget_bytes = memory.budget_bytes(cfg.budget, target=cfg.target)
    tok_name = "given" if tokenizer is not None else "the evaluator's"
    if evaluator is None:
        if tokenizer is None:
            tokenizer, tok_name = tokenizer_for(model)
        evaluator = build_evaluator(cfg, model, space=space, backend=be, precision=precision, tokenizer=tokenizer)
    return Setup(device, precision, be, space, memory, budget_bytes, evaluator, tok_name)


def final_rung_dir(store: TrialStore) -> Path:
    """Where the final rung keeps its trained weights: ``<store>.final/`` beside a store file, else a
    temporary folder of this process."""
    if store.path is not None:
        return store.path.with_name(store.path.name + ".final")
    return Path(tempfile.mkdtemp(prefix="autoqra-final-"))


def _final_evaluator(model: nn.Module, cfg: OptimizeConfig, ev: Evaluator, root: Path | None, fp: str):
    """``make(seed)`` -> the final recipe's evaluator for the final rung (trains ``cfg.train`` under its own
    schedule, scores the validation split, keeps the trained weights under ``root``); None when the final
    rung is off or the search's evaluator is not the plain fine-tune evaluator."""
    if root is None or type(ev) is not FinetuneEvaluator:
        if root is not None:
            log.warning("the final rung needs the 'finetune' evaluator (got %s): choosing on the top rung", ev.name)
        return None
    blocks = cfg.resolved("final_eval_blocks")
    hooks = FinalCheckpoints(root, fp)
    made: dict[int, FinetuneEvaluator] = {}

    def make(seed: int) -> FinetuneEvaluator:
        if seed not in made:
            made[seed] = FinetuneEvaluator(
                model, ev.space, ev.backend, data=ev.data, tokenizer=ev.tokenizer, train=cfg.train,
                eval_blocks=blocks or None, eval_split="validation", seed=seed, calib_blocks=ev.calib_blocks,
                track_peak=False, eval_batch_size=ev.eval_batch_size, precision=ev.precision, fit_hooks=hooks)
        return made[seed]

    return make


def _executor(ex_obj: Executor | None, ev: Evaluator, cfg: OptimizeConfig) -> Executor:
    """The caller's executor bound to ``ev``, or a new one from the config."""
    if ex_obj is not None:
        ex_obj.bind(ev)
        return ex_obj
    return make_executor(cfg.executor, ev, address=cfg.ray_address, workers=cfg.workers,
                         resources=cfg.worker_resources)


def _importance(model, space: SearchSpace, be: QuantBackend, ev: Evaluator, cfg: OptimizeConfig, st: TrialStore,
                prog: Progress | None = None):
    n = cfg.resolved("importance_blocks")
    if n == 0:
        return Importance.uniform(space.n_units)
    data = getattr(ev, "data", None)
    if data is None:
        log.warning("the evaluator has no training data: importance priors are uniform")
        return Importance.uniform(space.n_units)
    blocks = data.train[:n]
    name = "importance:" + _digest([space.spec(), be.spec(), data.fingerprint(), n, cfg.seed,
                                    describe(model_device(model), getattr(ev, "precision", "fp32"))])
    cached = st.get_blob(name)
    if cached is not None:
        if prog is not None:
            prog.note("importance priors: read back from the store")
        return Importance.from_dict(cached)
    imp = compute_importance(model, space, be, blocks, seed=cfg.seed, precision=getattr(ev, "precision", "fp32"),
                             progress=prog.callback("importance priors") if prog is not None else None)
    st.put_blob(name, imp.to_dict())
    return imp


def _cost_model(space: SearchSpace, be: QuantBackend, ev: Evaluator, cfg: OptimizeConfig, st: TrialStore,
                prog: Progress | None = None):
    """The calibrated cost model (read back from the store when it was measured before), or None
    when the evaluator cannot train (no ``build``/``fit``) or priors are switched off."""
    n = cfg.resolved("importance_blocks")
    data = getattr(ev, "data", None)
    if n == 0 or data is None or not all(hasattr(ev, k) for k in ("build", "fit", "score")):
        if n:
            log.warning("the evaluator cannot train a probe: guidance falls back to the importance priors")
        return None
    steps, final_steps = cfg.resolved("high_steps"), cfg.resolved("final_steps")
    t1 = cfg.resolved("mid_steps") or max(1, steps // 3)
    name = "costmodel:" + _digest([space.spec(), be.spec(), ev.spec(), data.fingerprint(), n, steps,
                                   {"rank_model": 2, "final_steps": final_steps, "t1": t1}])
    cached = st.get_blob(name)
    if cached is not None:
        if prog is not None:
            prog.note("cost model: read back from the store")
        return CostModel.from_dict(cached)
    cm = measure_cost_model(ev, space, data.train[:n], steps, final_steps=final_steps, t1=t1,
                            progress=prog.callback("cost model") if prog is not None else None)
    st.put_blob(name, cm.to_dict())
    return cm


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
