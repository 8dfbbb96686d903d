"""The ONNX importer's handler table (``@handles("Op", ...)``) and the import-time value kinds the
handlers share. ``onnx_frontend.py`` and the ``onnx_ops_*.py`` modules fill the table; it imports
none of them, so they import it without an import cycle."""
from __future__ import annotations

from typing import Callable

from ..errors import FrontendError
from ..ir.types import DType
from .common import registrar
from .onnx_proto import dtype_name

OPSETS = range(13, 24)
ONNX_OPS: dict[str, Callable] = {}


handles = registrar(ONNX_OPS)


class SymShape(list):
    """A shape known at import as dims (ints and symbols): the value of ``Shape(x)``."""


class Seq(list):
    """An ONNX sequence, which exists only at import: the list of the values it holds, in order."""


_ONNX_DTYPE = {1: DType.f32, 10: DType.f16, 16: DType.bf16, 11: DType.f64, 7: DType.i64, 6: DType.i32,
               5: DType.i16, 3: DType.i8, 2: DType.u8, 9: DType.bool}


def _dtype(elem_type: int, where: str) -> DType:
    if elem_type not in _ONNX_DTYPE:
        try:
            name = dtype_name(elem_type)
        except ValueError:      # not a type ONNX defines (a damaged or hostile file)
            name = f"{elem_type} (not an ONNX type)"
        raise FrontendError(f"{where}: ONNX element type {name} is not supported")
    return _ONNX_DTYPE[elem_type]
