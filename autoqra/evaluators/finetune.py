r"""The ``finetune`` evaluator: quantize + LoRA-wrap a candidate, really train it, score held-out loss.

Its learning-rate schedules (:func:`lr_lambda`, :func:`wsd_lambda`, :func:`decay_steps`) are in
:mod:`autoqra.evaluators.schedules` and re-exported here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch import nn

from autoqra.apply import apply_assignment
from autoqra.config import TrainSpec
from autoqra.evaluators.base import EvalResult, Evaluator, Fidelity, FitStats, register_evaluator
from autoqra.evaluators.data import ByteTokenizer, TaskData, build_task_data, iter_steps
from autoqra.evaluators.rungs import RungStates, common_lora_init
from autoqra.evaluators.schedules import decay_steps, lr_lambda, wsd_lambda
from autoqra.memory.model import measure_memory
from autoqra.memory.trace import measure_peak
from autoqra.precision import autocast, describe, grad_scaler, model_device, resolve_precision
from autoqra.quant_backends import QuantBackend, get_backend
from autoqra.space import Assignment, SearchSpace

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Raised inside an evaluation when a loss becomes NaN/inf (reported as status ``"nan"``)."""


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error (CUDA OOM, or an allocator failure on CPU)."""
    oom_cls = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(err, oom_cls):
        return True
    return isinstance(err, (RuntimeError, MemoryError)) and "out of memory" in str(err).lower()


@torch.no_grad()
def heldout_metrics(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8,
                    precision: str = "fp32") -> dict[str, float]:
    """Mean next-token loss (nats/token), perplexity and next-token accuracy over ``blocks``.

    The forward runs under ``precision``'s autocast; the loss is computed in fp32 from the logits.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    tot_loss, tot_correct, tot_tok = 0.0, 0, 0
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i : i + batch_size].to(device)
        with autocast(device, precision):
            logits = model(input_ids=ids).logits.float()
        lg, tgt = logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        tot_loss += torch.nn.functional.cross_entropy(lg, tgt, reduction="sum").item()
        tot_correct += (lg.argmax(-1) == tgt).sum().item()
        tot_tok += tgt.numel()
    model.train(was_training)
    loss = tot_loss / tot_tok
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "accuracy": tot_correct / tot_tok}


class FitHooks:
    """Optional hooks of :meth:`FinetuneEvaluator.fit` (final training uses them for checkpoints)."""

    def start(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> int:
        """Restore state if any; return how many optimizer steps are already done."""
        return 0

    def step_end(self, step: int, loss: float, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
        """Called after optimizer step ``step`` (0-based)."""

    def note_peak(self, peak_bytes: int) -> None:
        """The measured peak bytes of the first training step (when it is measured)."""


@register_evaluator("finetune")
class FinetuneEvaluator(Evaluator):
    """Score = −(held-out mean token loss) after ``fidelity.steps`` LoRA optimizer steps.

    Args:
        model: unquantized source model (never modified; quantized layers are cached per model).
        space: the search space.
        backend: quantization backend name or instance.
        data: packed task data; built from ``"pydoc"`` with ``tokenizer`` if omitted.
        tokenizer: used to build the default data (a ``ByteTokenizer`` is used if None).
        train: batch, learning rate, schedule, LoRA α ratio and dropout.
        eval_blocks: held-out blocks scored (``None`` = the whole split).
        eval_split: ``"validation"`` (search) or ``"test"`` (final reporting).
        seed: drives LoRA init and data order.
        calib_blocks: training blocks used to calibrate backends that need it (GPTQ).
        track_peak: measure the peak bytes of the first training step (slower step on CPU).
        eval_batch_size: sequences per forward when scoring.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (:mod:`autoqra.precision`),
            resolved on the model's device; training and scoring run under its autocast (fp16 with a
            ``GradScaler``). The model's device is where training runs (move the model first).
        rungs: search mode (:mod:`autoqra.evaluators.rungs`): train under a constant learning rate
            (after ``warmup_steps``) so that fidelities continue each other, and keep training states
            so a promoted candidate continues instead of restarting. Final training uses ``False``
            (the recipe's own schedule, e.g. cosine).
        rung_schedule: in rung mode, ``"constant"`` (a rung's score is taken mid-training, at the
            constant rate) or ``"wsd"`` (warmup-stable-decay: every rung shares the constant-rate stable
            phase and ends with its own linear decay over ``decay_fraction`` of its steps, so its score
            is that of a finished training; the next rung continues from the end of the stable phase).
        decay_fraction: the decay's share of a ``"wsd"`` rung's steps.
        common_init: draw every LoRA ``A`` from a per-module generator (paired comparisons across
            candidates; :func:`~autoqra.evaluators.rungs.common_lora_init`).
        fit_hooks: outside rung mode, ``fit_hooks(evaluator, assignment, steps) -> FitHooks`` for each
            evaluation, e.g. checkpoints that keep the trained weights (the final rung's
            :class:`~autoqra.checkpoints.FinalCheckpoints`); a hook with ``mark_complete(metrics)`` is told the
            scores.
    """

    replayable_score = True  # fixed held-out blocks, fixed batching, eval mode

    def __init__(
        self,
        model: nn.Module,
        space: SearchSpace,
        backend: str | QuantBackend = "hqq",
        data: TaskData | None = None,
        tokenizer: Any = None,
        train: TrainSpec | None = None,
        eval_blocks: int | None = 32,
        eval_split: str = "validation",
        seed: int = 0,
        calib_blocks: int = 16,
        track_peak: bool = True,
        eval_batch_size: int = 8,
        precision: str = "auto",
        rungs: bool = False,
        common_init: bool = True,
        rung_schedule: str = "constant",
        decay_fraction: float = 0.2,
        fit_hooks: Any = None,
    ) -> None:
        if rung_schedule not in ("constant", "wsd"):
            raise ValueError(f"rung_schedule={rung_schedule!r} is not allowed; use 'constant' or 'wsd'")
        if not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction={decay_fraction!r} is not allowed; it must be in (0, 1]")
        if eval_split not in ("validation", "test"):
            raise ValueError(f"eval_split={eval_split!r} is not allowed; use 'validation' or 'test'")
        if eval_blocks is not None and eval_blocks < 1:
            raise ValueError(f"eval_blocks={eval_blocks!r} must be >= 1 or None")
        self.model = model
        self.space = space
        self.backend = get_backend(backend)
        self.backend.check_bits(space.bits)
        self.train = train or TrainSpec()
        self.tokenizer = tokenizer
        if data is None:
            tok = tokenizer or ByteTokenizer(model.config.vocab_size)
            data = build_task_data("pydoc", tok, block_size=self.train.seq_len, seed=seed)
        self.data = data
        self.eval_blocks = eval_blocks
        self.eval_split = eval_split
        self.seed = seed
        self.calib_blocks = calib_blocks
        self.track_peak = track_peak
        self.eval_batch_size = eval_batch_size
        self.device = model_device(model)
        self.precision = resolve_precision(precision, self.device)
        self.rungs, self.common_init = bool(rungs), bool(common_init)
        self.rung_schedule, self.decay_fraction = rung_schedule, float(decay_fraction)
        self.fit_hooks = fit_hooks
        self.rung_states = RungStates()

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "data": self.data.spec(),
            "train": self.train.to_dict(),
            "eval_blocks": self.eval_blocks,
            "eval_split": self.eval_split,
            "seed": self.seed,
            "calib_blocks": self.calib_blocks if self.backend.needs_calibration else 0,
            **describe(self.device, self.precision),
            "schedule": self.schedule,
            "lora_init": "common" if self.common_init else "peft",
        }

    @property
    def schedule(self) -> str:
        """The learning-rate schedule trials train under (rung mode: constant, or warmup-stable-decay)."""
        if not self.rungs:
            return self.train.schedule
        return "constant" if self.rung_schedule == "constant" else f"wsd:{self.decay_fraction:g}"

    # -------------------------------------------------------------- building
    def calib_ids(self) -> torch.Tensor | None:
        return self.data.train[: self.calib_blocks] if self.backend.needs_calibration else None

    def build(self, assignment: Assignment, seed: int | None = None) -> nn.Module:
        """The quantized, LoRA-wrapped (untrained) model of ``assignment``."""
        seed = self.seed if seed is None else seed
        pm = apply_assignment(
            self.model, assignment, self.backend, seed=seed, space=self.space,
            alpha_ratio=self.train.lora_alpha_ratio, alpha=self.train.lora_alpha, dropout=self.train.lora_dropout,
            calib_ids=self.calib_ids(),
        )
        if self.common_init:
            common_lora_init(pm, seed)
        return pm

    def eval_data(self) -> torch.Tensor:
        blocks = getattr(self.data, self.eval_split)
        return blocks if self.eval_blocks is None else blocks[: self.eval_blocks]

    # -------------------------------------------------------------- training
    def batches(self, steps: int) -> Iterator[torch.Tensor]:
        return iter_steps(self.data.train, self.train.batch_size, steps * self.train.grad_accum, seed=self.seed)

    def fit(self, model: nn.Module, steps: int, on_step=None, hooks: FitHooks | None = None,
            lr_fn=None) -> FitStats:
        """Train LoRA parameters for ``steps`` optimizer steps; returns what the run reports.

        Args:
            on_step: ``f(step, loss)`` after every optimizer step.
            hooks: resume/checkpoint hooks (:class:`FitHooks`): ``start`` may restore a checkpoint and
                return the number of steps already done; ``step_end`` runs after every step.
            lr_fn: learning-rate multiplier per step (default: the recipe's schedule over ``steps``).

        Raises:
            NonFiniteLoss: a loss became NaN/inf.
        """
        params = [p for p in model.parameters() if p.requires_grad]
        stats = FitStats()
        if steps == 0 or not params:
            return stats
        torch.manual_seed(self.seed)  # dropout masks
        opt = torch.optim.AdamW(params, lr=self.train.lr, weight_decay=self.train.weight_decay)
        if lr_fn is None:
            recipe = attrs.evolve(self.train, schedule="constant" if self.rungs else self.train.schedule)
            lr_fn = lr_lambda(recipe, steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
        scaler = grad_scaler(self.device, self.precision)  # fp16 only
        model.train()
        start = hooks.start(model, opt, sched) if hooks is not None else 0
        if start:  # a restored optimizer keeps the rate of the schedule it was saved under: use this one's
            for g, base in zip(opt.param_groups, sched.base_lrs):
                g["lr"] = base * lr_fn(start)
        it = self.batches(steps)
        for _ in range(start * self.train.grad_accum):  # resume: the data order is a pure function of the seed
            next(it)
        losses = []
        for step in range(start, steps):
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(self.train.grad_accum):
                ids = next(it).to(self.device)

                def fwd_bwd(ids=ids) -> float:
                    with autocast(self.device, self.precision):
                        loss = model(input_ids=ids, labels=ids).loss
                    scaled = loss / self.train.grad_accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    return loss.item()

                if step == 0 and micro == 0 and self.track_peak:
                    val, stats.peak_bytes = measure_peak(fwd_bwd, self.device)
                    if hooks is not None:
                        hooks.note_peak(stats.peak_bytes)
                else:
                    val = fwd_bwd()
                if not math.isfinite(val):
                    raise NonFiniteLoss(f"loss became {val} at step {step}")
                step_loss += val / self.train.grad_accum
            if scaler is not None:
                scaler.unscale_(opt)
            if self.train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.train.max_grad_norm)
            if scaler is not None:
                scaler.step(opt)  # skips the step when the scaled gradients overflowed
                scaler.update()
            else:
                opt.step()
            sched.step()
            losses.append(step_loss)
            if on_step is not None:
                on_step(step, step_loss)
            if hooks is not None:
                hooks.step_end(step, step_loss, model, opt, sched)
        if losses:
            stats.train_loss_first, stats.train_loss_last = losses[0], losses[-1]
        stats.optimizer, stats.steps_run = opt, max(0, steps - start)
        return stats

    # ------------------------------------------------------------ evaluation
    def score(self, model: nn.Module) -> tuple[float, dict[str, float]]:
        """``(score, metrics)`` of a trained model; score = −held-out loss."""
        m = heldout_metrics(model, self.eval_data(), self.eval_batch_size, self.precision)
        return -m["loss"], m

    def evaluate(self, assignment: Assignment, fidelity: Fidelity) -> EvalResult:
        t0 = time.perf_counter()
        try:
            model = self.build(assignment)
            hooks, lr_fn = None, None
            if self.rungs:
                saved_at = fidelity.steps  # the step whose state the next rung continues from
                if self.rung_schedule == "wsd":
                    saved_at = fidelity.steps - decay_steps(fidelity.steps, self.decay_fraction)
                    lr_fn = wsd_lambda(saved_at, fidelity.steps, self.train.warmup_steps)
                hooks = self.rung_states.hooks(assignment.to_json(), saved_at)
            elif self.fit_hooks is not None:
                hooks = self.fit_hooks(self, assignment, fidelity.steps)
            stats = self.fit(model, fidelity.steps, hooks=hooks, lr_fn=lr_fn)
            if self.rungs and hooks is not None and hooks.resumed_from:  # continued: the earlier rung's first loss and peak
                stats.train_loss_first, stats.peak_bytes = hooks.first_loss, hooks.peak_bytes
                if hooks.resumed_from == fidelity.steps:
                    stats.train_loss_last = hooks.last_loss
            score, metrics = self.score(model)
            if not math.isfinite(score):
                raise NonFiniteLoss(f"held-out loss is {-score}")
            if hasattr(hooks, "mark_complete"):
                hooks.mark_complete({"score": score, **metrics})
            mem = measure_memory(model, stats.optimizer).to_dict()
            mem["peak_bytes"] = int(stats.peak_bytes)
            metrics.update(stats.metrics())
            return EvalResult(score=score, metrics=metrics, status="ok", seconds=time.perf_counter() - t0, memory=mem)
        except NonFiniteLoss as e:
            return EvalResult(status="nan", error=str(e), seconds=time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - a bad candidate must never kill the search
            status = "oom" if is_oom(e) else "failed"
            log.warning("evaluation of %s %s: %s: %s", assignment.short(), status, type(e).__name__, e)
            return EvalResult(status=status, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
