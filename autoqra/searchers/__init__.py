"""Searchers behind one ask/tell interface: ``"nsga2"``, ``"turbo"``, ``"local"``, ``"ax"``, ``"random"``."""

from autoqra.searchers.base import (
    SearchContext,
    Searcher,
    available_searchers,
    get_searcher,
    register_searcher,
)

__all__ = ["SearchContext", "Searcher", "available_searchers", "get_searcher", "register_searcher"]

# Each module registers its searcher on import; heavy libraries (botorch, ax) load lazily inside.
for _mod in ("nsga2", "turbo", "local", "ax", "random"):
    try:
        __import__(f"autoqra.searchers.{_mod}")
    except ModuleNotFoundError as _e:  # the file itself is missing (never an optional library)
        if _e.name != f"autoqra.searchers.{_mod}":
            raise
