r"""CLI sub-commands that run searches and use their results (filled in as those parts land)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the search-related sub-commands."""
    return None
