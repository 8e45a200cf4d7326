r"""CLI sub-command ``autoqra bench``: AutoQRA against uniform / random / ablation baselines at equal budget."""

from __future__ import annotations

import argparse
import logging
import time

from autoqra.bench.harness import run_bench

log = logging.getLogger(__name__)


def add_arguments(b: argparse.ArgumentParser) -> None:
    """The options of ``autoqra bench`` (also used by ``benchmarks/compare.py``)."""
    b.add_argument("--preset", default="quick", choices=["quick", "full"],
                   help="quick: tiny model, minutes (harness check); full: SmolLM2 + pydoc, 4-5 h on 2 cores")
    b.add_argument("--out", default="benchmarks/results", help="folder of compare_<preset>.md/.json/.png")
    b.add_argument("--work", help="folder of the resumable trial stores (default benchmarks/runs/<preset>)")
    b.add_argument("--seeds", type=int, help="number of final-training seeds (default: the preset's)")
    b.add_argument("--threads", type=int, help="torch threads (default: the preset's; 1 helps on a busy machine)")
    b.add_argument("--progress", action="store_true",
                   help="each search's live view on a terminal, its plain progress lines otherwise "
                        "(default: the same lines as log records; -q: none)")
    b.add_argument("--rows", nargs="+", metavar="ID",
                   help="only these row ids (default: all; see autoqra.bench.harness.ROWS); use another --out or --merge")
    b.add_argument("--merge", action="store_true",
                   help="keep the other rows of the existing <out>/compare_<preset>.json (same recipe) in the table")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``autoqra bench``."""
    b = sub.add_parser("bench", help="benchmark AutoQRA against baselines at the same memory budget (resumable)")
    add_arguments(b)
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    for name in ("autoqra.bench", "autoqra.progress"):  # per-row / per-trial progress (log records); -q: none
        logging.getLogger(name).setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    rep = run_bench(args.preset, out=args.out, work=args.work, seeds=args.seeds, progress=args.progress and not getattr(args, "quiet", False),
                    threads=args.threads, rows=args.rows, merge=args.merge)
    print(f"benchmark {rep['name']}: {len(rep['rows'])} rows in {time.perf_counter() - t0:.0f} s; "
          f"written to {args.out}/{rep['name']}.md / .json / .png")
    for f in rep["findings"]:
        print(" *", f)
    return 0

