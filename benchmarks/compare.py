"""Benchmark AutoQRA against the baselines users would pick instead, at the same memory budget.

Rows: 16-bit LoRA, uniform HQQ / bnb nf4 QLoRA, random search, ablations, AutoQRA at two budgets — same
model, data, evaluator, seeds and final-training recipe.

Run: .venv/bin/python benchmarks/compare.py --preset quick|full [--seeds N] [--out benchmarks/results]
→ benchmarks/results/compare_<preset>.md / .json / .png. Resumable: re-run the same line after a kill
(trial stores in benchmarks/runs/<preset>/). Same as `autoqra bench`.
"""

import argparse
import logging
import sys

from autoqra.cli.bench import add_arguments, cmd_bench

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(cmd_bench(ap.parse_args()))
