"""Compressed linear kernels: y = x W^T + b with W stored compressed, read directly by the kernel
(never densified in memory).

* ``int4_linear``: group-wise int4 weights, two codes per byte along K (low nibble = even k),
  fp16 scales per (row, group), optional u8 zero points. One byte load feeds two FMAs: the even
  and odd columns of x are loaded separately and multiplied by the low and high nibbles.
* ``nm_linear``: N:M sparse weights as kept values [N_out, K*n/m] and 4-bit in-group positions;
  each kept value gathers its x entry (x is small and cache-resident at decode).

Decode (M <= 16 rows) uses a broadcast-and-reduce inner product; larger M uses ``tl.dot``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _int4_linear_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G, stride_xm, stride_qn, stride_sn,
                        stride_ym, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, USE_DOT: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    KH = K // 2
    for j0 in range(0, KH, BLOCK_KH):
        rj = j0 + tl.arange(0, BLOCK_KH)                       # packed byte index: k = 2j, 2j + 1
        mj = rj < KH
        xm = (rm < M)[:, None] & mj[None, :]
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rj[None, :], mask=xm, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rj[None, :] + 1, mask=xm, other=0.0).to(tl.float32)
        wm = mj[:, None] & (rn < N)[None, :]
        qb = tl.load(q_ptr + rn[None, :] * stride_qn + rj[:, None], mask=wm, other=0).to(tl.int32)  # [KH, N]
        lo = qb & 0xF
        hi = (qb >> 4) & 0xF
        g = (2 * rj) // G
        s = tl.load(s_ptr + rn[None, :] * stride_sn + g[:, None], mask=wm, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + rn[None, :] * stride_sn + g[:, None], mask=wm, other=0).to(tl.float32)
            w_lo = (lo.to(tl.float32) - z) * s
            w_hi = (hi.to(tl.float32) - z) * s
        else:
            w_lo = tl.where(lo > 7, lo - 16, lo).to(tl.float32) * s
            w_hi = tl.where(hi > 7, hi - 16, hi).to(tl.float32) * s
        if USE_DOT:
            acc += tl.dot(x_even, w_lo) + tl.dot(x_odd, w_hi)
        else:
            acc += tl.sum(x_even[:, :, None] * w_lo[None, :, :] + x_odd[:, :, None] * w_hi[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ym = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)


def int4_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bias: torch.Tensor | None, group_size: int, block_n: int | None = None, block_kh: int | None = None,
                num_warps: int = 4):
    """x [..., K] @ dequant(q [N, K/2] packed int4, scales [N, K/G], zeros)^T + bias -> [..., N]."""
    K = x.shape[-1]
    N = q.shape[0]
    if q.shape[1] * 2 != K or K % group_size or group_size % 2 or scales.shape != (N, K // group_size):
        raise ValueError(f"int4_linear: x [..., {K}], q {tuple(q.shape)}, scales {tuple(scales.shape)} and "
                         f"group_size {group_size} do not fit together")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    use_dot = M > 16 and not INTERPRET
    bm = 16 if use_dot else (1 if M == 1 else min(triton.next_power_of_2(M), 4))
    bn = block_n or (64 if INTERPRET else 128)
    bkh = block_kh or (32 if INTERPRET else 64)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _int4_linear_kernel[grid](x2, q, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
                              y, M, N, K, group_size, x2.stride(0), q.stride(0), scales.stride(0), y.stride(0),
                              HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
                              BLOCK_KH=bkh, USE_DOT=use_dot, num_warps=num_warps)
    return y.reshape(*x.shape[:-1], N)


@triton.jit
def _nm_linear_kernel(x_ptr, v_ptr, i_ptr, b_ptr, y_ptr, M, N, KV, stride_xm, stride_vn, stride_in, stride_ym,
                      KEEP: tl.constexpr, GROUP: tl.constexpr, PACKED: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    pid_n, m = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(0, KV, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        msk = (rj < KV)[:, None] & (rn < N)[None, :]
        v = tl.load(v_ptr + rn[None, :] * stride_vn + rj[:, None], mask=msk, other=0.0).to(tl.float32)
        if PACKED:
            ib = tl.load(i_ptr + rn[None, :] * stride_in + (rj // 2)[:, None], mask=msk, other=0).to(tl.int32)
            idx = (ib >> ((rj % 2) * 4)[:, None]) & 0xF
        else:
            idx = tl.load(i_ptr + rn[None, :] * stride_in + rj[:, None], mask=msk, other=0).to(tl.int32)
        k = (rj // KEEP)[:, None] * GROUP + idx
        xv = tl.load(x_ptr + m * stride_xm + k, mask=msk, other=0.0).to(tl.float32)
        acc += tl.sum(v * xv, axis=0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


def nm_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, n: int, m: int,
              bias: torch.Tensor | None = None, block_n: int | None = None, block_j: int | None = None,
              num_warps: int = 4):
    """x [..., K] @ densify_nm(values [N, K*n/m], index)^T + bias, reading the compressed form."""
    N, KV = values.shape
    K = x.shape[-1]
    packed = index.shape[1] * 2 == KV
    if KV * m != K * n or (not packed and index.shape != values.shape):
        raise ValueError(f"nm_linear: values {tuple(values.shape)} / index {tuple(index.shape)} do not hold "
                         f"{n}:{m} of K={K}")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bn = block_n or (64 if INTERPRET else 128)
    bj = block_j or (32 if INTERPRET else 64)
    _nm_linear_kernel[(triton.cdiv(N, bn), M)](x2, values, index, bias if bias is not None else values, y, M, N, KV,
                                               x2.stride(0), values.stride(0), index.stride(0), y.stride(0), KEEP=n,
                                               GROUP=m, PACKED=packed, HAS_BIAS=bias is not None, BLOCK_N=bn,
                                               BLOCK_J=bj, num_warps=num_warps)
    return y.reshape(*x.shape[:-1], N)


@triton.jit
def _int8_linear_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G, stride_xm, stride_qn, stride_sn,
                        stride_ym, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm < M)[:, None] & mk[None, :],
                    other=0.0).to(tl.float32)
        wm = mk[:, None] & (rn < N)[None, :]
        q = tl.load(q_ptr + rn[None, :] * stride_qn + rk[:, None], mask=wm, other=0).to(tl.float32)   # [K, N]
        g = rk // G
        s = tl.load(s_ptr + rn[None, :] * stride_sn + g[:, None], mask=wm, other=0.0).to(tl.float32)
        if HAS_ZERO:
            q = q - tl.load(z_ptr + rn[None, :] * stride_sn + g[:, None], mask=wm, other=0).to(tl.float32)
        w = q * s
        if USE_DOT:
            acc += tl.dot(x, w)
        else:
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bias: torch.Tensor | None, group_size: int, num_warps: int = 4):
    """x [..., K] @ dequant(q [N, K] int8 or uint8 with zeros, scales [N, K/G])^T + bias -> [..., N]."""
    N, K = q.shape
    if x.shape[-1] != K or K % group_size or scales.shape != (N, K // group_size):
        raise ValueError(f"int8_linear: x [..., {x.shape[-1]}], q {tuple(q.shape)}, scales {tuple(scales.shape)} "
                         f"and group_size {group_size} do not fit together")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    use_dot = M > 16 and not INTERPRET
    bm = 16 if use_dot else (1 if M == 1 else min(triton.next_power_of_2(M), 4))
    bn = 64 if INTERPRET else 128
    bk = 32 if INTERPRET else 64
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _int8_linear_kernel[grid](x2, q, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
                              y, M, N, K, group_size, x2.stride(0), q.stride(0), scales.stride(0), y.stride(0),
                              HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
                              BLOCK_K=bk, USE_DOT=use_dot, num_warps=num_warps)
    return y.reshape(*x.shape[:-1], N)
