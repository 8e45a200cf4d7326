"""Does the optimizer after the one-algorithm-per-class refactor (issue 25) make the same demo search as before it?

Replays the demo search B4 / search seed 0 that ``benchmarks/no_regret.py`` ran with the code before the refactor
(its trial store under ``benchmarks/runs/searches/``, copied with SQLite's backup API) with today's code: every trial
must be read back (``n_run == 0``), the chosen point and the final rung's scores must be the same.
-> ``studies/results/refactor_replay.json``. Needs that store (this machine's ``runs/``; it is not committed).

    python benchmarks/studies/refactor_replay.py
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared _common
from _common import ROOT, SEARCHES, budgets, cpu_name, load, search_key  # noqa: E402

import autoqra  # noqa: E402
from autoqra.config import OptimizeConfig  # noqa: E402


def main() -> int:
    model, tok = load()
    cfg = OptimizeConfig(budget=budgets(model, tok)["B4"], preset="demo", seed=0)
    key = search_key("B4", 0, cfg)
    ref = json.loads(SEARCHES.read_text())[key]
    src = ROOT / "runs" / "searches" / (key.replace(":", "-") + ".db")
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "trials.db"
        with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
            a.backup(b)
        shutil.copytree(str(src) + ".final", str(dst) + ".final")
        t0 = time.perf_counter()
        res = autoqra.optimize(model, tokenizer=tok, config=cfg, store=dst, progress=False)
        out = {"cpu": cpu_name(), "search": key, "seconds": time.perf_counter() - t0, "n_run": res.info["n_run"],
               "evaluations": [ref["evaluations"], len(res.history)],
               "same_chosen": res.best.assignment.to_dict() == {k: ref["chosen"][k] for k in ("bits", "ranks", "units")},
               "same_final_rung": [e["val_score"] for e in res.info["final_rung"]] == [e["val_score"] for e in
                                                                                       ref["final_rung"]]}
    (Path(__file__).parent / "results" / "refactor_replay.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0 if out["n_run"] == 0 and out["same_chosen"] and out["same_final_rung"] else 1


if __name__ == "__main__":
    sys.exit(main())
