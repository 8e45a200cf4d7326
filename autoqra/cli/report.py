r"""CLI sub-command that renders a saved search result: ``report``."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from autoqra.report.html import write_report
from autoqra.result import load_result


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the ``report`` sub-command."""
    r = sub.add_parser("report", help="write an HTML report of a run (Pareto plot, layer heatmap, progress)")
    r.add_argument("--run", required=True, help="run directory (holding result.json) or the result.json file")
    r.add_argument("--out", help="output directory (default <run>/report)")
    r.add_argument("--title", help="page title")
    r.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    run = Path(args.run)
    try:
        res = load_result(run)
    except (FileNotFoundError, ValueError) as e:
        Console(stderr=True).print(f"[red]error:[/red] cannot read a result from {escape(str(run))}: "
                                   f"{escape(str(e))}")
        return 2
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "report"
    path = write_report(res, out, title=args.title)
    Console(soft_wrap=True).print(f"report written to {path}", markup=False, highlight=False)
    return 0

