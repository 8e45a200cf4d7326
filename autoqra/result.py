r"""Search results: ``Trial``, ``Result`` (Pareto front, chosen point, baselines, history), save/load."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import attrs

from autoqra.artifact.export import export_model, merge_adapter
from autoqra.checkpoints import identity_digest, read_state, training_identity
from autoqra.config import OptimizeConfig
from autoqra.evaluators.data import ByteTokenizer
from autoqra.final import evaluator_for, model_for, pick_trial, resolve_steps, run_final
from autoqra.memory.model import MemoryModel
from autoqra.space import SearchSpace
from autoqra.trial import Trial

__all__ = ["FORMAT", "RESULT_FILE", "Result", "Trial", "load_result", "space_from_spec"]

RESULT_FILE = "result.json"
FORMAT = "autoqra.result/1"


def space_from_spec(spec: dict[str, Any]) -> SearchSpace:
    return SearchSpace.from_spec(spec)


@attrs.define
class Result:
    """What :func:`autoqra.optimize` returns.

    Attributes:
        best: the chosen point (best utility under the budget) or None if nothing feasible was evaluated.
        pareto: feasible high-fidelity trials on the score/memory front, by memory.
        baselines: ``{name: Trial}`` uniform baselines at the same budget and the 16-bit reference.
        history: every trial of the run in evaluation order.
        budget_bytes / target: the hard budget (bytes) and what it constrains (``"model"``/``"train"``).
        space: the search space; config: the run's options (JSON-able); info: stop reasons,
            hypervolume history, timing, surrogate quality, importance priors.
    """

    best: Trial | None
    pareto: list[Trial]
    baselines: dict[str, Trial]
    history: list[Trial]
    budget_bytes: int
    target: str
    space: SearchSpace
    config: dict[str, Any] = attrs.Factory(dict)
    info: dict[str, Any] = attrs.Factory(dict)
    #: the folder this result was saved to / loaded from (final-training checkpoints go under it)
    run_dir: Path | None = attrs.field(default=None, eq=False)
    #: the last :meth:`train` output (used by :meth:`export`)
    final: Any = attrs.field(default=None, eq=False, repr=False)

    # ------------------------------------------------------------ final training
    def train(
        self,
        model: Any = None,
        *,
        tokenizer: Any = None,
        fidelity: str | int = "final",
        index: int | None = None,
        steps: int | None = None,
        epochs: float | None = None,
        out: str | Path | None | bool = None,
        checkpoint_every: int = 25,
        seed: int | None = None,
        progress: bool = True,
        device: str | None = None,
        precision: str | None = None,
    ):
        """Fine-tune the chosen point (or ``pareto[index]``) at full fidelity; returns the trained PEFT model.

        Args:
            model: the unquantized source model; reloaded from the run's record when None.
            tokenizer: its tokenizer (reloaded with the model when None).
            fidelity: ``"final"`` (the config's ``final_steps``), ``"high"``/``"low"`` (the search's
                fidelities) or a number of optimizer steps. ``steps``/``epochs`` override it.
            index: train ``pareto[index]`` instead of ``best``.
            out: checkpoint folder; default ``<run_dir>/final`` (``final-<index>``) when the result was
                saved/loaded, ``False`` for none. A killed training resumes from it; a finished one is
                read back (weights loaded, not retrained).
            checkpoint_every: optimizer steps between checkpoints.
            seed: LoRA init / data order / dropout seed (default: the search's).
            progress: progress bar (rich on a terminal, log lines otherwise).
            device: where to train (default: the search's device when available, else CPU; a given
                ``model`` is moved there).
            precision: ``"auto" | "fp32" | "bf16" | "fp16"`` (default: the search's precision).

        Also sets ``self.final`` (:class:`autoqra.final.FinalModel`: model, held-out test metrics).
        """
        trial = pick_trial(self, index)
        model, tokenizer = model_for(self, model, tokenizer, device)
        ev = evaluator_for(self, model, tokenizer, seed, precision=precision)
        cfg = OptimizeConfig.from_dict(self.config)
        default = fidelity if isinstance(fidelity, int) and not isinstance(fidelity, bool) else \
            {"final": cfg.resolved("final_steps"), "high": cfg.resolved("high_steps"),
             "low": cfg.resolved("low_steps")}.get(fidelity)
        if default is None:
            raise ValueError(f"fidelity={fidelity!r} is not allowed; use 'final', 'high', 'low' or a step count")
        n = resolve_steps(ev, steps, epochs, default)
        if out is None and self.run_dir is not None:
            out = self.run_dir / ("final" if index is None else f"final-{index}")
        identity = training_identity(ev, trial.assignment, n, self.info.get("model_fingerprint"))
        done = self._final_rung_training(identity)
        if done is not None:  # the final rung trained exactly this: read it back instead of training again
            if not out:
                out = done
            elif read_state(out) is None:
                shutil.copytree(done, out, dirs_exist_ok=True)
        self.final = run_final(ev, trial, n, out or None, checkpoint_every, progress, identity)
        self.final.tokenizer = tokenizer
        return self.final.model

    def _final_rung_training(self, identity: dict[str, Any]) -> Path | None:
        """The final rung's finished checkpoint of ``identity`` (same assignment, steps, recipe, seed), if any."""
        root = self.info.get("final_rung_dir")
        if not root:
            return None
        folder = Path(root) / identity_digest(identity)
        try:
            st = read_state(folder)
        except ValueError:
            return None
        return folder if st is not None and st.get("complete") and st.get("identity") == identity else None

    # ------------------------------------------------------------------ export
    def export(self, path: str | Path, *, merge: bool = False) -> Path:
        """Write the trained model of :meth:`train` as a deployable folder (see :mod:`autoqra.artifact.export`).

        ``merge=True`` folds the adapter into the base (16-bit layers exactly, HQQ layers by
        re-quantization) and records the held-out loss before and after in ``autoqra.json``.
        Returns the path of ``autoqra.json``.
        """
        if self.final is None:
            raise ValueError("nothing to export yet: call result.train() first (or `autoqra train --run ...`)")
        fm = self.final
        ev, a = fm.evaluator, fm.trial.assignment
        mm = MemoryModel(ev.model, ev.space, ev.backend, train=ev.train)
        info: dict[str, Any] = {
            "assignment": a.to_dict(), "space": self.space.spec(), "budget_bytes": self.budget_bytes,
            "target": self.target, "trial": fm.trial.to_dict(), "train": ev.train.to_dict(), "final_steps": fm.steps,
            "scores": {"search_score": fm.trial.score, **fm.metrics}, "eval": ev.spec(),
        }
        model = fm.model
        if merge:
            model = merge_adapter(fm.model, ev.backend)
            merged = ev.score(model)[1]
            info["merge"] = {"loss_adapter": fm.metrics["test_loss"], "loss_merged": merged["loss"],
                             "delta": merged["loss"] - fm.metrics["test_loss"],
                             "exact": all(b == 16 for b in a.bits) or ev.backend.name == "none"}
            a = type(a)(a.units, a.bits, [0] * len(a.ranks))
        info["memory"] = {"predicted": mm.predict(a).to_dict()}
        tok = fm.tokenizer
        if tok is None:
            tok = ByteTokenizer(ev.model.config.vocab_size)
        return export_model(model, path, ev.backend, tokenizer=tok, info=info)

    def report(self, path: str | Path | None = None) -> Path:
        """Write PNG plots and a self-contained ``report.html`` (default ``<run_dir>/report``); returns its path."""
        if path is None:
            if self.run_dir is None:
                raise ValueError("give a folder: this result was never saved")
            path = self.run_dir / "report"
        # the one deferred internal import: reports need matplotlib (~0.9 s to import), searches do not
        from autoqra.report.html import write_report

        return write_report(self, path)

    def to_peft_config(self, trial: Trial | None = None, **kw: Any):
        """peft ``LoraConfig`` (``rank_pattern``/``alpha_pattern``/``exclude_modules``) of the chosen point."""
        t = trial or self.best
        if t is None:
            raise ValueError("this result has no feasible point")
        train = self.config.get("train", {})
        alpha, fixed = train.get("lora_alpha_ratio", 2.0), train.get("lora_alpha")
        dropout = train.get("lora_dropout", 0.05)
        return self.space.lora_config(t.assignment, alpha_ratio=alpha, dropout=dropout, alpha=fixed, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "budget_bytes": self.budget_bytes, "target": self.target, "space": self.space.to_dict(),
            "config": self.config, "info": _jsonable(self.info),
            "best": self.best.to_dict() if self.best else None,
            "pareto": [t.key for t in self.pareto], "baselines": {k: t.key for k, t in self.baselines.items()},
            "history": [t.to_dict() for t in self.history],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        if d.get("format") != FORMAT:
            raise ValueError(f"not an autoqra result (format {d.get('format')!r}, expected {FORMAT!r})")
        hist = [Trial.from_dict(t) for t in d["history"]]
        by_key = {t.key: t for t in hist}
        return cls(
            best=Trial.from_dict(d["best"]) if d["best"] else None,
            pareto=[by_key[k] for k in d["pareto"]],
            baselines={name: attrs.evolve(by_key[k], name=name) for name, k in d["baselines"].items()},
            history=hist, budget_bytes=int(d["budget_bytes"]), target=d["target"],
            space=space_from_spec(d["space"]), config=d["config"], info=d["info"],
        )

    def save(self, path: str | Path) -> Path:
        """Write ``<path>/result.json`` (JSON only); returns the file path."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        f = p / RESULT_FILE
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        tmp.replace(f)
        self.run_dir = p
        return f

    def summary(self) -> str:
        """Human-readable lines: chosen point vs baselines."""
        lines = [f"budget: {self.budget_bytes:,} bytes on {self.target} bytes"]
        cov = self.space.coverage
        if cov is not None:  # the share of decoder weights the search could quantize
            lines.append(cov.line())
            if cov.warning():
                lines.append("warning: " + cov.warning())
        fc = self.info.get("formats")
        if fc:  # the group size each bit-width was stored with, when the search chose them
            sizes = {int(b): g for b, g in fc["group_sizes"].items()}
            ladder = [b for b in self.space.bits if b in sizes]
            lines.append("formats (chosen for this model): " + ", ".join(f"{b}-bit in groups of {sizes[b]}"
                                                                         for b in ladder))
        rows = [("AutoQRA (chosen)", self.best)] if self.best else []
        ukey = self.info.get("best_utility_key")
        if ukey and self.best and ukey != self.best.key:
            alpha = self.config.get("alpha", 0.6)
            rows += [(f"AutoQRA best utility (alpha={alpha})", t) for t in self.history if t.key == ukey][:1]
        rows += list(self.baselines.items())
        for name, t in rows:
            mem = t.memory.bytes_for(self.target)
            lines.append(f"  {name:<34} score {t.score:+.4f}  {mem / 1e6:9.2f} MB  "
                         f"({'within' if mem <= self.budget_bytes else 'OVER'} budget)")
        fr = self.info.get("final_rung") or []
        if fr:
            steps = self.config.get("final_steps") or OptimizeConfig.from_dict(self.config).resolved("final_steps")
            lines.append(f"final rung (the final recipe, {steps} steps; validation score, mean over training seeds):")
            chosen = self.best.assignment.to_dict() if self.best else None
            for e in sorted(fr, key=lambda e: -(e["val_score"] if e["val_score"] is not None else -math.inf)):
                mark = "  <- chosen" if e["assignment"] == chosen else ""
                val = f"{e['val_score']:+.4f}" if e["val_score"] is not None else "failed"
                lines.append(f"  {e['label']:<34} final {val}  (top rung {e['top_rung_score']:+.4f}){mark}")
        if self.best:
            lines.append("chosen per-unit bits/ranks: " + self.best.assignment.short())
        return "\n".join(lines)


def load_result(path: str | Path) -> Result:
    """Load a result saved by :meth:`Result.save` (a directory or the ``result.json`` file)."""
    p = Path(path)
    f = p / RESULT_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no autoqra result at {f}")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None
    res = Result.from_dict(d)
    res.run_dir = f.parent
    return res


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "tolist"):
        return x.tolist()
    return x
