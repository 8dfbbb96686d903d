"""Low-rank linears y = (x A^T) B^T + b (``lowrank`` pass: A [R, K], B [N, R]) in one launch for
decode (M <= 2), the intermediate t = x A^T never leaving registers.

Programs tile (rank chunk, output block): each computes its chunk of t from the chunk's rows of A,
then that chunk's contribution to its block of outputs from B's columns; the rank chunks of an
output block are added by the last-arriving program (an atomic counter it resets, so CUDA-graph
replays find it clean), which applies bias and epilogue. A chunk of A is read once per output
block (from L2 after the first); B once. Two GEMV launches instead pay a launch and a round trip
of t each, and a GEMV over the few rows of A or the narrow B leaves most of the GPU idle.

For M > 2 the two matmuls run as torch linears (tensor cores; t is small next to x and y), and a
folded epilogue as a generated elementwise kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .epilogue import Epilogue, output_buffer
from .int4 import INTERPRET, _store_row, _zeroed_counters

MAX_FUSED_M = 2


@triton.jit
def _lowrank_gemv_kernel(x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, e0_ptr, e1_ptr, N, K, R, stride_xm,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, N_PER: tl.constexpr,
                         HAS_BIAS: tl.constexpr, EPI: tl.constexpr, E0: tl.constexpr, E1: tl.constexpr):
    pid_n, pid_r, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(1)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = rr < R
    t = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < K
        xk = tl.load(x_ptr + m * stride_xm + rk, mask=mk, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        t += tl.sum(a.to(tl.float32) * xk[None, :], axis=1)
    for n0 in range(pid_n * N_PER, tl.minimum(N, pid_n * N_PER + N_PER), BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mn = rn < N
        b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=mn[:, None] & mr[None, :], other=0.0)
        part = tl.sum(b.to(tl.float32) * t[None, :], axis=1)
        tl.store(ws_ptr + (m * splits + pid_r) * N + rn, part, mask=mn)
    cnt = cnt_ptr + m * tl.num_programs(0) + pid_n
    if tl.atomic_add(cnt, 1, sem="acq_rel") == splits - 1:
        for n0 in range(pid_n * N_PER, tl.minimum(N, pid_n * N_PER + N_PER), BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mn = rn < N
            tot = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for s in range(0, splits):
                tot += tl.load(ws_ptr + (m * splits + s) * N + rn, mask=mn, other=0.0, cache_modifier=".cg")
            _store_row(tot, bias_ptr, y_ptr, m * N + rn, rn, mn, e0_ptr, e1_ptr, HAS_BIAS, EPI, E0, E1)
        tl.store(cnt, 0)


def lowrank_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   epilogue: Optional[Epilogue] = None, extras: tuple = (), block_r: Optional[int] = None,
                   n_per: Optional[int] = None, num_warps: int = 4) -> torch.Tensor:
    """x [..., K] @ A^T @ B^T (+ bias) (-> epilogue) -> [..., N] for A [R, K], B [N, R]."""
    K, R, N = x.shape[-1], a.shape[0], b.shape[0]
    if a.shape[1] != K or b.shape[1] != R:
        raise ValueError(f"lowrank_linear: x [..., {K}], A {tuple(a.shape)} and B {tuple(b.shape)} do not fit")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M > MAX_FUSED_M:
        y = F.linear(F.linear(x2, a), b, bias)
        if epilogue is not None:
            from .elementwise import fused_elementwise
            ops: list = [None] * (len(extras) + 1)
            ops[epilogue.acc_index] = y
            for j, e in zip(epilogue.extra_indices, extras):
                ops[j] = e.reshape(M, N) if e.numel() == M * N else e
            y = fused_elementwise(epilogue.expr, ops, (M, N), epilogue.out_dtype)
        return y.reshape(*x.shape[:-1], N)
    y, epi = output_buffer(x, M, N, epilogue, extras)
    br = block_r or (16 if INTERPRET else 32)
    splits = triton.cdiv(R, br)
    npp = n_per or (32 if INTERPRET else max(256, triton.next_power_of_2(triton.cdiv(N, 8))))
    bn = min(npp, 32 if INTERPRET else 256)
    blocks = triton.cdiv(N, npp)
    ws = torch.empty(M * splits, N, dtype=torch.float32, device=x.device)
    cnt = _zeroed_counters(M * blocks, x.device)
    _lowrank_gemv_kernel[(blocks, splits, M)](
        x2, a.contiguous(), b.contiguous(), bias if bias is not None else b, y, ws, cnt, epi.pop("e0_ptr"),
        epi.pop("e1_ptr"), N, K, R, x2.stride(0), BLOCK_R=br, BLOCK_K=16 if INTERPRET else 256, BLOCK_N=bn,
        N_PER=npp, HAS_BIAS=bias is not None, num_warps=num_warps, **epi)
    return y.reshape(*x.shape[:-1], N)
