"""Optional dependencies: each path imports its package on first use (``import presso`` needs
torch only) and, when it is missing, says which extra of presso installs it."""
from __future__ import annotations

import importlib
import importlib.util

from .errors import MissingDependencyError


def require(module: str, extra: str, what: str, load: bool = True):
    """Import ``module`` for ``what`` (e.g. "target='llvm'"), or raise MissingDependencyError.

    ``load=False`` only checks that it is installed, for a path that imports parts of it itself
    (the ONNX reader reads files without importing all of ``onnx``).
    """
    try:
        if load:
            return importlib.import_module(module)
        if importlib.util.find_spec(module) is None:
            raise ImportError(module)
        return None
    except ImportError:
        raise MissingDependencyError(f"{what} needs the '{module}' package, which is not installed: "
                                     f"pip install 'presso[{extra}]'") from None
