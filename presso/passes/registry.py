"""The pass table: passes registered by name with typed options (``register_pass``, ``Option``).

The built-in passes register themselves when their modules are imported; ``registered_passes``
imports the modules listed in ``BUILTIN_MODULES`` on first use (a lazy registry), so importing the
pass manager loads no pass, and a pass module importing this table closes no import cycle.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..errors import PipelineError

# the modules that register presso's own passes; a new pass module is one more entry
BUILTIN_MODULES = ("builtin", "lowrank", "quantize", "sparsify", "kv_cache", "fuse", "concat_linears",
                   "select_kernels")


@dataclass
class Option:
    """A typed pass option: type (int/float/bool/str), default, allowed choices, range check."""
    type: type
    default: Any = None
    choices: Optional[Sequence] = None
    check: Optional[Callable[[Any], bool]] = None
    allowed: str = ""  # how to describe allowed values when ``check`` fails
    help: str = ""

    def convert(self, pass_name: str, name: str, value):
        def bad(msg):
            raise PipelineError(f"pass '{pass_name}': option '{name}' {msg}")
        if isinstance(value, str) and self.type is not str:
            text = value.strip()
            try:
                if self.type is bool:
                    if text.lower() not in ("true", "false", "1", "0"):
                        raise ValueError
                    value = text.lower() in ("true", "1")
                else:
                    value = self.type(text)
            except ValueError:
                bad(f"must be {self.type.__name__}, got {value!r}")
        elif self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            bad(f"must be {self.type.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            bad(f"must be one of {list(self.choices)}, got {value!r}")
        if self.check is not None and not self.check(value):
            bad(f"must be {self.allowed}, got {value!r}")
        return value


@dataclass
class PassInfo:
    name: str
    fn: Callable
    options: dict[str, Option]
    lossy: bool = False   # compression passes change outputs on purpose
    doc: str = ""


_PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, options: Optional[dict] = None, lossy: bool = False):
    """Register ``fn(graph, ctx, **options) -> graph``."""
    def wrap(fn):
        _PASSES[name] = PassInfo(name, fn, dict(options or {}), lossy, (fn.__doc__ or "").strip())
        return fn
    return wrap


def registered_passes() -> dict[str, PassInfo]:
    """Every pass: the built-in ones (their modules imported now) and any registered since."""
    for module in BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return dict(_PASSES)


def registered_pass(name: str) -> Optional[PassInfo]:
    """The pass registered as ``name`` so far (no module is imported), or None."""
    return _PASSES.get(name)
