"""Generated Triton kernels: source text -> a cached module on disk, keyed by the source's hash.

``triton.jit`` needs a real file to read source from, so each generated kernel is written once to
``$PRESSO_CACHE_DIR/triton/<sha>.py`` (default ``~/.cache/presso``) and imported from there; Triton
then caches the compiled binary under the same source. A second process reuses both.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

from ...config import cache_root
from ...errors import CacheError

_LOADED: dict[str, object] = {}


def cache_dir() -> Path:
    root = cache_root()
    d = root / "triton"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cannot use {root} ($PRESSO_CACHE_DIR) for generated kernels: {e.strerror or e}; point "
                         "PRESSO_CACHE_DIR at a writable folder") from None
    return d


def load_source(source: str, name: str):
    """The kernel ``name`` defined by ``source``; written atomically, imported once per process."""
    sha = hashlib.sha256(source.encode()).hexdigest()[:24]
    if sha in _LOADED:
        return getattr(_LOADED[sha], name)
    path = cache_dir() / f"k_{sha}.py"
    if not path.exists() or path.read_text() != source:
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".py.tmp")
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.replace(tmp, path)
        except OSError as e:
            raise CacheError(f"cannot write a generated kernel to {path.parent} ($PRESSO_CACHE_DIR): "
                             f"{e.strerror or e}; point PRESSO_CACHE_DIR at a writable folder") from None
    spec = importlib.util.spec_from_file_location(f"presso_kernel_{sha}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _LOADED[sha] = mod
    return getattr(mod, name)
