"""Searchers behind one ask/tell interface: ``"nsga2"``, ``"turbo"``, ``"local"``, ``"ax"``, ``"random"``.

Each module registers its searcher in :data:`SEARCHERS` on import; heavy libraries (BoTorch, Ax) are
imported only when a searcher that needs them is built (:mod:`autoqra._optional`).
"""

import autoqra.searchers.ax
import autoqra.searchers.local
import autoqra.searchers.nsga2
import autoqra.searchers.random
import autoqra.searchers.turbo  # noqa: F401 - each module registers its searcher
from autoqra.searchers.base import (
    RUN_SETTINGS,
    SEARCHERS,
    Searcher,
    available_searchers,
    get_searcher,
    register_searcher,
)

__all__ = ["RUN_SETTINGS", "SEARCHERS", "Searcher", "available_searchers", "get_searcher", "register_searcher"]
