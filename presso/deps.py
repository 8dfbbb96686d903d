"""Optional dependencies: each path imports its package on first use (``import presso`` needs
torch only) and, when it is missing, says which extra of presso installs it."""
from __future__ import annotations

import importlib

from .errors import MissingDependencyError


def require(module: str, extra: str, what: str):
    """Import ``module`` for ``what`` (e.g. "target='llvm'"), or raise MissingDependencyError."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{what} needs the '{module}' package, which is not installed: "
                                     f"pip install 'presso[{extra}]'") from None
