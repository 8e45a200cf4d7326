r"""Reports of a search: a self-contained HTML page and its PNG plots.

* :mod:`~autoqra.report.html` — :func:`write_report` (``Result.report()``), :func:`progress_series`.
* :mod:`~autoqra.report.plots` — the figures (Agg canvas, no pyplot state).
* :mod:`~autoqra.report.layers` — the per-unit bits/ranks figure beside the priors.

This package imports matplotlib; the rest of autoqra does not, so ``import autoqra`` stays fast.
"""
