r"""SQLite trial store: every evaluated trial, durable the moment :meth:`TrialStore.put` returns.

Trials are real fine-tunes, so they must never be lost or recomputed. A trial is keyed by
:func:`trial_key`, a SHA-256 of the *configuration* (assignment, fidelity steps, evaluator spec,
backend spec, model fingerprint), so a resumed run finds what it already paid for.

One SQLite file (WAL journal, ``synchronous=FULL``, busy timeout so several processes may append).
The header carries ``application_id`` :data:`APP_ID` and ``user_version`` :data:`SCHEMA_VERSION`;
any other file (not SQLite, another app's database, a corrupt or truncated store) is refused with
a ``ValueError`` and left untouched. Values are JSON only (Python's ``json``: ``-inf``/``nan`` are
written as ``-Infinity``/``NaN``), never pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autoqra.evaluators.base import EvalResult, Fidelity
from autoqra.fingerprint import model_fingerprint
from autoqra.memory.model import MemoryBreakdown
from autoqra.space import Assignment
from autoqra.trial import Trial

__all__ = ["APP_ID", "SCHEMA_VERSION", "TrialStore", "model_fingerprint", "trial_key"]

APP_ID = 0x41515241  # "AQRA"
SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
_NOT_MODIFIED = "it was NOT modified"
_SCHEMA = """
CREATE TABLE trials (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE,
    assignment_json TEXT NOT NULL, fidelity_json TEXT NOT NULL, fidelity_name TEXT NOT NULL,
    phase TEXT NOT NULL, status TEXT NOT NULL, score REAL, result_json TEXT NOT NULL,
    predicted_memory_json TEXT, measured_memory_json TEXT, seconds REAL NOT NULL, seed INTEGER,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, extra_json TEXT NOT NULL);
CREATE INDEX trials_phase ON trials(phase);
CREATE TABLE meta (key TEXT PRIMARY KEY, value_json TEXT NOT NULL);
CREATE TABLE blobs (name TEXT PRIMARY KEY, value_json TEXT NOT NULL, updated_at TEXT NOT NULL);
"""
_COLS = ("key", "assignment_json", "fidelity_json", "fidelity_name", "phase", "status", "score",
         "result_json", "predicted_memory_json", "measured_memory_json", "seconds", "seed",
         "created_at", "updated_at", "extra_json")
_UPDATE = ", ".join(f"{c}=excluded.{c}" for c in _COLS if c not in ("key", "created_at"))


def _canon(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, ASCII, finite numbers only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON-serializable (the trial store keeps JSON only)")


def _dumps(obj: Any) -> str | None:
    """JSON for storage (``None`` stays SQL NULL); numpy scalars/arrays become plain numbers/lists."""
    return None if obj is None else json.dumps(obj, sort_keys=True, default=_json_default)


def _loads(s: str | None) -> Any:
    return None if s is None else json.loads(s)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def trial_key(assignment: Assignment, fidelity: Fidelity, evaluator_spec: dict[str, Any],
              backend_spec: dict[str, Any], model_fingerprint: str) -> str:
    """Key of one trial: hex SHA-256 of the canonical JSON of its configuration.

    The hashed document is ``{"v": 1, "assignment": {units, bits, ranks}, "fidelity_steps": int,
    "evaluator": evaluator_spec, "backend": backend_spec, "model": model_fingerprint}`` dumped with
    sorted keys, ``(",", ":")`` separators and ASCII escapes. Only the fidelity's *steps* enter
    the key (its name is a label), and the seed only through ``evaluator_spec``.

    Raises:
        ValueError: a spec is not JSON-able or holds a non-finite float.
    """
    doc = {"v": 1, "assignment": assignment.to_dict(), "fidelity_steps": int(fidelity.steps),
           "evaluator": evaluator_spec, "backend": backend_spec, "model": str(model_fingerprint)}
    try:
        text = _canon(doc)
    except (TypeError, ValueError) as e:
        raise ValueError(f"trial_key needs JSON-able specs with finite numbers: {e}") from e
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _diff(prefix: str, old: Any, new: Any) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(f"{prefix}.{k}", old.get(k, "<missing>"), new.get(k, "<missing>"))
        return out
    o, n = (json.dumps(x, sort_keys=True, default=str) for x in (old, new))
    return [] if o == n else [f"{prefix}: stored {o[:120]} != new {n[:120]}"]


class TrialStore:
    """Durable store of trials, run metadata and JSON blobs in one SQLite file.

    Args:
        path: database file (parent directories are created), or ``None`` for an in-memory store.

    Raises:
        ValueError: ``path`` is a directory, not SQLite, another application's SQLite database, a
            store of a newer schema, or corrupt/truncated. The file is never modified in that case.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path).expanduser()
        self._lock = threading.RLock()
        existing = self.path is not None and self.path.exists() and self._precheck(self.path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        target = ":memory:" if self.path is None else str(self.path)
        self._conn = sqlite3.connect(target, timeout=60.0, isolation_level=None, check_same_thread=False)
        try:
            self._conn.execute("PRAGMA busy_timeout=60000")
            if existing:
                rows = self._conn.execute("PRAGMA quick_check").fetchall()
                if rows != [("ok",)]:
                    raise sqlite3.DatabaseError("; ".join(str(r[0]) for r in rows[:3]))
            self._init_schema()
            if self.path is not None:
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise ValueError(f"{self.path} is not a readable autoqra trial store ({e}); {_NOT_MODIFIED}") from e
        except BaseException:
            self._conn.close()
            raise

    @staticmethod
    def _precheck(path: Path) -> bool:
        """Validate an existing file from its raw header bytes; True when it is a non-empty store."""
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not a trial store file; {_NOT_MODIFIED}")
        with open(path, "rb") as f:
            head = f.read(100)
        if not head:
            return False
        if len(head) < 100 or not head.startswith(_SQLITE_MAGIC):
            kind = "a truncated SQLite file" if head.startswith(_SQLITE_MAGIC[: len(head)]) else "not SQLite"
            raise ValueError(f"{path} is {kind}, not an autoqra trial store; {_NOT_MODIFIED}")
        app_id, version = int.from_bytes(head[68:72], "big"), int.from_bytes(head[60:64], "big")
        if app_id != APP_ID:
            raise ValueError(f"{path} is a SQLite database of another application (application_id="
                             f"{app_id:#x}, expected {APP_ID:#x}), not an autoqra trial store; {_NOT_MODIFIED}")
        if version > SCHEMA_VERSION:
            raise ValueError(f"{path} is a trial store of schema {version}; this autoqra reads <= "
                             f"{SCHEMA_VERSION}; upgrade autoqra. {_NOT_MODIFIED}")
        return True

    def _init_schema(self) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            app_id = c.execute("PRAGMA application_id").fetchone()[0]
            version = c.execute("PRAGMA user_version").fetchone()[0]
            n_tables = c.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0 and n_tables == 0:
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    c.execute(stmt)
                c.execute(f"PRAGMA application_id={APP_ID}")
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif app_id != APP_ID or version != SCHEMA_VERSION:
                raise ValueError(f"{self.path} is a SQLite database with application_id={app_id:#x}, "
                                 f"user_version={version}; expected an autoqra trial store ({APP_ID:#x}, "
                                 f"{SCHEMA_VERSION}); {_NOT_MODIFIED}")
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TrialStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _exec(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-able ``value`` of the run (config, space, backend...) under ``key``."""
        self._exec("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value_json=excluded.value_json",
                   (key, _dumps(value)))

    def meta(self) -> dict[str, Any]:
        """All meta values, decoded."""
        return {k: json.loads(v) for k, v in self._exec("SELECT key, value_json FROM meta ORDER BY key")}

    def check_compatible(self, meta: dict[str, Any], record: bool = True) -> None:
        """Refuse to reuse this store for a different problem.

        Each key of ``meta`` already stored must hold an equal value (compared as canonical JSON,
        nested dicts field by field). Keys not yet stored are recorded when ``record`` is true.

        Raises:
            ValueError: naming every differing field with the stored and the new value.
        """
        stored = self.meta()
        diffs = [d for k, v in sorted(meta.items()) if k in stored for d in _diff(k, stored[k], v)]
        if diffs:
            raise ValueError(f"trial store {self.path or ':memory:'} was made for a different problem; "
                             "use another store path or the same settings. Differing fields:\n  "
                             + "\n  ".join(diffs))
        if record:
            for k, v in meta.items():
                if k not in stored:
                    self.set_meta(k, v)

    def put(self, trial: Trial) -> None:
        """Insert or update one trial, committed (fsync'd) before returning.

        Args:
            trial: a :class:`~autoqra.trial.Trial` (``key`` from :func:`trial_key`; ``memory`` = the
                predicted breakdown; ``measured_memory`` defaults to ``result.memory``, ``seconds`` to
                ``result.seconds``). Re-putting a key overwrites it but keeps its ``seq`` and ``created_at``.
        """
        if not isinstance(trial, Trial):
            raise TypeError(f"TrialStore.put takes an autoqra.Trial, not {type(trial).__name__}")
        if not trial.key:
            raise ValueError("TrialStore.put: the trial has no key (use trial_key())")
        res, now = trial.result, _now()
        measured = trial.measured_memory if trial.measured_memory is not None else (res.memory or None)
        predicted = None if trial.memory == MemoryBreakdown() else trial.memory.to_dict()
        row = (trial.key, trial.assignment.to_json(), _dumps(trial.fidelity.to_dict()), trial.fidelity.name,
               trial.phase, res.status, float(res.score) if math.isfinite(res.score) else None, _dumps(res.to_dict()),
               _dumps(predicted), _dumps(measured), float(res.seconds if trial.seconds is None else trial.seconds),
               None if trial.seed is None else int(trial.seed), now, now, _dumps(trial.extra or {}))
        self._exec(f"INSERT INTO trials ({', '.join(_COLS)}) VALUES ({', '.join('?' * len(_COLS))}) "
                   f"ON CONFLICT(key) DO UPDATE SET {_UPDATE}", row)

    @staticmethod
    def _decode(r: sqlite3.Row) -> Trial:
        pm = _loads(r["predicted_memory_json"])
        return Trial(
            Assignment.from_json(r["assignment_json"]), Fidelity.from_dict(json.loads(r["fidelity_json"])),
            r["phase"], EvalResult.from_dict(json.loads(r["result_json"])), MemoryBreakdown.from_dict(pm or {}),
            r["key"], seq=r["seq"], seed=r["seed"], seconds=r["seconds"],
            measured_memory=_loads(r["measured_memory_json"]), extra=json.loads(r["extra_json"]),
            created_at=r["created_at"], updated_at=r["updated_at"])

    @staticmethod
    def _where(**conds: str | None) -> tuple[str, tuple]:
        conds = {k: v for k, v in conds.items() if v is not None}
        return (" WHERE " + " AND ".join(f"{k}=?" for k in conds) if conds else ""), tuple(conds.values())

    def _select(self, **conds: str | None) -> list[sqlite3.Row]:
        where, args = self._where(**conds)
        with self._lock:
            cur = self._conn.cursor()
            cur.row_factory = sqlite3.Row
            return cur.execute(f"SELECT * FROM trials{where} ORDER BY seq", args).fetchall()

    def get(self, key: str) -> Trial | None:
        """The stored trial of ``key``, or ``None``."""
        rows = self._select(key=key)
        return self._decode(rows[0]) if rows else None

    def has(self, key: str) -> bool:
        """Whether a trial with ``key`` is stored."""
        return bool(self._exec("SELECT 1 FROM trials WHERE key=?", (key,)))

    def trials(self, phase: str | None = None, fidelity_name: str | None = None,
               status: str | None = None) -> list[Trial]:
        """Stored trials in insertion order (``seq``), optionally filtered (all filters ANDed)."""
        rows = self._select(phase=phase, fidelity_name=fidelity_name, status=status)
        return [self._decode(r) for r in rows]

    def __len__(self) -> int:
        """Number of stored trials."""
        return int(self._exec("SELECT count(*) FROM trials")[0][0])

    def summary(self) -> dict[str, Any]:
        """``{"total", "seconds", "by_phase", "by_fidelity", "by_status"}`` (counts; seconds summed)."""
        out: dict[str, Any] = {"total": 0, "seconds": 0.0}
        for col, name in (("phase", "by_phase"), ("fidelity_name", "by_fidelity"), ("status", "by_status")):
            out[name] = dict(self._exec(f"SELECT {col}, count(*) FROM trials GROUP BY {col} ORDER BY {col}"))
        total, secs = self._exec("SELECT count(*), coalesce(sum(seconds), 0) FROM trials")[0]
        out.update(total=total, seconds=float(secs))
        return out

    def put_blob(self, name: str, value: Any) -> None:
        """Store a JSON-able ``value`` (importance priors, searcher state...) under ``name``, durably."""
        self._exec("INSERT INTO blobs VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                   "value_json=excluded.value_json, updated_at=excluded.updated_at",
                   (name, _dumps(value), _now()))

    def get_blob(self, name: str, default: Any = None) -> Any:
        """Decoded blob ``name``, or ``default``."""
        rows = self._exec("SELECT value_json FROM blobs WHERE name=?", (name,))
        return json.loads(rows[0][0]) if rows else default
