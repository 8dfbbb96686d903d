"""IR types: dtypes (including sub-byte and fp8 storage types) and tensor types with symbolic dims.

A dim is an int or a symbol: a name such as ``batch`` or a product such as ``batch*seq``.
Sub-byte dtypes (i4/u4) describe the *logical* element type; their storage packs two elements
per byte along the last dim, so ``nbytes`` is the real packed size.
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Mapping, Union

import torch

Dim = Union[int, str]
SYMBOL_RE = re.compile(r"^(\d+\*)?[A-Za-z_][A-Za-z0-9_]*(\*[A-Za-z_][A-Za-z0-9_]*)*$")


class DType(enum.Enum):
    f64 = "f64"
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    f8e4m3 = "f8e4m3"
    f8e5m2 = "f8e5m2"
    i64 = "i64"
    i32 = "i32"
    i16 = "i16"
    i8 = "i8"
    u8 = "u8"
    u64 = "u64"
    u32 = "u32"
    u16 = "u16"
    i4 = "i4"
    u4 = "u4"
    bool = "bool"
    c64 = "c64"
    c128 = "c128"

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def is_packed(self) -> bool:
        """True for sub-byte types stored two per byte (in a u8 tensor)."""
        return self.bits < 8

    @property
    def is_float(self) -> bool:
        return self in (DType.f64, DType.f32, DType.f16, DType.bf16, DType.f8e4m3, DType.f8e5m2)

    @property
    def torch(self) -> torch.dtype:
        """The torch dtype of the storage tensor."""
        return _TORCH[self]

    @staticmethod
    def from_torch(dt: torch.dtype) -> "DType":
        try:
            return _FROM_TORCH[dt]
        except KeyError:
            raise TypeError(f"torch dtype {dt} has no presso dtype; supported: "
                            f"{sorted(str(d) for d in _FROM_TORCH)}") from None

    def __str__(self) -> str:
        return self.value


_BITS = {DType.f64: 64, DType.f32: 32, DType.f16: 16, DType.bf16: 16, DType.f8e4m3: 8,
         DType.f8e5m2: 8, DType.i64: 64, DType.i32: 32, DType.i16: 16, DType.i8: 8, DType.u8: 8,
         DType.i4: 4, DType.u4: 4, DType.bool: 8, DType.u64: 64, DType.u32: 32, DType.u16: 16,
         DType.c64: 64, DType.c128: 128}
_TORCH = {DType.f64: torch.float64, DType.f32: torch.float32, DType.f16: torch.float16,
          DType.bf16: torch.bfloat16, DType.f8e4m3: torch.float8_e4m3fn,
          DType.f8e5m2: torch.float8_e5m2, DType.i64: torch.int64, DType.i32: torch.int32,
          DType.i16: torch.int16, DType.i8: torch.int8, DType.u8: torch.uint8,
          DType.i4: torch.uint8, DType.u4: torch.uint8, DType.bool: torch.bool, DType.u64: torch.uint64,
          DType.u32: torch.uint32, DType.u16: torch.uint16, DType.c64: torch.complex64,
          DType.c128: torch.complex128}
_FROM_TORCH = {v: k for k, v in _TORCH.items() if k not in (DType.i4, DType.u4)}


def symbols_of(dim: Dim) -> list[str]:
    return [] if isinstance(dim, int) else [s for s in dim.split("*") if not s.isdigit()]


def eval_dim(dim: Dim, bindings: Mapping[str, int]) -> int:
    """Concrete size of a dim given values for its symbols."""
    if isinstance(dim, int):
        return dim
    return math.prod(int(s) if s.isdigit() else bindings[s] for s in dim.split("*"))


def check_dim(dim) -> Dim:
    if isinstance(dim, bool) or not isinstance(dim, (int, str)):
        raise TypeError(f"a dim must be an int or a symbol name, got {dim!r}")
    if isinstance(dim, int) and dim < 0:
        raise TypeError(f"a dim must be >= 0, got {dim}")
    if isinstance(dim, str) and not SYMBOL_RE.match(dim):
        raise TypeError(f"bad symbolic dim {dim!r}: use a name like 'batch' or a product like 'batch*seq' or '4*seq'")
    return dim


@dataclass(frozen=True)
class TensorType:
    """Shape (ints and symbols) and element dtype of a value."""

    shape: tuple
    dtype: DType

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(check_dim(d) for d in self.shape))
        if not isinstance(self.dtype, DType):
            raise TypeError(f"dtype must be a DType, got {self.dtype!r}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def symbols(self) -> set[str]:
        return {s for d in self.shape for s in symbols_of(d)}

    def concrete_shape(self, bindings: Mapping[str, int] = {}) -> tuple[int, ...]:
        return tuple(eval_dim(d, bindings) for d in self.shape)

    def numel(self, bindings: Mapping[str, int] = {}) -> int:
        return math.prod(self.concrete_shape(bindings))

    def nbytes(self, bindings: Mapping[str, int] = {}) -> int:
        """Bytes of real storage: sub-byte types pack two per byte along the last dim."""
        shape = self.concrete_shape(bindings)
        if self.dtype.is_packed:
            inner = shape[-1] if shape else 1
            return math.prod(shape[:-1]) * ((inner * self.dtype.bits + 7) // 8)
        return math.prod(shape) * self.dtype.bits // 8

    def storage_shape(self, bindings: Mapping[str, int] = {}) -> tuple[int, ...]:
        """Shape of the torch tensor holding this value (last dim halved for packed types)."""
        shape = self.concrete_shape(bindings)
        if self.dtype.is_packed and shape:
            return shape[:-1] + ((shape[-1] * self.dtype.bits + 7) // 8,)
        return shape

    def with_shape(self, shape) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    @staticmethod
    def of(t: torch.Tensor) -> "TensorType":
        return TensorType(tuple(t.shape), DType.from_torch(t.dtype))


def dims_product(dims) -> Dim:
    """The product of dims as one canonical dim: ``[batch, seq, 4]`` -> ``4*batch*seq``."""
    coef, syms = 1, []
    for d in dims:
        if isinstance(d, int):
            coef *= d
        else:
            for part in d.split("*"):
                if part.isdigit():
                    coef *= int(part)
                else:
                    syms.append(part)
    if not syms:
        return coef
    return "*".join(([str(coef)] if coef != 1 else []) + sorted(syms))
