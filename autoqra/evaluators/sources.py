r"""Where fine-tuning texts come from: sources, splits and the stable hash every seeded choice uses.

The low-level half of the data API, imported by :mod:`.packing` (tokenising, batches), :mod:`.tasks.build`
(the packaged pydoc tasks) and :mod:`.data` (the public facade, which re-exports everything here); it
imports none of them.

Everything is deterministic: splits come from SHA-256 (:func:`stable_hash`), never from Python's randomised
``hash()``. Nothing is downloaded (``datasets`` runs with the offline flags set).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

from autoqra._optional import require

SPLITS = ("train", "validation", "test")
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PYDOC_SPLIT_FILE = TASKS_DIR / "pydoc_split.json"
_HF_SUFFIX = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}


def stable_hash(*parts: object) -> int:
    """A 63-bit integer from SHA-256 of the parts' ``str`` forms (same on every run and platform)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class TextSplits:
    """Raw texts per split; ``groups`` names the topic/record of each text where known."""

    train: list[str]
    validation: list[str]
    test: list[str]
    groups: dict[str, list[str]] = field(default_factory=dict)

    def __getitem__(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; allowed: {SPLITS}")
        return getattr(self, split)

    def sizes(self) -> dict[str, dict[str, int]]:
        """``{split: {"texts": n, "chars": n}}``."""
        return {s: {"texts": len(self[s]), "chars": sum(map(len, self[s]))} for s in SPLITS}


def split_groups(
    sizes: Mapping[str, int], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[str]]:
    """Deterministic size-capped split of named groups (topics or records) into train/validation/test.

    Groups are visited in the order of ``stable_hash(seed, name)`` (ties by name); each goes to test while
    it fits under ``fractions[2]`` of the total size, else to validation under ``fractions[1]``, else to
    train. A split with a positive fraction that stays empty receives the smallest train group.

    Returns:
        ``{split: sorted group names}``.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be 3 numbers >= 0 summing to 1, got {tuple(fractions)}")
    total = sum(sizes.values())
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    fill = dict.fromkeys(SPLITS, 0)
    caps = {s: f * total for s, f in zip(SPLITS, fractions)}
    for name in sorted(sizes, key=lambda n: (stable_hash("split", seed, n), n)):
        fits = [s for s in ("test", "validation") if fill[s] + sizes[name] <= caps[s]]
        dest = fits[0] if fits else "train"
        out[dest].append(name)
        fill[dest] += sizes[name]
    for s in ("test", "validation"):
        if caps[s] > 0 and not out[s] and len(out["train"]) > 1:
            smallest = min(out["train"], key=lambda n: (sizes[n], n))
            out["train"].remove(smallest)
            out[s].append(smallest)
    return {s: sorted(v) for s, v in out.items()}


def _carve(texts: Sequence[str], fractions: Sequence[float], seed: int, what: str) -> TextSplits:
    """Split a flat list of texts by record (``split_groups`` over record indices)."""
    needed = sum(f > 0 for f in fractions)
    if len(texts) < needed:
        raise ValueError(f"{what}: {len(texts)} record(s) cannot be split into {needed} non-empty splits")
    keys = {f"{i:08d}": len(t) + 1 for i, t in enumerate(texts)}
    g = split_groups(keys, fractions, seed)
    return TextSplits(*([texts[int(k)] for k in g[s]] for s in SPLITS), groups=g)


def load_text_task(
    name: str = "pydoc", seed: int | None = None, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> TextSplits:
    """The embedded Python-documentation task (``pydoc_data.topics``, ships with CPython), split by topic.

    Args:
        name: only ``"pydoc"``.
        seed: ``None`` uses the split pinned in ``tasks/pydoc_split.json`` (the one the packaged MC task
            was built from, stable across Python versions); an int recomputes it with :func:`split_groups`.
        fractions: train/validation/test fractions of characters (only with an int ``seed``).
    """
    if name != "pydoc":
        raise ValueError(f"unknown embedded task {name!r}; allowed: ['pydoc']")
    if seed is None and PYDOC_SPLIT_FILE.exists():
        pinned = json.loads(PYDOC_SPLIT_FILE.read_text())
        held = {s: [t for t in pinned[s] if t in topics] for s in ("validation", "test")}
        taken = set(held["validation"]) | set(held["test"])
        g = {"train": sorted(t for t in topics if t not in taken), **held}
    else:
        g = split_groups({t: len(v) for t, v in topics.items()}, fractions, 0 if seed is None else seed)
    return TextSplits(*([topics[t] for t in g[s]] for s in SPLITS), groups=g)


def format_instruction(instruction: str, input: str = "", output: str = "") -> str:  # noqa: A002
    """Alpaca template; the ``### Input:`` section is omitted when ``input`` is empty."""
    parts = [f"### Instruction:\n{instruction}"]
    if input and input.strip():
        parts.append(f"### Input:\n{input}")
    parts.append(f"### Response:\n{output}")
    return "\n\n".join(parts)


def read_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(location, record)`` for each record of a JSON Lines file (or a ``.json`` file holding one array).

    ``location`` is ``"line N"`` (JSON Lines) or ``"record N"`` (array), for error messages.

    Raises:
        FileNotFoundError: no such file. ValueError: invalid JSON, a non-object record, or no records.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = [(f"record {i}", r) for i, r in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    else:
        rows = []
        for ln, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append((f"line {ln}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}: line {ln}: invalid JSON ({e.msg} at column {e.colno})") from None
    for where, rec in rows:
        if not isinstance(rec, dict):
            raise ValueError(f"{p}: {where}: expected a JSON object, got {type(rec).__name__}")
    if not rows:
        raise ValueError(f"{p}: empty dataset (no records)")
    return rows


def _field(rec: Mapping[str, Any], key: str, where: str, required: bool = True) -> str:
    if key not in rec:
        if not required:
            return ""
        raise ValueError(f"{where}: missing field {key!r}; fields present: {sorted(rec)}")
    val = rec[key]
    if val is None and not required:
        return ""
    if not isinstance(val, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(val).__name__}")
    return val


def jsonl_texts(path: str | Path, kind: str = "auto", text_field: str = "text") -> list[str]:
    """Texts of a JSONL file.

    Args:
        kind: ``"text"`` reads ``text_field``; ``"instruction"`` formats ``instruction``/``input``/``output``
            with :func:`format_instruction`; ``"auto"`` picks by the first record's fields.
    """
    rows = read_jsonl(path)
    if kind == "auto":
        kind = "instruction" if "instruction" in rows[0][1] and text_field not in rows[0][1] else "text"
    if kind == "text":
        return [_field(r, text_field, f"{path}: {ln}") for ln, r in rows]
    if kind == "instruction":
        return [
            format_instruction(
                _field(r, "instruction", f"{path}: {ln}"),
                _field(r, "input", f"{path}: {ln}", required=False),
                _field(r, "output", f"{path}: {ln}"),
            )
            for ln, r in rows
        ]
    raise ValueError(f"unknown JSONL kind {kind!r}; allowed: ['auto', 'text', 'instruction']")


def load_hf_texts(name_or_path: str, text_field: str = "text") -> dict[str, list[str]]:
    """``{split: texts}`` from ``datasets.load_dataset`` (offline): a local file, directory or cached name."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    datasets = require("datasets", "data source 'datasets:...'")

    p = Path(name_or_path)
    if p.suffix.lower() in _HF_SUFFIX:
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
        dd = datasets.load_dataset(_HF_SUFFIX[p.suffix.lower()], data_files=str(p.resolve()))
    else:
        dd = datasets.load_dataset(name_or_path)
    out = {}
    for split, ds in dd.items():
        if text_field not in ds.column_names:
            raise ValueError(f"{name_or_path} [{split}]: missing field {text_field!r}; "
                             f"fields present: {sorted(ds.column_names)}")
        out[split] = [t or "" for t in ds[text_field]]
    if not any(out.values()):
        raise ValueError(f"{name_or_path}: empty dataset (no records)")
    return out


def _from_split_dict(
    d: Mapping[str, list[str]], fractions: Sequence[float], seed: int, what: str
) -> TextSplits:
    alias = {"valid": "validation", "val": "validation", "dev": "validation"}
    d = {alias.get(k, k): v for k, v in d.items() if v}
    if all(s in d for s in SPLITS):
        return TextSplits(d["train"], d["validation"], d["test"])
    pool = d.get("train") or [t for v in d.values() for t in v]
    want = [fractions[0]] + [0.0 if s in d else f for s, f in zip(SPLITS[1:], fractions[1:])]
    parts = _carve(pool, [w / sum(want) for w in want], seed, what)
    return TextSplits(parts.train, d.get("validation", parts.validation), d.get("test", parts.test))


Source = str | Path | TextSplits | Sequence[str]


def load_texts(
    source: Source = "pydoc", *, kind: str = "auto", text_field: str = "text", seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> TextSplits:
    """Resolve a data source into :class:`TextSplits`.

    Args:
        source: ``"pydoc"`` (embedded default); a ``.jsonl``/``.json`` lines file (``text_field`` or Alpaca
            ``instruction``/``input``/``output``); ``"datasets:<name or path>"`` or any other name/directory
            for ``datasets.load_dataset`` (offline); a :class:`TextSplits`; or a list of texts.
        kind: ``"auto"``, ``"pydoc"``, ``"text"``, ``"instruction"`` or ``"datasets"``.
        seed: seed of the split of data that has no splits of its own (a record-level, size-capped split).
        fractions: train/validation/test fractions for such data.
    """
    kinds = ("auto", "pydoc", "text", "instruction", "datasets")
    if kind not in kinds:
        raise ValueError(f"unknown data kind {kind!r}; allowed: {list(kinds)}")
    if isinstance(source, TextSplits):
        return source
    if not isinstance(source, (str, Path)):
        return _carve(list(source), fractions, seed, "texts")
    src = str(source)
    if kind == "auto":
        if src == "pydoc":
            kind = "pydoc"
        elif src.startswith("datasets:"):
            kind, src = "datasets", src[len("datasets:"):]
        elif Path(src).suffix.lower() in (".jsonl", ".json"):
            kind = "auto-jsonl"
        else:
            kind = "datasets"
    if kind == "pydoc":
        return load_text_task("pydoc")
    if kind == "datasets":
        return _from_split_dict(load_hf_texts(src, text_field), fractions, seed, src)
    texts = jsonl_texts(src, "auto" if kind == "auto-jsonl" else kind, text_field)
    return _carve(texts, fractions, seed, src)
