r"""The one place third-party libraries are imported on demand.

autoqra's own modules import each other at module level. Libraries that only some features need, or
that are slow to import (Ray, BoTorch/GPyTorch, Ax, lm-eval, matplotlib, hqq, bitsandbytes, gptqmodel),
are imported through :func:`require` where the feature runs, so ``import autoqra`` stays fast and a
missing library fails with one ``ImportError`` that says which feature needs it and how to install it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: How to install each optional library (top-level import name → pip command).
INSTALL = {
    "ray": "pip install 'autoqra[ray]'",
    "gptqmodel": "pip install 'autoqra[gptq]' (GPTQMODEL_CPU_WORKERS=2 on small CPUs)",
    "optimum": "pip install 'autoqra[gptq]'",
    "botorch": "pip install botorch",
    "gpytorch": "pip install gpytorch",
    "ax": "pip install ax-platform",
    "lm_eval": "pip install lm-eval",
    "matplotlib": "pip install matplotlib",
    "hqq": "pip install hqq",
    "bitsandbytes": "pip install bitsandbytes",
    "pymoo": "pip install pymoo",
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (dotted names allowed) for ``feature``.

    Raises:
        ImportError: the library is missing; the message names the feature and the install command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        hint = INSTALL.get(top, f"pip install {top}")
        raise ImportError(f"{feature} needs {top}, which is not installed: {hint}") from e


def available(module: str) -> bool:
    """Whether ``module``'s top-level package is installed (without importing it)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None
