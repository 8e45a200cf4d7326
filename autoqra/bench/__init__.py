r"""The benchmark (``autoqra bench``): AutoQRA against baselines and ablations on one model and task.

* :mod:`~autoqra.bench.rows` — what is run (rows, presets); :mod:`~autoqra.bench.harness` — running them
  (:func:`run_bench`, one store per row, resumable); :mod:`~autoqra.bench.search` — search rows'
  summaries and the matched random search; :mod:`~autoqra.bench.table` — JSON/Markdown output and
  findings; :mod:`~autoqra.bench.plot` — the efficiency curve; :mod:`~autoqra.bench.report` — merging
  results of several work folders.
"""

from autoqra.bench.harness import Bench, run_bench
from autoqra.bench.rows import BENCH_PRESETS, ROWS

__all__ = ["BENCH_PRESETS", "ROWS", "Bench", "run_bench"]
