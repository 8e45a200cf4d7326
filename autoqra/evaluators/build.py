r"""One way to build an evaluator from an :class:`~autoqra.config.OptimizeConfig`.

:func:`build_evaluator` makes the search's evaluator (``preparation.prepare``: the config's ``evaluator``, by name)
and the final recipe's (``Result.train`` through :func:`autoqra.final.evaluator_for`, and the benchmark
harness's final trainings): the same task data, :class:`~autoqra.config.TrainSpec`, backend and precision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from autoqra.evaluators.base import Evaluator, evaluator_class
from autoqra.evaluators.data import ByteTokenizer, TaskData, build_task_data
from autoqra.evaluators.finetune import FinetuneEvaluator
from autoqra.registry import accepted_names, constructor_kwargs

if TYPE_CHECKING:
    from autoqra.config import OptimizeConfig
    from autoqra.quant_backends import QuantBackend
    from autoqra.space import SearchSpace

_FROM_CONFIG: Any = object()


def task_data(cfg: OptimizeConfig, model: nn.Module, tokenizer: Any = None) -> TaskData:
    """The config's task data (``cfg.data``), packed in ``cfg.train.seq_len`` blocks with ``tokenizer`` (byte
    tokens of the model's vocabulary when None), split with ``cfg.seed``."""
    tok = tokenizer or ByteTokenizer(model.config.vocab_size)
    return build_task_data(cfg.data, tok, block_size=cfg.train.seq_len, seed=cfg.seed)


def build_evaluator(cfg: OptimizeConfig, model: nn.Module, split: str = "validation", *, space: SearchSpace,
                    backend: QuantBackend, precision: str | None = None, tokenizer: Any = None,
                    data: TaskData | None = None, seed: int | None = None, eval_blocks: Any = _FROM_CONFIG,
                    final: bool = False, **options: Any) -> Evaluator:
    """The evaluator of ``cfg`` on ``model``, built on ``space`` with 16 bits added (so the 16-bit reference
    can be evaluated).

    Args:
        cfg: the run's config (task data, ``train``, ``seed``, ``precision``, and for the search the
            evaluator's name and options).
        split: the held-out split scored: ``"validation"`` (the search, the final rung) or ``"test"``.
        space / backend: the search space and the backend instance.
        precision: default ``cfg.precision``.
        tokenizer: the model's tokenizer (``None``: byte tokens; the evaluator gets ``None``).
        data: task data already built (default: :func:`task_data`).
        seed: LoRA init and data order (default ``cfg.seed``).
        eval_blocks: held-out blocks scored (``None`` = the whole split). Default: ``cfg``'s
            ``eval_blocks`` for the search, the whole split for the final recipe.
        final: ``False`` (default): the search's evaluator, the class registered as ``cfg.evaluator``. It is
            built as ``cls(model, space, backend, **kwargs)``: the run's settings (``data``, ``tokenizer``,
            ``train``, ``eval_blocks``, ``seed``, ``precision``, ``rungs``, ``rung_schedule``,
            ``decay_fraction``, ``eval_split``) are passed where its constructor takes them, while
            ``cfg.evaluator_options`` and ``options`` must all be constructor parameters.
            ``True``: the final recipe, a :class:`FinetuneEvaluator` training under ``cfg.train``'s own
            schedule, without peak tracking unless ``options`` say ``track_peak=True``.
        **options: further constructor keywords (e.g. ``calib_blocks``, ``fit_hooks``, ``track_peak``).

    Raises:
        ValueError: an unregistered evaluator name, or an option its constructor does not take.
    """
    precision = precision or cfg.precision
    seed = cfg.seed if seed is None else seed
    space = space.with_unquantized()
    if final:
        blocks = None if eval_blocks is _FROM_CONFIG else eval_blocks
        kw: dict[str, Any] = {"track_peak": False, **options}
        return FinetuneEvaluator(model, space, backend, data=data if data is not None else task_data(cfg, model, tokenizer),
                                 tokenizer=tokenizer, train=cfg.train, eval_blocks=blocks, eval_split=split, seed=seed,
                                 precision=precision, **kw)
    cls = evaluator_class(cfg.evaluator)
    takes = accepted_names(cls, skip=3)
    if data is None and (takes is None or "data" in takes):
        data = task_data(cfg, model, tokenizer)
    offered = {"data": data, "tokenizer": tokenizer, "train": cfg.train, "seed": seed, "precision": precision,
               "eval_blocks": cfg.resolved("eval_blocks") if eval_blocks is _FROM_CONFIG else eval_blocks,
               "rungs": cfg.guidance == "cost", "rung_schedule": cfg.rung_schedule,
               "decay_fraction": cfg.decay_fraction}
    required = {**cfg.evaluator_options, **options}
    if split == "validation":
        offered["eval_split"] = split
    else:  # an evaluator that cannot score another split must not silently score the validation one
        required.setdefault("eval_split", split)
    return cls(model, space, backend, **constructor_kwargs(cls, f"evaluator {cfg.evaluator!r}", required, offered,
                                                           skip=3))
