"""Targets: what ``presso.compile(..., target=name)`` hands a compiled graph to.

The registry maps a name to the module and class that implement ``Target`` (``base.py``); the
module is imported on first use, so ``import presso`` loads no backend, and the layers below
(``api``, ``runtime/artifact.py``) reach a backend only through this interface. Adding a target is
one module in this folder plus one line in ``REGISTRY``.
"""
from __future__ import annotations

import importlib

from ..errors import UnknownTargetError
from .base import Target

# name -> "module:class" (module relative to this package), imported on first lookup, or a Target
# subclass (a target defined outside presso, registered at run time)
REGISTRY: dict = {
    "reference": "reference:ReferenceTarget",
    "cuda": "cuda:CudaTarget",
    "llvm": "llvm:LLVMTarget",
    "aarch64": "aarch64:AArch64Target",
}

_LOADED: dict[str, Target] = {}


def target_names() -> tuple[str, ...]:
    """The registered target names, in registration order."""
    return tuple(REGISTRY)


def get_target(name: str) -> Target:
    """The target registered as ``name`` (its module imported on first use); an unknown name raises
    ``UnknownTargetError`` (a ``ValueError``) listing the valid ones."""
    target = _LOADED.get(name) if isinstance(name, str) else None
    if target is not None:
        return target
    if not isinstance(name, str) or name not in REGISTRY:
        raise UnknownTargetError(f"unknown target {name!r}; valid targets: {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    if isinstance(spec, str):
        module, cls = spec.split(":")
        spec = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    target = _LOADED[name] = spec()
    return target


def generation_targets() -> tuple[str, ...]:
    """The targets whose compiled models can ``generate`` (imports each target's module)."""
    return tuple(n for n in REGISTRY if get_target(n).supports_generation)


__all__ = ["REGISTRY", "Target", "UnknownTargetError", "generation_targets", "get_target", "target_names"]
