r"""Checkpoints of a final training: resumable, atomic, identified by what was trained.

A checkpoint directory holds ``state.json`` (the training's identity, the last saved step and, once
finished, the held-out metrics) and one ``step-NNNNNN/`` folder with safetensors files only: the LoRA
weights, the AdamW moments and the RNG state. ``state.json`` is replaced atomically *after* its folder
is complete, so a kill at any moment leaves the previous checkpoint usable. Resuming restores weights,
optimizer, learning-rate schedule, RNG and data position, so a resumed run ends with the same weights
as an uninterrupted one.

* :class:`Checkpointer`: the :class:`~autoqra.evaluators.finetune.FitHooks` that save and restore one training;
* :class:`FinalCheckpoints`: one directory per training identity (the final rung's trainings, read back by
  ``Result.train()``); :func:`training_identity` / :func:`identity_digest`: what identifies a training;
* :func:`read_state`: a directory's ``state.json`` (None when absent).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from autoqra.evaluators.finetune import FinetuneEvaluator, FitHooks

log = logging.getLogger(__name__)

CKPT_FORMAT = "autoqra.checkpoint/1"
STATE_FILE = "state.json"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_state(directory: str | Path) -> dict[str, Any] | None:
    """The checkpoint state of ``directory`` (None when there is none)."""
    f = Path(directory) / STATE_FILE
    if not f.is_file():
        return None
    try:
        st = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); delete the checkpoint directory to start over") from None
    if not isinstance(st, dict) or st.get("format") != CKPT_FORMAT:
        raise ValueError(f"{f} is not an autoqra checkpoint (format {st.get('format') if isinstance(st, dict) else st!r})")
    return st


class Checkpointer(FitHooks):
    """:class:`FitHooks` that saves every ``every`` steps into ``directory`` and resumes from it.

    Args:
        directory: checkpoint folder (created).
        identity: JSON-able description of the training (assignment, steps, seed, recipe); a
            checkpoint with another identity is refused rather than silently mixed in.
        total_steps: optimizer steps of the whole training.
        every: save period in optimizer steps (the last step is always saved).
        on_step: ``f(step, loss)`` progress callback.
    """

    def __init__(self, directory: str | Path, identity: dict[str, Any], total_steps: int, every: int = 50,
                 on_step=None) -> None:
        if every < 1:
            raise ValueError(f"checkpoint_every={every!r} must be >= 1")
        self.dir = Path(directory)
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        self.total, self.every, self.on_step = total_steps, every, on_step
        self.resumed_from = 0
        self.last_loss = float("nan")  # training loss of the last step checkpointed (read back or saved)

    # ------------------------------------------------------------------ resume
    def start(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> int:
        st = read_state(self.dir)
        if st is None:
            return 0
        if st.get("identity") != self.identity:
            raise ValueError(
                f"the checkpoint in {self.dir} belongs to another training (different assignment, steps, seed or "
                "recipe); pass another output directory or delete it"
            )
        step = int(st["step"])
        folder = self.dir / st["folder"]
        lora = load_file(folder / "lora.safetensors")
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(lora) != set(named):
            raise ValueError(f"checkpoint {folder} does not match the model's LoRA parameters")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(lora[n])
        opt.load_state_dict(_optimizer_from_files(load_file(folder / "optimizer.safetensors"), st["optimizer"]))
        sched.load_state_dict(st["scheduler"])
        rng = load_file(folder / "rng.safetensors")
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():  # pragma: no cover - needs a GPU
            torch.cuda.set_rng_state(rng["cuda"])
        self.resumed_from = step
        self.last_loss = float(st.get("last_loss", float("nan")))
        log.info("resuming final training at step %d/%d from %s", step, self.total, folder)
        return step

    # -------------------------------------------------------------------- save
    def step_end(self, step: int, loss: float, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
        done = step + 1
        if self.on_step is not None:
            self.on_step(step, loss)
        if done % self.every == 0 or done == self.total:
            self.save(done, model, opt, sched, loss)

    def save(self, done: int, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, loss: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{done:06d}"
        folder = self.dir / name
        tmp = self.dir / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        lora = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(lora, tmp / "lora.safetensors")
        tensors, opt_meta = _optimizer_to_files(opt.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and any(p.is_cuda for p in lora.values()):  # pragma: no cover - GPU only
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / "rng.safetensors")
        self.last_loss = float(loss)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        sch = {k: (None if k == "lr_lambdas" else v) for k, v in sched.state_dict().items()}
        sch["lr_lambdas"] = [None] * len(sched.lr_lambdas)
        _atomic_write(self.dir / STATE_FILE, json.dumps({
            "format": CKPT_FORMAT, "identity": self.identity, "step": done, "total_steps": self.total,
            "folder": name, "optimizer": opt_meta, "scheduler": sch, "last_loss": loss, "complete": False,
        }, indent=1))
        for old in self.dir.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def mark_complete(self, metrics: dict[str, Any]) -> None:
        """Record the held-out metrics of the finished training in ``state.json``."""
        st = read_state(self.dir)
        if st is None:
            return
        st.update(complete=True, metrics=metrics)
        _atomic_write(self.dir / STATE_FILE, json.dumps(st, indent=1))


def training_identity(evaluator: FinetuneEvaluator, assignment: Any, steps: int, model_fp: str | None) -> dict[str, Any]:
    """What makes two final trainings the same computation: assignment, steps, recipe (data, TrainSpec,
    schedule, seed, LoRA init, device, precision), backend and source model. Where it is scored (split,
    blocks) is not part of it, so the final rung's training (scored on validation) is read back by
    ``Result.train()`` (scored on test)."""
    recipe = {k: v for k, v in evaluator.spec().items() if k not in ("eval_split", "eval_blocks")}
    return json.loads(json.dumps({"assignment": assignment.to_dict(), "steps": int(steps), "recipe": recipe,
                                  "backend": evaluator.backend.spec(), "model": model_fp}, sort_keys=True, default=str))


def identity_digest(identity: dict[str, Any]) -> str:
    """Folder name of a training identity (16 hex digits of its SHA-256)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FinalCheckpoints:
    """``fit_hooks`` of an evaluator that trains with the final recipe and keeps every training under
    ``root/<identity digest>/`` (a :class:`Checkpointer`: resumable, read back once finished).

    Args:
        root: folder of the checkpoints (created on first save).
        model_fp: the source model's fingerprint (part of the identity).
        every: checkpoint period in optimizer steps.
    """

    def __init__(self, root: str | Path, model_fp: str | None, every: int = 25) -> None:
        self.root, self.model_fp, self.every = Path(root), model_fp, int(every)

    def __call__(self, evaluator: FinetuneEvaluator, assignment: Any, steps: int) -> Checkpointer:
        ident = training_identity(evaluator, assignment, steps, self.model_fp)
        return Checkpointer(self.root / identity_digest(ident), ident, steps, self.every)


def _optimizer_to_files(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and JSON (no pickle anywhere)."""
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in [*tensors.items(), *meta.get("scalars", {}).items()]:
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


