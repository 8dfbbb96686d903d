"""Helpers both frontends share: naming, scalar constants, and the type cross-check."""
from __future__ import annotations

import re

import torch

from ..errors import FrontendError
from ..ir.graph import Graph, Value
from ..ir.types import DType, TensorType


def clean_name(name: str) -> str:
    """A value name the IR text accepts (letters, digits, '_', '.', '-'). Protobuf hands a string
    field that is not UTF-8 over as bytes."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name).strip(".") or "v"
    return name if re.match(r"^[A-Za-z0-9_]", name) else "v" + name


def clean_symbol(name: str) -> str:
    """A symbolic dim name the IR text reads back as a symbol: an identifier ('_' for other
    characters) that is not a word the parser reads as a number or a constant (``inf``)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", name) or "d"
    name = name if re.match(r"^[A-Za-z_]", name) else "d" + name
    return name + "_" if name in ("inf", "nan", "true", "false", "none") else name


class GraphBuilder:
    """A Graph plus the conveniences importers need."""

    def __init__(self, name: str):
        self.g = Graph(clean_name(name))

    def scalar(self, value, like: TensorType | None = None) -> Value:
        """A 0-d constant; float scalars become f32, ints i64, bools bool (torch's scalar promotion)."""
        if isinstance(value, bool):
            return self.g.op("full", value=float(value), dtype="bool")
        if isinstance(value, int):
            return self.g.op("full", value=float(value), dtype="i64")
        return self.g.op("full", value=float(value), dtype="f32")

    def const(self, name: str, t: torch.Tensor) -> Value:
        """A tensor constant: 1-element tensors become ``full`` nodes, others params."""
        t = t.detach()
        if t.numel() == 1 and t.dim() <= 1 and t.dtype != torch.uint8:
            return self.g.op("full", value=float(t.reshape(()).item()), shape=list(t.shape),
                             dtype=DType.from_torch(t.dtype).value)
        return self.g.add_param(self.g.fresh_name(clean_name(name)), t.contiguous())


def check_type(v: Value, expected: TensorType, where: str) -> None:
    """The importer's own type must equal what the source framework computed."""
    if v.type != expected:
        raise FrontendError(f"{where}: presso inferred {v.type} but the source model says {expected} "
                            "(importer bug: please report)")


def registrar(table: dict):
    """``handles = registrar(TABLE)``; ``@handles(key, ...)`` files a handler under each key."""
    def handles(*keys):
        def wrap(fn):
            for k in keys:
                table[k] = fn
            return fn
        return wrap
    return handles
