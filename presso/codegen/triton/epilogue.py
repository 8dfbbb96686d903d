"""Epilogues folded into the compressed-linear kernels: the elementwise node that is a linear's
only user (a ``fused_elementwise`` region or one fusable op, e.g. the residual ``add`` or SwiGLU's
``mul(silu(%0),%1)``) runs on the kernel's fp32 accumulator before the single store, so the
linear's output never goes through global memory.

The linear's output is one operand of the expression; up to two others are read by the kernel at
the output tile's positions, each either full-shaped ([M, N], contiguous) or a row vector ([N]).
The expression becomes a generated ``@triton.jit`` function (cached by source hash, like the
elementwise kernels) passed to the kernel as a constexpr.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ...ir.expr import parse
from .elementwise import _code
from .source import load_source

MAX_EXTRA = 2
NONE, FULL, ROW = 0, 1, 2       # how the kernel reads an extra operand


@triton.jit
def identity(acc, e0, e1):
    return acc


@triton.jit
def apply_epilogue(acc, offs, cols, mask, e0_ptr, e1_ptr, EPI: tl.constexpr, E0: tl.constexpr, E1: tl.constexpr):
    """acc (fp32) -> EPI(acc, e0, e1); ``offs`` are the tile's flat offsets into the [M, N] output,
    ``cols`` its column indices (same shape)."""
    e0 = 0.0
    e1 = 0.0
    if E0 == 1:
        e0 = tl.load(e0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if E0 == 2:
        e0 = tl.load(e0_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if E1 == 1:
        e1 = tl.load(e1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if E1 == 2:
        e1 = tl.load(e1_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return EPI(acc, e0, e1)


@triton.jit
def store_tile(acc, b_ptr, y_ptr, rm, rn, mm, mn, N, e0_ptr, e1_ptr, HAS_BIAS: tl.constexpr, EPI: tl.constexpr,
               E0: tl.constexpr, E1: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] output tile of a contiguous [M, N] y: bias, epilogue, one store."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    offs = rm[:, None] * N + rn[None, :]
    mask = mm[:, None] & mn[None, :]
    acc = apply_epilogue(acc, offs, rn[None, :] + 0 * rm[:, None], mask, e0_ptr, e1_ptr, EPI, E0, E1)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue_kernel(y_ptr, out_ptr, e0_ptr, e1_ptr, total, N, BLOCK: tl.constexpr, EPI: tl.constexpr,
                     E0: tl.constexpr, E1: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = apply_epilogue(acc, offs, offs % N, mask, e0_ptr, e1_ptr, EPI, E0, E1)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def run_epilogue(y: torch.Tensor, epilogue: "Epilogue | None", extras) -> torch.Tensor:
    """y [M, N] (contiguous) -> the epilogue applied as one elementwise kernel, for the paths that
    produce a linear's output outside presso's kernels (a dense matmul on a densified workspace)."""
    if epilogue is None:
        return y
    M, N = y.shape
    out, epi = output_buffer(y, M, N, epilogue, extras)
    _epilogue_kernel[(triton.cdiv(M * N, 1024),)](y, out, epi.pop("e0_ptr"), epi.pop("e1_ptr"), M * N, N,
                                                  BLOCK=1024, **epi)
    return out


def run_pair_epilogue(y: torch.Tensor, epilogue: "Epilogue") -> torch.Tensor:
    """y [..., 2N] (two stacked linears' outputs) -> the epilogue of its halves, [..., N]: the
    paired kernels' fallback where no paired kernel runs (one elementwise kernel)."""
    from .elementwise import fused_elementwise
    n = y.shape[-1] // 2
    ops = [None, None]
    ops[epilogue.acc_index], ops[epilogue.extra_indices[0]] = y[..., :n], y[..., n:]
    return fused_elementwise(epilogue.expr, ops, tuple(y.shape[:-1]) + (n,), epilogue.out_dtype)


def epilogue_source(expr: str, acc_index: int, extra_indices: tuple[int, ...]) -> str:
    lines = ["import triton", "import triton.language as tl", "", "", "@triton.jit",
             "def epilogue(acc, e0, e1):", f"    x{acc_index} = acc"]
    lines += [f"    x{i} = e{j}" for j, i in enumerate(extra_indices)]
    lines.append(f"    return {_code(parse(expr))}")
    return "\n".join(lines) + "\n"


@dataclass
class Epilogue:
    """``expr`` over the region's operands; the linear's output is operand ``acc_index``, the
    tensors ``extras`` are operands ``extra_indices``; ``out_dtype`` the region's result dtype."""
    expr: str
    acc_index: int
    extra_indices: tuple[int, ...]
    out_dtype: torch.dtype
    fn: object = field(init=False)

    def __post_init__(self):
        if len(self.extra_indices) > MAX_EXTRA:
            raise ValueError(f"an epilogue reads at most {MAX_EXTRA} tensors besides the linear's output")
        self.fn = load_source(epilogue_source(self.expr, self.acc_index, self.extra_indices), "epilogue")

    def kernel_args(self, extras: list[torch.Tensor], out_shape: tuple[int, ...]) -> dict:
        """Pointers and read modes for the kernel (unused slots point at the first tensor)."""
        ptrs, kinds = [], []
        for t in extras:
            if tuple(t.shape) == tuple(out_shape):
                ptrs.append(t.contiguous())
                kinds.append(FULL)
            elif t.numel() == out_shape[-1] and t.shape[-1] == out_shape[-1]:
                ptrs.append(t.reshape(-1).contiguous())
                kinds.append(ROW)
            else:
                raise ValueError(f"epilogue operand of shape {tuple(t.shape)} is neither the output's "
                                 f"{tuple(out_shape)} nor a row of it")
        while len(ptrs) < MAX_EXTRA:
            ptrs.append(ptrs[0] if ptrs else None)
            kinds.append(NONE)
        return {"e0_ptr": ptrs[0], "e1_ptr": ptrs[1], "EPI": self.fn, "E0": kinds[0], "E1": kinds[1]}


def no_epilogue(dummy: torch.Tensor) -> dict:
    return {"e0_ptr": dummy, "e1_ptr": dummy, "EPI": identity, "E0": NONE, "E1": NONE}


def output_buffer(x: torch.Tensor, M: int, N: int, epilogue: "Epilogue | None", extras) -> tuple[torch.Tensor, dict]:
    """The [M, N] output buffer (the epilogue's dtype when there is one) and the epilogue's kernel args."""
    if epilogue is None:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        return y, no_epilogue(y)
    y = torch.empty(M, N, dtype=epilogue.out_dtype, device=x.device)
    return y, epilogue.kernel_args([e.reshape(M, N) if e.numel() == M * N else e for e in extras], (M, N))
