"""Row-wise normalization kernels (one program per row, the row in registers): RMSNorm and
LayerNorm over the last dim, statistics in float32 as the reference computes them."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, D, eps, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    if RMS:
        var = tl.sum(x * x, axis=0) / D
        y = x * tl.rsqrt(var + eps)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32)     # the reference rounds before the weight
    else:
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(m, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / D
        y = xc * tl.rsqrt(var + eps)
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=m)


def norm(x: torch.Tensor, weight, bias, eps: float, rms: bool) -> torch.Tensor:
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    y = torch.empty_like(x2)
    block = triton.next_power_of_2(D)
    _norm_kernel[(x2.shape[0],)](x2, weight if weight is not None else x2, bias if bias is not None else x2, y, D,
                                 eps, RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=block,
                                 num_warps=4 if block <= 2048 else 8)
    return y.reshape(x.shape)


def rms_norm(x, weight, eps):
    return norm(x, weight, None, eps, rms=True)


def layer_norm(x, weight, bias, eps):
    return norm(x, weight, bias, eps, rms=False)
