r"""The ``lm_eval`` evaluator: fine-tune like ``finetune``, then score with lm-evaluation-harness."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from autoqra._optional import require
from autoqra.evaluators.base import register_evaluator
from autoqra.evaluators.finetune import FinetuneEvaluator
from autoqra.evaluators.tasks.build import mc_task_dir
from autoqra.precision import autocast

log = logging.getLogger(__name__)
_FEATURE = "evaluator 'lm_eval'"


@register_evaluator("lm_eval")
class LMEvalEvaluator(FinetuneEvaluator):
    """Score = the task's main metric after fine-tuning, computed on the in-memory model.

    Args:
        task: an lm-eval task name. Default: the packaged ``pydoc_mc`` multiple-choice task
            (4 choices, built from held-out Python-documentation topics).
        task_dir: directory with local YAML tasks (``TaskManager(include_path=...)``); defaults
            to the packaged task's directory. With ``include_defaults=True`` the harness's
            built-in tasks are indexed too (~10 s).
        metric: metric to maximise (default: the first of ``acc_norm``, ``acc``, ``exact_match``, ``f1`` found).
        limit: number of task documents (None = all).
        batch_size: fixed lm-eval batch size (recorded in ``spec()``: scores move with it).
        num_fewshot: few-shot examples.
        **kw: everything :class:`FinetuneEvaluator` takes (tokenizer required).
    """

    def __init__(
        self,
        model: nn.Module,
        space,
        backend="hqq",
        *,
        task: str | None = None,
        task_dir: str | Path | None = None,
        include_defaults: bool = False,
        metric: str | None = None,
        limit: int | None = None,
        batch_size: int = 8,
        num_fewshot: int = 0,
        **kw: Any,
    ) -> None:
        super().__init__(model, space, backend, **kw)
        if self.tokenizer is None:
            raise ValueError("the lm_eval evaluator needs tokenizer= (lm-eval tokenizes the task text)")
        if limit is not None and limit < 1:
            raise ValueError(f"limit={limit!r} must be >= 1 or None")
        if task is None:
            d, task = mc_task_dir()
            task_dir = task_dir or d
        self.task, self.task_dir = task, (str(task_dir) if task_dir else None)
        self.include_defaults = include_defaults
        self.metric, self.limit, self.lm_batch_size, self.num_fewshot = metric, limit, batch_size, num_fewshot
        self._task_manager = None

    def spec(self) -> dict[str, Any]:
        d = super().spec()
        d.update(task=self.task, metric=self.metric, limit=self.limit, lm_batch_size=self.lm_batch_size,
                 num_fewshot=self.num_fewshot)
        return d

    def task_manager(self):
        if self._task_manager is None:
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            TaskManager = require("lm_eval.tasks", _FEATURE).TaskManager

            self._task_manager = TaskManager(include_path=self.task_dir, include_defaults=self.include_defaults)
        return self._task_manager

    def score(self, model: nn.Module) -> tuple[float, dict[str, float]]:
        simple_evaluate = require("lm_eval", _FEATURE).simple_evaluate
        HFLM = require("lm_eval.models.huggingface", _FEATURE).HFLM

        model.eval()
        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.lm_batch_size, device=str(self.device))
        with autocast(self.device, self.precision):
            out = simple_evaluate(
                model=lm, tasks=[self.task], task_manager=self.task_manager(), limit=self.limit,
                num_fewshot=self.num_fewshot, log_samples=False, random_seed=self.seed, numpy_random_seed=self.seed,
                torch_random_seed=self.seed, fewshot_random_seed=self.seed,
            )
        res = out["results"][self.task]
        metrics = {k.split(",")[0]: float(v) for k, v in res.items() if isinstance(v, (int, float)) and "stderr" not in k}
        name = self.metric or next((m for m in ("acc_norm", "acc", "exact_match", "f1") if m in metrics), None)
        if name is None or name not in metrics:
            raise ValueError(f"metric {self.metric!r} not in the task's results {sorted(metrics)}")
        metrics["main_metric"] = metrics[name]
        return metrics[name], metrics
