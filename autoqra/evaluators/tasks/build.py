"""Generator of the packaged pydoc tasks: the pinned topic split and the multiple-choice lm-eval task.

Regenerate the committed files with ``python -m autoqra.evaluators.tasks``. Items come only from the
held-out test topics; distractors come from *other test topics*, so fine-tuning on the train topics never
sees any candidate text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

from autoqra.evaluators.sources import PYDOC_SPLIT_FILE, TASKS_DIR, split_groups, stable_hash
from autoqra.models import cache_dir

log = logging.getLogger(__name__)

TASK_NAME = "pydoc_mc"
MC_JSONL = TASKS_DIR / f"{TASK_NAME}.jsonl"
MC_TEMPLATE = TASKS_DIR / f"{TASK_NAME}.yaml"
DATA_PLACEHOLDER = "__AUTOQRA_DATA_FILE__"
_UNDERLINE = re.compile(r"^\s*([*=\-~^#])\1{2,}\s*$", re.MULTILINE)
_PROSE = re.compile(r"^[\"(]?[A-Za-z][a-z]*[\")]?[.,;:]?$")


def normalize(text: str) -> list[str]:
    """Words of a pydoc topic: heading underlines removed, all whitespace collapsed."""
    return _UNDERLINE.sub(" ", text).split()


def prose_ratio(words: list[str]) -> float:
    """Fraction of plain-English-looking words (filters out tables and grammar blocks)."""
    return sum(bool(_PROSE.match(w)) for w in words) / max(1, len(words))


def source_fingerprint() -> str:
    """SHA-256 (hex, 16 chars) of the running Python's ``pydoc_data.topics``."""
    return hashlib.sha256(json.dumps(topics, sort_keys=True).encode()).hexdigest()[:16]


def make_mc_items(
    texts: Mapping[str, str], n_items: int = 150, prefix_words: int = 48, cont_words: int = 16,
    stride: int | None = None, min_prose: float = 0.7, seed: int = 0,
) -> list[dict[str, Any]]:
    """Multiple-choice items: a passage prefix and 4 continuations of ``cont_words`` words each.

    The true continuation is the next ``cont_words`` words of the same topic; the 3 distractors are
    windows of the same length from 3 different other topics. Item windows start every ``stride`` words
    (default half a window) and, like distractors, must have a :func:`prose_ratio` of at least
    ``min_prose``. Item choice, distractor positions and the answer index all come from ``stable_hash``.

    Args:
        texts: ``{topic: text}``, at least 4 topics.

    Returns:
        Rows ``{"id", "topic", "context", "choices", "answer", "sources"}`` in a seeded (hash) order.
    """
    words = {t: normalize(v) for t, v in sorted(texts.items())}
    if len(words) < 4:
        raise ValueError(f"need at least 4 topics for 4 choices, got {len(words)}")
    span, step = prefix_words + cont_words, stride or (prefix_words + cont_words) // 2
    windows = [(t, s) for t, w in words.items() for s in range(0, len(w) - span + 1, step)
               if prose_ratio(w[s : s + span]) >= min_prose]
    pool = {t: [s for s in range(len(w) - cont_words + 1) if prose_ratio(w[s : s + cont_words]) >= min_prose]
            for t, w in words.items()}
    windows.sort(key=lambda x: stable_hash("mc-window", seed, *x))
    items = []
    for i, (topic, start) in enumerate(windows[:n_items]):  # hash order: any ``limit`` is a fair sample
        w = words[topic]
        others = sorted((t for t in words if t != topic and pool[t]),
                        key=lambda t: stable_hash("mc-other", seed, topic, start, t))[:3]
        if len(others) < 3:
            raise ValueError(f"topic {topic!r}: fewer than 3 other topics with usable distractor windows")
        distract = []
        for t in others:
            pos = pool[t][stable_hash("mc-pos", seed, topic, start, t) % len(pool[t])]
            distract.append((t, " ".join(words[t][pos : pos + cont_words])))
        answer = stable_hash("mc-answer", seed, topic, start) % 4
        true = (topic, " ".join(w[start + prefix_words : start + span]))
        cands = distract[:answer] + [true] + distract[answer:]
        items.append({
            "id": i, "topic": topic, "context": " ".join(w[start : start + prefix_words]),
            "choices": [c for _, c in cands], "answer": answer, "sources": [t for t, _ in cands],
        })
    if len(items) < n_items:
        log.warning("only %d MC items available (asked for %d)", len(items), n_items)
    return items


def generate(out_dir: str | Path = TASKS_DIR, seed: int = 0, n_items: int = 150, prefix_words: int = 48,
             cont_words: int = 16) -> dict[str, Path]:
    """Write ``pydoc_split.json`` (pinned topic split) and ``pydoc_mc.jsonl`` into ``out_dir``.

    Output bytes are a pure function of the arguments and the running Python's ``pydoc_data``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = split_groups({t: len(v) for t, v in topics.items()}, (0.8, 0.1, 0.1), seed)
    items = make_mc_items({t: topics[t] for t in split["test"]}, n_items, prefix_words, cont_words, seed=seed)
    meta = {
        "python": platform.python_version(), "source_sha256": source_fingerprint(), "seed": seed,
        "fractions": [0.8, 0.1, 0.1], "validation": split["validation"], "test": split["test"],
        "mc": {"n_items": len(items), "prefix_words": prefix_words, "cont_words": cont_words},
        "chars": {s: sum(len(topics[t]) for t in split[s]) for s in split},
    }
    paths = {"split": out / PYDOC_SPLIT_FILE.name, "mc": out / MC_JSONL.name}
    paths["split"].write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    with paths["mc"].open("w", encoding="utf-8", newline="\n") as fh:
        for it in items:
            fh.write(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n")
    log.info("wrote %d MC items and the split to %s", len(items), out)
    return paths


def write_mc_task(
    out_dir: str | Path, jsonl_path: str | Path | None = None, task_name: str = TASK_NAME
) -> Path:
    """Materialise the YAML template into ``out_dir/<task_name>.yaml`` with an absolute ``data_files`` path.

    Args:
        out_dir: a directory to pass as ``TaskManager(include_path=out_dir)``.
        jsonl_path: the items; default the packaged ``pydoc_mc.jsonl``.
        task_name: the lm-eval task name written into the YAML.
    """
    data = Path(jsonl_path or MC_JSONL).resolve()
    if not data.is_file():
        raise FileNotFoundError(f"MC task data not found: {data}")
    text = MC_TEMPLATE.read_text(encoding="utf-8")
    text = text.replace(DATA_PLACEHOLDER, json.dumps(str(data)))
    text = re.sub(rf"^task: {TASK_NAME}$", f"task: {task_name}", text, flags=re.MULTILINE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{task_name}.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target


def mc_task_dir() -> tuple[Path, str]:
    """``(directory, task name)`` for ``TaskManager(include_path=directory, include_defaults=False)``.

    The directory lives in the autoqra cache and is keyed by the template and data path, so it is rebuilt
    whenever the package moves or the template changes.
    """
    ident = str(MC_JSONL.resolve()) + MC_TEMPLATE.read_text(encoding="utf-8")
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    d = cache_dir() / "lm_eval_tasks" / key
    if not (d / f"{TASK_NAME}.yaml").exists():
        write_mc_task(d)
    return d, TASK_NAME

