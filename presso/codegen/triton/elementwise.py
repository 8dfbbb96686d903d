"""Triton kernels generated from ``fused_elementwise`` regions: one load per operand, the whole
expression in registers (float32 for float operands), one store.

Each operand either has the output's shape and is contiguous (read at the flat offset) or is
broadcast (read through its strides, 0 on broadcast dims); the kernel is specialized on which,
on the rank and on the expression, so its source -- and its cache key -- says exactly that.
"""
from __future__ import annotations

import torch

from ...ir.expr import Arg, Const, Expr, parse
from ...ir.types import DType
from .source import load_source

BLOCK = 1024

_TL_DTYPE = {"f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16", "f64": "tl.float64",
             "i64": "tl.int64", "i32": "tl.int32", "i16": "tl.int16", "i8": "tl.int8", "u8": "tl.uint8",
             "bool": "tl.int1"}

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "eq": "==", "ne": "!=", "lt": "<", "le": "<=",
          "gt": ">", "ge": ">=", "logical_and": "&", "logical_or": "|"}
_UNARY = {
    "neg": "(-{0})", "abs": "tl.abs({0})", "exp": "tl.exp({0})", "log": "tl.log({0})", "sqrt": "tl.sqrt({0})",
    "rsqrt": "tl.rsqrt({0})", "reciprocal": "(1.0 / {0})", "sin": "tl.sin({0})", "cos": "tl.cos({0})",
    "tanh": "(2.0 / (1.0 + tl.exp(-2.0 * {0})) - 1.0)", "erf": "tl.math.erf({0})",
    "sigmoid": "(1.0 / (1.0 + tl.exp(-{0})))", "relu": "tl.maximum({0}, 0.0)", "silu": "({0} / (1.0 + tl.exp(-{0})))",
    "logical_not": "({0} == 0)",
}


def _code(e: Expr) -> str:
    if isinstance(e, Arg):
        return f"x{e.index}"
    if isinstance(e, Const):
        v = e.value
        if v != v:
            return "float('nan')"
        if v in (float("inf"), float("-inf")):
            return ("-" if v < 0 else "") + "float('inf')"
        return repr(float(v)) if DType[e.dtype].is_float else repr(int(v))
    a = [_code(x) for x in e.args]
    if e.op in _INFIX:
        return f"({a[0]} {_INFIX[e.op]} {a[1]})"
    if e.op in ("maximum", "minimum"):
        return f"tl.{e.op}({a[0]}, {a[1]})"
    if e.op == "where":
        return f"tl.where({a[0]}, {a[1]}, {a[2]})"
    if e.op == "cast":
        return f"({a[0]}).to({_TL_DTYPE[e.attr]})"
    if e.op == "gelu":
        if e.attr == "tanh":
            inner = f"(0.7978845608028654 * ({a[0]} + 0.044715 * {a[0]} * {a[0]} * {a[0]}))"
            return f"(0.5 * {a[0]} * (1.0 + {_UNARY['tanh'].format(inner)}))"
        return f"(0.5 * {a[0]} * (1.0 + tl.math.erf({a[0]} * 0.7071067811865476)))"
    return _UNARY[e.op].format(*a)


def kernel_source(expr: str, broadcast: tuple[bool, ...], float_in: tuple[bool, ...], rank: int) -> str:
    """Source of one kernel for ``expr`` over operands (broadcast or flat) of a rank-``rank`` output."""
    tree = parse(expr)
    n = len(broadcast)
    args = ["out_ptr"] + [f"x{i}_ptr" for i in range(n)] + ["numel"] + [f"d{d}" for d in range(rank)]
    args += [f"x{i}_s{d}" for i in range(n) if broadcast[i] for d in range(rank)]
    lines = ["import triton", "import triton.language as tl", "", "", "@triton.jit",
             f"def fused_kernel({', '.join(args)}, BLOCK: tl.constexpr):",
             "    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
             "    mask = offs < numel"]
    if any(broadcast):
        lines.append("    rest = offs")
        for d in reversed(range(rank)):
            lines.append(f"    i{d} = rest % d{d}")
            lines.append(f"    rest = rest // d{d}")
    for i in range(n):
        if broadcast[i]:
            off = " + ".join(f"i{d} * x{i}_s{d}" for d in range(rank)) or "0"
        else:
            off = "offs"
        cvt = ".to(tl.float32)" if float_in[i] else ""
        lines.append(f"    x{i} = tl.load(x{i}_ptr + {off}, mask=mask, other=0){cvt}")
    lines.append(f"    y = {_code(tree)}")
    lines.append("    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


def fused_elementwise(expr: str, xs: list[torch.Tensor], out_shape, out_dtype: torch.dtype) -> torch.Tensor:
    """Run the generated kernel for ``expr`` over ``xs`` (broadcast to ``out_shape``)."""
    out_shape = tuple(out_shape)
    rank = max(len(out_shape), 1)
    shape = out_shape or (1,)
    ins, broadcast = [], []
    for x in xs:
        if x.dtype == torch.bool:
            x = x.to(torch.uint8)
        if tuple(x.shape) == out_shape and x.is_contiguous():
            ins.append(x)
            broadcast.append(False)
        else:
            ins.append(x.reshape((1,) * (rank - x.dim()) + tuple(x.shape)).expand(shape))
            broadcast.append(True)
    src = kernel_source(expr, tuple(broadcast), tuple(x.is_floating_point() for x in xs), rank)
    kernel = load_source(src, "fused_kernel")
    store_dtype = torch.uint8 if out_dtype == torch.bool else out_dtype
    out = torch.empty(out_shape, dtype=store_dtype, device=xs[0].device if xs else "cpu")
    numel = out.numel()
    strides = [s for x, b in zip(ins, broadcast) if b for s in x.stride()]
    grid = (max(triton_cdiv(numel, BLOCK), 1),)
    kernel[grid](out, *ins, numel, *shape, *strides, BLOCK=BLOCK)
    return out.to(torch.bool) if out_dtype == torch.bool else out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
