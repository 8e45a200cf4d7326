"""Every example runs (on the tiny model) and prints what it promises."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_quickstart_tiny(tmp_path):
    out = _run([str(ROOT / "examples/quickstart.py"), "--tiny", "--out", str(tmp_path / "run")], tmp_path)
    assert "AutoQRA (chosen)" in out and "rank_pattern" in out
    assert (tmp_path / "run" / "result.json").is_file() and (tmp_path / "run" / "trials.db").is_file()


def test_custom_searcher(tmp_path):
    out = _run([str(ROOT / "examples/custom_searcher.py")], tmp_path)
    n = int(out.strip().splitlines()[-1].split(":")[-1])
    assert n >= 2 and "AutoQRA (chosen)" in out


def test_custom_backend(tmp_path):
    out = _run([str(ROOT / "examples/custom_backend.py")], tmp_path)
    first = out.splitlines()[0].split()
    assert first[0] == "predicted" and first[1] == first[3]  # byte-exact for the user's backend too
    assert "AutoQRA (chosen)" in out


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_every_example_is_tested(script):
    assert script in {"quickstart.py", "custom_searcher.py", "custom_backend.py"}
