"""The lowering table: presso op name -> the function that lowers it to Relax (``@lowers(op, ...)``).

``lower.py`` (presso's own ops) and ``aten.py`` (core ATen ops) fill it; the lowering driver reads
it. It imports neither, so either can import the table without an import cycle.
"""
from __future__ import annotations

from ...ir.types import DType

TVM_DTYPE = {DType.f64: "float64", DType.f32: "float32", DType.f16: "float16", DType.bf16: "bfloat16",
             DType.i64: "int64", DType.i32: "int32", DType.i16: "int16", DType.i8: "int8", DType.u8: "uint8",
             DType.i4: "uint8", DType.u4: "uint8", DType.bool: "bool"}

LOWER: dict = {}


def lowers(*ops):
    """File the decorated ``fn(lowering, node, inputs)`` as the lowering of each of ``ops``."""
    def deco(fn):
        for op in ops:
            LOWER[op] = fn
        return fn
    return deco
