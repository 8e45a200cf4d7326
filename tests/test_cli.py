import json

import pytest
import yaml

from autoqra import MemoryModel, SearchSpace, load_result
from autoqra.cli.main import main
from autoqra.models import tiny_llama


def test_memory_json_matches_memory_model(capsys):
    assert main(["memory", "--model", "tiny", "--backend", "hqq", "--bits", "2", "4", "--rank", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = tiny_llama()
    space = SearchSpace.from_model(m, bits=(2, 4), ranks=(0, 8))
    mm = MemoryModel(m, space, "hqq")
    assert out["breakdowns"]["4-bit r8"]["model_bytes"] == mm.predict(space.uniform(4, 8)).model_bytes
    assert out["breakdowns"]["2-bit r8"]["train_bytes"] == mm.predict(space.uniform(2, 8)).train_bytes


def test_memory_table_and_meta_config(tmp_path, capsys):
    cfg = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["memory", "--model-config", str(tmp_path / "config.json"), "--backend", "bnb", "--bits", "4", "8"]) == 0
    out = capsys.readouterr().out
    assert "= model bytes" in out and "4-bit r8" in out and "8-bit r8" in out


def test_memory_errors_exit_2(capsys):
    assert main(["memory", "--model", "tiny", "--backend", "bnb", "--bits", "3"]) == 2
    assert "does not support bits [3]" in capsys.readouterr().err
    assert main(["memory", "--model", "/no/such/dir"]) == 2


def test_optimize_from_yaml_config(tmp_path, capsys):
    cfg = {"budget": "4bit", "preset": "tiny", "bits": [2, 4, 8], "ranks": [0, 4, 8], "eval_blocks": 4,
           "importance_blocks": 4, "phase2": None, "train": {"batch_size": 2, "seq_len": 32, "lr": 0.002}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out_dir = tmp_path / "run"
    rc = main(["optimize", "--model", "tiny", "--config", str(tmp_path / "cfg.yaml"), "--out", str(out_dir),
               "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "AutoQRA (chosen)" in text and "uniform-4bit" in text
    res = load_result(out_dir)
    assert res.config["phase2"] is None and {t.phase for t in res.history} - {"final"} == {"baseline", "phase1"}
    assert res.info["stop_reasons"]["phase2"] == "skipped"
    assert res.info["model_source"] == "tiny"
    report = out_dir / "report" / "report.html"  # written by default, path printed
    assert report.is_file() and str(report) in text.replace("\n", "")
    assert (out_dir / "report" / "pareto.png").stat().st_size > 1000


def test_optimize_bad_config_is_refused(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("budget: 4bit\nalpha: 7\n")
    assert main(["optimize", "--model", "tiny", "--config", str(tmp_path / "bad.yaml"), "--out",
                 str(tmp_path / "r"), "--no-progress"]) == 2
    assert "alpha=7" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["nope"], ["memory", "--granularity", "layer"]])
def test_argparse_errors(argv):
    with pytest.raises(SystemExit):
        main(argv)


def test_a_newcomers_run_prints_no_library_noise(tmp_path):
    """`autoqra optimize` in a fresh process: no bitsandbytes kernel message, no deprecation warnings,
    no weight-loading progress bars (bnb is imported: the message appears on AVX512-BF16 CPUs)."""
    import subprocess
    import sys

    code = ("import sys; from autoqra.cli.main import main; sys.exit(main(['optimize', '--model', 'tiny', "
            "'--preset', 'tiny', '--backend', 'bnb', '--bits', '4', '8', '--ranks', '0', '8', '--max-trials', '2', "
            f"'--no-progress', '--no-report', '--out', {str(tmp_path / 'run')!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 1), p.stderr[-2000:]
    for noise in ("gemm_4bit_forward", "Warning", "warnings.warn", "Loading weights", "deprecated"):
        assert noise not in p.stderr, p.stderr[-2000:]


def test_optimize_into_a_log_file_tells_its_progress(tmp_path, capsys):
    """`autoqra optimize > log 2>&1` (no terminal): a line per preparation step, per phase and per trial, with
    done/planned never above each other and equal at the end; `autoqra train` writes step lines too; -q none."""
    import subprocess
    import sys

    from test_progress import TRIAL, check_log, parse

    from autoqra.store import TrialStore

    out_dir, log = tmp_path / "run", tmp_path / "log"
    with log.open("w") as f:
        p = subprocess.run([sys.executable, "-m", "autoqra.cli", "optimize", "--model", "tiny", "--preset", "tiny",
                            "--out", str(out_dir), "--no-report"], stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert p.returncode == 0, text[-3000:]
    assert text.startswith("autoqra optimize · model tiny"), text[:2000]  # nothing before the header
    lines = parse(text)
    res = load_result(out_dir)
    check_log(lines, res)
    with TrialStore(out_dir / "trials.db") as st:  # a fresh store: one stored trial per line that ran one
        assert len(st.trials()) == sum(bool(TRIAL.match(ln)) and "· stored ·" not in ln for ln in lines)
    assert any(ln.startswith("cost model: KL table") for ln in lines)
    assert "AutoQRA (chosen)" in text.split("search done")[-1]  # the table comes after the progress

    assert main(["train", "--run", str(out_dir), "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert [ln.split(" · loss")[0].split(": ")[-1] for ln in parse(err)][-1] == "step 3/3"

    assert main(["optimize", "-q", "--model", "tiny", "--preset", "tiny", "--out", str(tmp_path / "q"),
                 "--no-report", "--max-trials", "2"]) in (0, 1)
    assert parse(capsys.readouterr().err) == []


@pytest.mark.parametrize("argv, verbose, quiet", [
    (["optimize"], 0, False), (["-q", "optimize"], 0, True), (["optimize", "-q"], 0, True),
    (["-v", "optimize"], 1, False), (["optimize", "-vv"], 2, False), (["-v", "optimize", "--budget", "4bit"], 1, False),
])
def test_verbosity_flags_before_or_after_the_command(argv, verbose, quiet):
    from autoqra.cli.main import _wants_verbose, build_parser, shows_progress

    args = build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)
    assert shows_progress(args) is not quiet and _wants_verbose(argv) is bool(verbose)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["-q", "-v", "optimize"])
