"""RoPE (the ``rotary`` op, half-split convention: x cos + rotate_half(x) sin) in one kernel.

The op's torch reference is six kernels (two slices, a negation, a concatenation, two multiplies
and an add); at decode each of a layer's two rotations is a few hundred elements, so those were
six launches of almost nothing. Here one program rotates a block of rows: both halves of a row
are loaded once, cos / sin read through broadcast strides (never materialized at x's shape), the
arithmetic in fp32 and one rounding to the output dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, c_ptr, s_ptr, y_ptr, ROWS, S1, S2, HALF, sx0, sx1, sx2, sc0, sc1, sc2, ss0, ss1, ss2,
                   BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    i2 = r % S2
    i1 = (r // S2) % S1
    i0 = r // (S1 * S2)
    d = tl.arange(0, BLOCK_H)
    m = (r < ROWS)[:, None] & (d < HALF)[None, :]
    xo = (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None] + d[None, :]
    co = (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None] + d[None, :]
    so = (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None] + d[None, :]
    x1 = tl.load(x_ptr + xo, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo + HALF, mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(c_ptr + co, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + co + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr + so, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + so + HALF, mask=m, other=0.0).to(tl.float32)
    yo = r[:, None] * (2 * HALF) + d[None, :]
    tl.store(y_ptr + yo, (x1 * c1 - x2 * s1).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(y_ptr + yo + HALF, (x2 * c2 + x1 * s2).to(y_ptr.dtype.element_ty), mask=m)


def _as_4d(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """t broadcast to ``shape`` (a view: zero strides where it repeats), with leading dims added up to rank 4."""
    t = t.broadcast_to(shape)
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def fits(x_shape) -> bool:
    return 1 <= len(x_shape) <= 4 and isinstance(x_shape[-1], int) and x_shape[-1] % 2 == 0


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x [..., D] (rank <= 4) rotated by cos / sin (broadcastable to x) -> a new contiguous tensor."""
    D = x.shape[-1]
    if D % 2 or x.dim() > 4:
        raise ValueError(f"rotary: x {tuple(x.shape)} must have rank <= 4 and an even last dim")
    if x.stride(-1) != 1:
        x = x.contiguous()
    x4, c4, s4 = _as_4d(x, x.shape), _as_4d(cos, x.shape), _as_4d(sin, x.shape)
    if c4.stride(-1) != 1 or s4.stride(-1) != 1:          # (a broadcast last dim)
        c4, s4 = c4.contiguous(), s4.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    S0, S1, S2 = x4.shape[:3]
    rows = S0 * S1 * S2
    half = D // 2
    block_h = triton.next_power_of_2(half)
    block_r = max(1, min(64, 4096 // block_h))
    _rotary_kernel[(triton.cdiv(rows, block_r),)](
        x4, c4, s4, y, rows, S1, S2, half, *x4.stride()[:3], *c4.stride()[:3], *s4.stride()[:3],
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4)
    return y
