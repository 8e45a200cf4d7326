"""What :func:`autoqra.optimize` builds before it searches: device, precision, backend, space, memory model, budget
and evaluator (:func:`prepare`), the guidance it measures once and keeps in the store (the calibrated cost model,
else the importance priors), the final rung's evaluator and the executor. Benchmarks call :func:`prepare` to
evaluate exactly as the search does."""

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
from autoqra.executors import Executor, make_executor
from autoqra.guidance.costmodel import CostModel, measure_cost_model
from autoqra.guidance.formats import DEFAULT_CANDIDATES as FORMAT_CANDIDATES
from autoqra.guidance.formats import FormatChoice, choose_formats, supports_formats
from autoqra.guidance.importance import Importance, compute_importance
from autoqra.memory.model import MemoryModel
from autoqra.models import tokenizer_for
from autoqra.precision import describe, model_device, resolve_device, resolve_precision
from autoqra.progress import Progress
from autoqra.quant_backends import QuantBackend, backend_for_precision
from autoqra.space import SearchSpace
from autoqra.store import TrialStore

log = logging.getLogger(__name__)
#: calibration blocks (training split) the format choice measures its KL on
FORMAT_BLOCKS = 8


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@attrs.frozen
class Setup:
    """What :func:`optimize` builds before it searches (also what benchmarks use to evaluate alike).

    Attributes:
        device / precision: where and how trials train (resolved).
        backend / space / memory: the backend (compute dtype of the precision), the search space, the
            memory model; budget_bytes: the resolved hard budget (bytes on ``cfg.target``).
        evaluator: the evaluator (built on the space with 16 bits added); tokenizer_name: which
            tokenizer the task data was built with.
        formats: the group sizes chosen per bit-width (:mod:`autoqra.guidance.formats`), None when not chosen.
    """

    device: Any
    precision: str
    backend: QuantBackend
    space: SearchSpace
    memory: MemoryModel
    budget_bytes: int
    evaluator: Evaluator
    tokenizer_name: str
    formats: FormatChoice | None = None


def prepare(model: nn.Module, cfg: OptimizeConfig, backend: QuantBackend | None = None,
            evaluator: Evaluator | None = None, tokenizer: Any = None, choose: bool = False,
            store: TrialStore | None = None, progress: Progress | None = None) -> Setup:
    """Resolve device and precision (moving the model if asked), build backend, space (``cfg.bits_for``: the
    backend's own subset of the default bit ladder unless ``bits`` are given), memory model, budget and
    evaluator (:func:`~autoqra.evaluators.build.build_evaluator`) exactly as :func:`optimize` does.

    Formats: with ``choose`` (what :func:`optimize` passes) and ``cfg.formats == "choose"``, each bit-width's group
    size is measured and chosen first (:mod:`autoqra.guidance.formats`; kept in ``store`` when given) and everything
    is built again in the chosen formats. The budget stays the one resolved in the backend's default formats
    (``"4bit"`` names the same bytes either way). Nothing is chosen when a backend or an evaluator object is given
    (each comes with its own backend), when ``cfg.backend_options`` names a ``group_size``, or when the backend has
    no group size per bit-width. Benchmarks that evaluate given points leave ``choose`` off and pass a search's
    formats as ``backend_options`` (:func:`as_searched`). ``Setup.formats`` holds the choice (None: none made)."""
    su = _prepare(model, cfg, backend, evaluator, tokenizer)
    if (not choose or cfg.formats != "choose" or backend is not None or evaluator is not None
            or "group_size" in cfg.backend_options or not supports_formats(su.backend)):
        return su
    fc = formats_for(model, cfg, su, store, progress)
    if fc is None:
        return su
    changed = fc.changed(su.backend)
    if not changed:
        return attrs.evolve(su, formats=fc)
    cfg2 = attrs.evolve(cfg, budget=su.budget_bytes,
                        backend_options={**cfg.backend_options, "group_size": dict(sorted(changed.items()))})
    return attrs.evolve(_prepare(model, cfg2, None, evaluator, tokenizer), formats=fc)


def as_searched(cfg: OptimizeConfig, info: dict[str, Any] | None) -> OptimizeConfig:
    """``cfg`` with the formats a search chose (``Result.info["formats"]``) as its backend's ``group_size`` and
    ``formats="fixed"``: the config that builds that search's backend, to evaluate points exactly as it did."""
    fc = (info or {}).get("formats")
    if not fc:
        return cfg
    sizes = {int(b): int(g) for b, g in fc["group_sizes"].items()}
    return attrs.evolve(cfg, formats="fixed", backend_options={**cfg.backend_options, "group_size": sizes})


def formats_for(model: nn.Module, cfg: OptimizeConfig, su: Setup, store: TrialStore | None = None,
                prog: Progress | None = None) -> FormatChoice | None:
    """The format choice of :func:`prepare` (read back from ``store`` when measured before), or None when the
    evaluator has no training data. It measures on :data:`FORMAT_BLOCKS` calibration blocks whatever the preset
    or ``importance_blocks`` (a backend setting: searches of one model and data share their formats and stores)."""
    data = getattr(su.evaluator, "data", None)
    if data is None:
        return None
    n = min(FORMAT_BLOCKS, len(data.train))
    name = "formats:" + _digest([su.space.spec(), su.backend.spec(), data.fingerprint(), n, list(FORMAT_CANDIDATES),
                                 describe(model_device(model), su.precision)])
    cached = store.get_blob(name) if store is not None else None
    if cached is not None:
        if prog is not None:
            prog.note("formats: read back from the store")
        return FormatChoice.from_dict(cached)
    calib = su.evaluator.calib_ids() if hasattr(su.evaluator, "calib_ids") else None
    fc = choose_formats(model, su.space, su.backend, data.train[:n], su.precision, FORMAT_CANDIDATES,
                        calib_ids=calib, progress=prog.callback("formats") if prog is not None else None)
    if store is not None:
        store.put_blob(name, fc.to_dict())
    return fc


def _prepare(model: nn.Module, cfg: OptimizeConfig, backend: QuantBackend | None, evaluator: Evaluator | None,
             tokenizer: Any) -> Setup:
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


def final_evaluator(model: nn.Module, cfg: OptimizeConfig, ev: Evaluator, root: Path | None, fp: str):
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


def executor_for(ex_obj: Executor | None, ev: Evaluator, cfg: OptimizeConfig) -> Executor:
    """The caller's executor bound to ``ev``, or a new one from the config."""
    if ex_obj is not None:
        ex_obj.bind(ev)
        return ex_obj
    return make_executor(cfg.executor, ev, address=cfg.ray_address, workers=cfg.workers,
                         resources=cfg.worker_resources)


def importance_for(model, space: SearchSpace, be: QuantBackend, ev: Evaluator, cfg: OptimizeConfig, st: TrialStore,
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


def cost_model_for(space: SearchSpace, be: QuantBackend, ev: Evaluator, cfg: OptimizeConfig, st: TrialStore,
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
