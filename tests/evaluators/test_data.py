"""Tests for autoqra.evaluators.data and the packaged pydoc MC task."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import pytest
import torch

from autoqra.evaluators.data import (
    SPLITS,
    ByteTokenizer,
    TaskData,
    TextSplits,
    batches,
    build_task_data,
    format_instruction,
    iter_steps,
    load_hf_texts,
    load_text_task,
    load_texts,
    mc_task_dir,
    pack,
    split_groups,
)
from autoqra.evaluators.tasks import build

TOK = ByteTokenizer(512)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- splits
def test_pydoc_split_is_deterministic_and_disjoint_by_topic():
    a, b = load_text_task("pydoc"), load_text_task("pydoc")
    assert a == b
    names = [set(a.groups[s]) for s in SPLITS]
    assert all(names) and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    from pydoc_data.topics import topics

    assert set().union(*names) == set(topics)
    sizes = a.sizes()
    total = sum(v["chars"] for v in sizes.values())
    assert 0.05 < sizes["test"]["chars"] / total <= 0.1 and 0.05 < sizes["validation"]["chars"] / total <= 0.1


def test_pinned_split_matches_recomputed_and_seeds_differ():
    pinned, recomputed = load_text_task("pydoc"), load_text_task("pydoc", seed=0)
    assert pinned.groups == recomputed.groups
    assert load_text_task("pydoc", seed=1).groups["test"] != pinned.groups["test"]
    with pytest.raises(ValueError, match="unknown embedded task"):
        load_text_task("wiki")


def test_split_groups_fractions_validated():
    with pytest.raises(ValueError, match="fractions"):
        split_groups({"a": 1}, (0.5, 0.5, 0.5))


# ---------------------------------------------------------------- tokenizer + pack
def test_byte_tokenizer_roundtrip_and_range():
    ids = TOK.encode("héllo ✓")
    assert max(ids) < 256 < TOK.eos_token_id == 511 and TOK.decode(ids + [511]) == "héllo ✓"
    small = ByteTokenizer(64)
    assert max(small.encode("xyz~" * 10)) < 63 == small.eos_token_id
    with pytest.raises(ValueError):
        ByteTokenizer(1)


def test_pack_shapes_eos_and_determinism():
    texts = ["abc" * 20, "hello world", "x" * 50]
    out = pack(texts, TOK, block_size=16)
    total = 60 + 11 + 50 + 3
    assert out.shape == (total // 16, 16) and out.dtype == torch.long
    assert torch.equal(out, pack(texts, TOK, block_size=16))
    assert out.view(-1)[60].item() == TOK.eos_token_id
    assert pack(texts, TOK, block_size=16, add_eos=False).numel() == (121 // 16) * 16


def test_pack_errors():
    with pytest.raises(ValueError, match="9 tokens in total, fewer than one block of block_size=32"):
        pack(["abcdefgh"], TOK, block_size=32, name="val")
    with pytest.raises(ValueError, match="empty dataset"):
        pack([], TOK)


# ---------------------------------------------------------------- sources + error messages
def test_text_jsonl_split_and_build(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": f"record number {i} " * 5} for i in range(30)])
    s1, s2 = load_texts(f), load_texts(f)
    assert s1 == s2 and all(s1[s] for s in SPLITS) and sum(len(s1[s]) for s in SPLITS) == 30
    assert load_texts(f, seed=1) != s1
    td = build_task_data(f, TOK, block_size=8)
    assert isinstance(td, TaskData) and td.train.shape[1] == 8 and td.spec()["block_size"] == 8
    assert td.fingerprint() == build_task_data(f, TOK, block_size=8).fingerprint()


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_texts("/nonexistent/x.jsonl")
    with pytest.raises(ValueError, match="unknown data kind 'csv'"):
        load_texts("/nonexistent/x.jsonl", kind="csv")


def test_empty_file(tmp_path):
    with pytest.raises(ValueError, match="empty dataset"):
        load_texts(_jsonl(tmp_path / "e.jsonl", ["", "  "]))


def test_missing_field_names_field_fields_and_line(tmp_path):
    f = _jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, "", {"body": "x", "id": 1}])
    with pytest.raises(ValueError, match=r"line 3: missing field 'text'; fields present: \['body', 'id'\]"):
        load_texts(f, kind="text")
    with pytest.raises(ValueError, match="must be a string"):
        load_texts(_jsonl(tmp_path / "n.jsonl", [{"text": 5}]))


def test_invalid_json_line(tmp_path):
    f = _jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": oops}'])
    with pytest.raises(ValueError, match="line 3: invalid JSON"):
        load_texts(f)


def test_too_short_for_one_block(tmp_path):
    f = _jsonl(tmp_path / "s.jsonl", [{"text": "ab"}] * 5)
    with pytest.raises(ValueError, match=r"tokens in total, fewer than one block of block_size=128"):
        build_task_data(f, TOK, block_size=128)
    with pytest.raises(ValueError, match="tokenizer is required"):
        build_task_data(f, None)


def test_json_array_file(tmp_path):
    f = tmp_path / "arr.json"
    f.write_text(json.dumps([{"text": f"array item {i}"} for i in range(6)] + [{"txt": "x"}], indent=1))
    with pytest.raises(ValueError, match="record 7: missing field 'text'; fields present: \\['txt'\\]"):
        load_texts(f)
    f.write_text(json.dumps([{"text": f"array item {i}"} for i in range(6)]))
    assert sum(len(load_texts(f)[s]) for s in SPLITS) == 6
    f.write_text('[{"text": 1},\n oops]')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        load_texts(f)


def test_instruction_template_and_jsonl(tmp_path):
    want = "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n3"
    assert format_instruction("Add.", "1 2", "3") == want
    assert format_instruction("Hi.", "", "Hello") == "### Instruction:\nHi.\n\n### Response:\nHello"
    rows = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "ctx", "output": str(i)}
            for i in range(10)]
    s = load_texts(_jsonl(tmp_path / "i.jsonl", rows))
    every = s.train + s.validation + s.test
    assert len(every) == 10 and all(t.startswith("### Instruction:\n") for t in every)
    assert sum("### Input:" in t for t in every) == 5
    with pytest.raises(ValueError, match=r"line 1: missing field 'output'"):
        load_texts(_jsonl(tmp_path / "j.jsonl", [{"instruction": "x"}]), kind="instruction")


def test_datasets_local_json(tmp_path):
    f = _jsonl(tmp_path / "hf.json", [{"text": f"datasets row {i} " * 4, "label": i} for i in range(20)])
    assert load_hf_texts(str(f))["train"][3].startswith("datasets row 3 ")
    s = load_texts(f"datasets:{f}")
    assert s == load_texts(f"datasets:{f}")
    assert sum(len(s[x]) for x in SPLITS) == 20 and all(s[x] for x in SPLITS)
    with pytest.raises(ValueError, match=r"missing field 'body'; fields present: \['label', 'text'\]"):
        load_texts(f"datasets:{f}", text_field="body")
    with pytest.raises(FileNotFoundError):
        load_texts(f"datasets:{tmp_path / 'nope.json'}")


def test_texts_and_splits_objects():
    ts = TextSplits(["a" * 40], ["b" * 40], ["c" * 40])
    assert load_texts(ts) is ts
    assert sum(len(v) for v in [load_texts(["x"] * 5)[s] for s in SPLITS]) == 5
    with pytest.raises(ValueError, match="cannot be split"):
        load_texts(["only one"])


def test_pydoc_task_data_tiny_tokenizer():
    td = build_task_data("pydoc", TOK, block_size=128)
    assert td.train.shape[0] > 8 * td.test.shape[0] > 0 and int(td.train.max()) < 512


# ---------------------------------------------------------------- batches
def test_batches_seeded_order():
    blocks = torch.arange(10 * 4).view(10, 4)
    first = [b.clone() for b in batches(blocks, 3, seed=0)]
    assert all(torch.equal(x, y) for x, y in zip(first, batches(blocks, 3, seed=0)))
    assert [len(b) for b in first] == [3, 3, 3, 1] and len(list(batches(blocks, 3, drop_last=True))) == 3
    assert sorted(torch.cat(first)[:, 0].tolist()) == list(range(0, 40, 4))
    assert not torch.equal(torch.cat(first), torch.cat(list(batches(blocks, 3, seed=1))))
    assert not torch.equal(torch.cat(first), torch.cat(list(batches(blocks, 3, seed=0, epoch=1))))


def test_iter_steps_cycles_epochs_deterministically():
    blocks = torch.arange(5 * 2).view(5, 2)
    steps = list(iter_steps(blocks, 4, steps=5, seed=3))
    assert len(steps) == 5 and all(s.shape == (4, 2) for s in steps)
    assert all(torch.equal(a, b) for a, b in zip(steps, iter_steps(blocks, 4, steps=5, seed=3)))
    flat = torch.cat(steps)[:, 0].div(2).long().tolist()
    e0 = torch.cat(list(batches(blocks, 5, seed=3, epoch=0)))[:, 0].div(2).long().tolist()
    assert flat[:5] == e0 and sorted(flat[5:10]) == list(range(5))
    assert not torch.equal(torch.cat(steps), torch.cat(list(iter_steps(blocks, 4, steps=5, seed=4))))


# ---------------------------------------------------------------- MC task
def _mc_rows() -> list[dict]:
    return [json.loads(line) for line in build.MC_JSONL.read_text().splitlines()]


def test_mc_jsonl_valid():
    rows, split = _mc_rows(), load_text_task("pydoc").groups
    assert 100 <= len(rows) <= 200 and build.MC_JSONL.stat().st_size < 300_000
    assert {r["answer"] for r in rows} == {0, 1, 2, 3}
    from pydoc_data.topics import topics

    for r in rows:
        assert len(r["choices"]) == 4 == len(set(r["choices"])) and 0 <= r["answer"] < 4
        assert r["topic"] in split["test"] and set(r["sources"]) <= set(split["test"])
        assert r["sources"][r["answer"]] == r["topic"] and r["sources"].count(r["topic"]) == 1
        if r["topic"] in topics:  # the true continuation follows the context in the same topic
            source = " ".join(build.normalize(topics[r["topic"]]))
            assert f'{r["context"]} {r["choices"][r["answer"]]}' in source


def test_mc_regeneration_is_byte_identical(tmp_path):
    a, b = build.generate(tmp_path / "a"), build.generate(tmp_path / "b")
    assert a["mc"].read_bytes() == b["mc"].read_bytes() and a["split"].read_bytes() == b["split"].read_bytes()
    meta = json.loads(build.PYDOC_SPLIT_FILE.read_text())
    if meta["source_sha256"] != build.source_fingerprint():
        pytest.skip(f"committed task was built from Python {meta['python']}'s pydoc_data")
    assert a["mc"].read_bytes() == build.MC_JSONL.read_bytes()
    assert a["split"].read_bytes() == build.PYDOC_SPLIT_FILE.read_bytes()


def test_write_mc_task_absolute_path(tmp_path):
    import yaml

    y = build.write_mc_task(tmp_path, task_name="my_mc")
    cfg = yaml.safe_load(y.read_text())
    data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert cfg["task"] == "my_mc" and data.is_absolute() and data.read_bytes() == build.MC_JSONL.read_bytes()
    d, name = mc_task_dir()
    assert name == "pydoc_mc" and (d / "pydoc_mc.yaml").exists()
    with pytest.raises(FileNotFoundError):
        build.write_mc_task(tmp_path, jsonl_path=tmp_path / "none.jsonl")


@pytest.mark.slow
def test_smollm2_mc_accuracy_above_chance():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from autoqra.models import load_default

    model, tok = load_default()
    d, name = mc_task_dir()
    t0 = time.perf_counter()
    res = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu"), tasks=[name],
        task_manager=TaskManager(include_path=str(d), include_defaults=False), limit=12,
    )
    r = res["results"][name]
    logging.getLogger(__name__).info("pydoc_mc limit=12: %s in %.1f s", r, time.perf_counter() - t0)
    assert r["acc,none"] > 0.3, (r, platform.python_version())
