r"""Search results: ``Trial``, ``Result`` (Pareto front, chosen point, baselines, history), save/load."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import attrs

from autoqra.evaluators.base import EvalResult, Fidelity
from autoqra.memory import MemoryBreakdown
from autoqra.space import Assignment, SearchSpace, Unit

RESULT_FILE = "result.json"
FORMAT = "autoqra.result/1"


@attrs.frozen
class Trial:
    """One evaluated candidate.

    Attributes:
        assignment: per-unit bits and ranks.
        fidelity: training it got (optimizer steps).
        phase: ``"baseline" | "phase1" | "phase2"``.
        result: score, metrics, status, measured memory, seconds.
        memory: predicted breakdown (bytes).
        key: trial-store key.
        name: label (baselines: ``"uniform-4bit-r16"``...).
    """

    assignment: Assignment
    fidelity: Fidelity
    phase: str
    result: EvalResult
    memory: MemoryBreakdown
    key: str = ""
    name: str = ""

    @property
    def score(self) -> float:
        return self.result.score

    def to_dict(self) -> dict[str, Any]:
        return {"assignment": self.assignment.to_dict(), "fidelity": self.fidelity.to_dict(), "phase": self.phase,
                "result": self.result.to_dict(), "memory": self.memory.to_dict(), "key": self.key, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trial:
        return cls(Assignment.from_dict(d["assignment"]), Fidelity.from_dict(d["fidelity"]), d["phase"],
                   EvalResult.from_dict(d["result"]), MemoryBreakdown.from_dict(d["memory"]), d.get("key", ""),
                   d.get("name", ""))

    @classmethod
    def from_store(cls, t: dict[str, Any], name: str = "") -> Trial:
        return cls(t["assignment"], t["fidelity"], t["phase"], t["result"],
                   MemoryBreakdown.from_dict(t.get("predicted_memory") or {}), t["key"], name)


def space_from_spec(spec: dict[str, Any]) -> SearchSpace:
    units = tuple(Unit(n, tuple(mods), tuple(tuple(s) for s in shapes)) for n, mods, shapes in spec["units"])
    return SearchSpace(units=units, bits=tuple(spec["bits"]), ranks=tuple(spec["ranks"]), granularity=spec["granularity"])


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

    def to_peft_config(self, trial: Trial | None = None, **kw: Any):
        """peft ``LoraConfig`` (``rank_pattern``/``alpha_pattern``/``exclude_modules``) of the chosen point."""
        t = trial or self.best
        if t is None:
            raise ValueError("this result has no feasible point")
        alpha = self.config.get("train", {}).get("lora_alpha_ratio", 2.0)
        dropout = self.config.get("train", {}).get("lora_dropout", 0.05)
        return self.space.lora_config(t.assignment, alpha_ratio=alpha, dropout=dropout, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "budget_bytes": self.budget_bytes, "target": self.target, "space": self.space.spec(),
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
        return f

    def summary(self) -> str:
        """Human-readable lines: chosen point vs baselines."""
        lines = [f"budget: {self.budget_bytes:,} bytes on {self.target} bytes"]
        rows = [("AutoQRA (chosen)", self.best)] if self.best else []
        ukey = self.info.get("best_utility_key")
        if ukey and self.best and ukey != self.best.key:
            alpha = self.config.get("alpha", 0.6)
            rows += [(f"AutoQRA best utility (alpha={alpha})", t) for t in self.history if t.key == ukey][:1]
        rows += list(self.baselines.items())
        for name, t in rows:
            mem = t.memory.model_bytes if self.target == "model" else t.memory.train_bytes
            lines.append(f"  {name:<34} score {t.score:+.4f}  {mem / 1e6:9.2f} MB  "
                         f"({'within' if mem <= self.budget_bytes else 'OVER'} budget)")
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
    return Result.from_dict(d)


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
