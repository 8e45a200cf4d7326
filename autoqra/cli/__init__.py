r"""The ``autoqra`` command: ``memory | optimize | train | export | report | bench``.

:mod:`~autoqra.cli.main` builds the parser (and ``memory``); each other command lives in its own module
(:mod:`~autoqra.cli.optimize`, :mod:`~autoqra.cli.artifact` for ``train``/``export``,
:mod:`~autoqra.cli.report`, :mod:`~autoqra.cli.bench`). ``python -m autoqra.cli`` runs it too.
"""

from autoqra.cli.main import build_parser, main, quiet_libraries

__all__ = ["build_parser", "main", "quiet_libraries"]
