r"""Final training of a chosen point: full-fidelity fine-tune with progress and resumable checkpoints.

The checkpoints (format, atomic saves, exact resume) are :mod:`autoqra.checkpoints`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from autoqra.checkpoints import Checkpointer
from autoqra.config import OptimizeConfig
from autoqra.evaluators.build import build_evaluator
from autoqra.evaluators.finetune import FinetuneEvaluator
from autoqra.fingerprint import model_fingerprint
from autoqra.models import load_model
from autoqra.precision import model_device, resolve_device
from autoqra.progress import step_bar
from autoqra.quant_backends import backend_from_spec, get_backend

log = logging.getLogger(__name__)


@attrs.define
class FinalModel:
    """A finished final training: the trained PEFT model and what it was trained and scored on.

    Attributes:
        model: the trained model (LoRA adapters on the quantized base).
        trial: the search trial whose assignment it trains.
        evaluator: the recipe (data, TrainSpec, backend) used; ``evaluator.score`` re-scores it.
        steps: optimizer steps trained. metrics: held-out metrics on the test split (and validation).
        directory: checkpoint folder (None when trained without checkpoints).
    """

    model: nn.Module
    trial: Any
    evaluator: FinetuneEvaluator
    steps: int
    metrics: dict[str, float]
    directory: Path | None = None
    tokenizer: Any = None
    resumed_from: int = 0


def resolve_steps(evaluator: FinetuneEvaluator, steps: int | None, epochs: float | None, default: int) -> int:
    """Optimizer steps from ``steps`` or ``epochs`` (over the training split), else ``default``."""
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r} must be a positive integer")
        return steps
    if epochs is not None:
        if not epochs > 0:
            raise ValueError(f"epochs={epochs!r} must be > 0")
        per_step = evaluator.train.batch_size * evaluator.train.grad_accum
        return max(1, math.ceil(epochs * evaluator.data.train.shape[0] / per_step))
    return default


def run_final(evaluator: FinetuneEvaluator, trial: Any, steps: int, directory: str | Path | None,
              checkpoint_every: int, progress: bool, identity: dict[str, Any]) -> FinalModel:
    """Build, train (resuming from ``directory``) and score ``trial.assignment``."""
    model = evaluator.build(trial.assignment)
    with step_bar(steps, enabled=progress, label=f"final training · {trial.assignment.short()}") as bar:
        ck = Checkpointer(directory, identity, steps, checkpoint_every, on_step=bar.update) if directory else None
        stats = evaluator.fit(model, steps, on_step=None if ck else bar.update, hooks=ck)
    stats.optimizer = None  # the trained weights stay; the optimizer state goes
    model.eval()
    test = evaluator.score(model)[1]
    last = float(stats.train_loss_last)
    if ck is not None and not math.isfinite(last):  # nothing left to train: the last step's loss is in the checkpoint
        last = ck.last_loss
    metrics = {"test_loss": test["loss"], "test_ppl": test["ppl"], "test_accuracy": test["accuracy"],
               "train_loss_last": last}
    if ck is not None:
        ck.mark_complete(metrics)
    return FinalModel(model, trial, evaluator, steps, metrics, Path(directory) if directory else None,
                      resumed_from=ck.resumed_from if ck is not None else 0)


def model_for(result: Any, model: nn.Module | None, tokenizer: Any,
              device: str | torch.device | None = None) -> tuple[nn.Module, Any]:
    """The search's source model: ``model`` if given (checked against the run's fingerprint), else reloaded
    from where the run recorded it came from (``autoqra.models.load_model`` source), in the dtype the
    search loaded it in, on ``device`` (default: the search's device when it is available, else CPU)."""
    if model is None:
        src = result.info.get("model_source")
        if not src:
            raise ValueError("this result does not record where its model came from: pass model= (and tokenizer=)")
        if device is None:
            ran_on = str(result.info.get("device") or "cpu")
            device = ran_on if not ran_on.startswith("cuda") or torch.cuda.is_available() else "cpu"
        model, tok = load_model(src, dtype=result.info.get("model_dtype") or "float32", device=device)
        tokenizer = tokenizer if tokenizer is not None else tok
    want = result.info.get("model_fingerprint")
    if want and model_fingerprint(model) != want:
        raise ValueError("this model is not the one the search ran on (its fingerprint differs; "
                         f"the search loaded it as {result.info.get('model_dtype') or 'float32'})")
    if device is not None and model_device(model) != resolve_device(device, model):
        model.to(resolve_device(device, model))
    return model, tokenizer


def evaluator_for(result: Any, model: nn.Module, tokenizer: Any, seed: int | None = None,
                  eval_split: str = "test", eval_blocks: int | None = None,
                  precision: str | None = None) -> FinetuneEvaluator:
    """The search's fine-tuning recipe (data, TrainSpec, backend, precision) as an evaluator for final
    training; ``precision`` overrides the search's (``"auto"`` resolves on the model's device)."""
    cfg = OptimizeConfig.from_dict(result.config)
    spec = result.info.get("backend_spec")
    backend = backend_from_spec(spec) if spec else get_backend(cfg.backend, **cfg.backend_options)
    return build_evaluator(cfg, model, eval_split, final=True, space=result.space, backend=backend, tokenizer=tokenizer,
                           seed=seed, eval_blocks=eval_blocks,
                           precision=precision or result.info.get("precision") or cfg.precision)


def pick_trial(result: Any, index: int | None) -> Any:
    """``result.best`` (index None) or ``result.pareto[index]``."""
    if index is None:
        if result.best is None:
            raise ValueError("this result has no feasible point to train")
        return result.best
    if not -len(result.pareto) <= index < len(result.pareto):
        raise ValueError(f"index {index} is out of range: the front has {len(result.pareto)} points")
    return result.pareto[index]
