r"""``Trial``: one evaluated candidate, the record the trial store writes and reads and a result holds.

A trial is identified by its ``key`` (:func:`autoqra.store.trial_key`, a hash of the configuration).
``memory`` is the memory model's *predicted* breakdown (bytes; all zeros when none was recorded);
``measured_memory`` is what the evaluator measured on live tensors (``result.memory``). Store-side
bookkeeping (``seq``, ``seed``, ``seconds``, timestamps, ``extra``) is carried along but not written to
``result.json`` (its format is unchanged).
"""

from __future__ import annotations

from typing import Any

import attrs

from autoqra.evaluators.base import EvalResult, Fidelity
from autoqra.memory.model import MemoryBreakdown
from autoqra.space import Assignment

_EMPTY = MemoryBreakdown()


@attrs.frozen
class Trial:
    """One evaluated candidate.

    Attributes:
        assignment: per-unit bits and ranks.
        fidelity: training it got (optimizer steps).
        phase: ``"baseline" | "phase1" | "phase2" | "final"``... (the run's phase that asked for it).
        result: score, metrics, status, measured memory, seconds.
        memory: predicted breakdown (bytes).
        key: trial-store key.
        name: label (baselines: ``"uniform-4bit-r16"``...).
        seq: insertion order in the store (None before it is stored).
        seed: the run's seed; seconds: wall seconds of the evaluation (default ``result.seconds``).
        measured_memory: measured bytes (default ``result.memory``); extra: JSON-able bookkeeping
            (generation, budget, worker); created_at / updated_at: ISO timestamps (UTC) in the store.
    """

    assignment: Assignment
    fidelity: Fidelity
    phase: str
    result: EvalResult
    memory: MemoryBreakdown = _EMPTY
    key: str = ""
    name: str = ""
    seq: int | None = None
    seed: int | None = None
    seconds: float | None = None
    measured_memory: dict[str, Any] | None = None
    extra: dict[str, Any] = attrs.Factory(dict)
    created_at: str = ""
    updated_at: str = ""

    @property
    def score(self) -> float:
        """The evaluator's score (higher is better; ``-inf`` unless ``status`` is ``"ok"``)."""
        return self.result.score

    @property
    def status(self) -> str:
        return self.result.status

    @property
    def ok(self) -> bool:
        return self.result.ok

    def to_dict(self) -> dict[str, Any]:
        """The ``result.json`` form (assignment, fidelity, phase, result, memory, key, name)."""
        return {"assignment": self.assignment.to_dict(), "fidelity": self.fidelity.to_dict(), "phase": self.phase,
                "result": self.result.to_dict(), "memory": self.memory.to_dict(), "key": self.key, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trial:
        return cls(Assignment.from_dict(d["assignment"]), Fidelity.from_dict(d["fidelity"]), d["phase"],
                   EvalResult.from_dict(d["result"]), MemoryBreakdown.from_dict(d["memory"]), d.get("key", ""),
                   d.get("name", ""))
