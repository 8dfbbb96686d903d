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
    """Weights are read as [BLOCK_N, BLOCK_KH] byte tiles, contiguous along K (coalesced, wide
    loads); a chunk of BLOCK_KH bytes = 2*BLOCK_KH columns lies inside one quantization group,
    so each row's scale (and zero) is loaded once per chunk and applied to the chunk's partial dot."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, mn = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    KH = K // 2
    for j0 in range(0, KH, BLOCK_KH):
        rj = j0 + tl.arange(0, BLOCK_KH)                       # packed byte index: k = 2j, 2j + 1
        mj = rj < KH
        qb = tl.load(q_ptr + rn[:, None] * stride_qn + rj[None, :], mask=mn[:, None] & mj[None, :], other=0)
        qb = qb.to(tl.int32)
        if HAS_ZERO:
            lo = (qb & 0xF).to(tl.float32)
            hi = ((qb >> 4) & 0xF).to(tl.float32)
        else:
            lo = (((qb & 0xF) ^ 8) - 8).to(tl.float32)
            hi = ((((qb >> 4) & 0xF) ^ 8) - 8).to(tl.float32)
        g = (2 * j0) // G
        s = tl.load(s_ptr + rn * stride_sn + g, mask=mn, other=0.0).to(tl.float32)          # [BLOCK_N]
        xm = mm[:, None] & mj[None, :]
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rj[None, :], mask=xm, other=0.0)
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rj[None, :] + 1, mask=xm, other=0.0)
        if USE_DOT:
            part = tl.dot(x_even, tl.trans(lo.to(x_even.dtype))) + tl.dot(x_odd, tl.trans(hi.to(x_odd.dtype)))
            if HAS_ZERO:
                z = tl.load(z_ptr + rn * stride_sn + g, mask=mn, other=0).to(tl.float32)
                xs = tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=1)
                part = part - xs[:, None] * z[None, :]
        else:
            xe, xo = x_even.to(tl.float32), x_odd.to(tl.float32)
            part = tl.sum(lo[None, :, :] * xe[:, None, :] + hi[None, :, :] * xo[:, None, :], axis=2)
            if HAS_ZERO:
                z = tl.load(z_ptr + rn * stride_sn + g, mask=mn, other=0).to(tl.float32)
                part = part - tl.sum(xe + xo, axis=1)[:, None] * z[None, :]
        acc += part * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _int4_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
                      HG: tl.constexpr, GPB: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Decode (one row of x per program column): weights as [BLOCK_N, GPB, HG] byte tiles, GPB
    whole quantization groups per step so each step keeps many bytes in flight; a group's dot is
    reduced first, then scaled by the group's scale (one scale load per row and group)."""
    pid_n, m = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    rg = tl.arange(0, GPB)
    rh = tl.arange(0, HG)
    NG = K // (2 * HG)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g0 in range(0, NG, GPB):
        gi = g0 + rg
        mg = gi < NG
        byte = gi[:, None] * HG + rh[None, :]                                   # [GPB, HG]
        qb = tl.load(q_ptr + rn[:, None, None] * stride_qn + byte[None, :, :],
                     mask=mn[:, None, None] & mg[None, :, None], other=0)
        xe = tl.load(x_ptr + m * stride_xm + 2 * byte, mask=mg[:, None], other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + m * stride_xm + 2 * byte + 1, mask=mg[:, None], other=0.0).to(tl.float32)
        if not HAS_ZERO:
            qb = qb ^ 0x88        # two's-complement nibble c becomes c + 8 in [0, 16), both nibbles in one op
        lo = (qb & 15).to(tl.float32)
        hi = (qb >> 4).to(tl.float32)
        part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)       # [BLOCK_N, GPB]
        xsum = tl.sum(xe + xo, axis=1)                                          # [GPB], shared by all rows
        smask = mn[:, None] & mg[None, :]
        sc = tl.load(s_ptr + rn[:, None] * stride_sn + gi[None, :], mask=smask, other=0.0).to(tl.float32)
        if HAS_ZERO:     # sum (c - z) x = sum c x - z sum x
            z = tl.load(z_ptr + rn[:, None] * stride_sn + gi[None, :], mask=smask, other=0).to(tl.float32)
            part = part - xsum[None, :] * z
        else:            # the + 8 of every signed code comes back as one term per group
            part = part - 8.0 * xsum[None, :]
        acc += tl.sum(part * sc, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=mn)


def int4_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bias: torch.Tensor | None, group_size: int, block_n: int | None = None, block_kh: int | None = None,
                num_warps: int | None = None, num_stages: int | None = None):
    """x [..., K] @ dequant(q [N, K/2] packed int4, scales [N, K/G], zeros)^T + bias -> [..., N]."""
    K = x.shape[-1]
    N = q.shape[0]
    if q.shape[1] * 2 != K or K % group_size or group_size % 2 or scales.shape != (N, K // group_size):
        raise ValueError(f"int4_linear: x [..., {K}], q {tuple(q.shape)}, scales {tuple(scales.shape)} and "
                         f"group_size {group_size} do not fit together")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    hg = group_size // 2
    if M <= 2 and hg & (hg - 1) == 0 and hg >= 8:
        # GEMV: whole groups per step; block_kh here means bytes per row per step
        gpb = max(1, (block_kh or (16 if INTERPRET else 256)) // hg)
        bn = block_n or (16 if INTERPRET else 8)
        _int4_gemv_kernel[(triton.cdiv(N, bn), M)](
            x2, q, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y, N, K,
            x2.stride(0), q.stride(0), scales.stride(0), y.stride(0), HG=hg, GPB=triton.next_power_of_2(gpb),
            HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, BLOCK_N=bn, num_warps=num_warps or 4, **extra)
        return y.reshape(*x.shape[:-1], N)
    use_dot = M > 4 and not INTERPRET and x.dtype in (torch.float16, torch.bfloat16)
    bm = (16 if M <= 16 else 64) if use_dot else min(triton.next_power_of_2(M), 4)
    # a chunk never straddles a group: BLOCK_KH divides G / 2
    half = group_size // 2
    bkh = block_kh or (16 if INTERPRET else 64)
    while half % bkh:
        bkh //= 2
    bn = block_n or (64 if INTERPRET else (32 if use_dot else 16))
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _int4_linear_kernel[grid](x2, q, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
                              y, M, N, K, group_size, x2.stride(0), q.stride(0), scales.stride(0), y.stride(0),
                              HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
                              BLOCK_KH=bkh, USE_DOT=use_dot, num_warps=num_warps or 4, **extra)
    return y.reshape(*x.shape[:-1], N)


@triton.jit
def _nm_gemv_2bit_kernel(x_ptr, v_ptr, i_ptr, b_ptr, y_ptr, N, KV, stride_xm, stride_vn, stride_in, stride_ym,
                         KEEP: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_B: tl.constexpr):
    """Decode with 2-bit metadata (m <= 4): kept values as [BLOCK_N, BLOCK_B, 4] tiles (4 per
    index byte), index bytes as [BLOCK_N, BLOCK_B] (contiguous, vector loads) unpacked in
    registers; each kept value's x is selected among its group's m candidates, loaded per step as
    [BLOCK_B, 4] vectors shared by all rows -- no per-element gathers."""
    pid_n, m = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    rc = tl.arange(0, 4)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    NB = KV // 4
    for b0 in range(0, NB, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        mb = rb < NB
        j = rb[:, None] * 4 + rc[None, :]                                     # [BLOCK_B, 4] kept index
        v = tl.load(v_ptr + rn[:, None, None] * stride_vn + j[None, :, :],
                    mask=mn[:, None, None] & mb[None, :, None], other=0.0).to(tl.float32)
        ib = tl.load(i_ptr + rn[:, None] * stride_in + rb[None, :], mask=mn[:, None] & mb[None, :], other=0)
        idx = (ib.to(tl.int32)[:, :, None] >> (2 * rc)[None, None, :]) & 3    # [BLOCK_N, BLOCK_B, 4]
        base = (j // KEEP) * GROUP
        xv = tl.load(x_ptr + m * stride_xm + base, mask=mb[:, None], other=0.0).to(tl.float32)[None, :, :] + 0.0 * v
        for c in tl.static_range(1, GROUP):
            xc = tl.load(x_ptr + m * stride_xm + base + c, mask=mb[:, None], other=0.0).to(tl.float32)
            xv = tl.where(idx == c, xc[None, :, :], xv)
        acc += tl.sum(tl.sum(v * xv, axis=2), axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=mn)


@triton.jit
def _nm_linear_kernel_kn(x_ptr, v_ptr, i_ptr, b_ptr, y_ptr, M, N, KV, stride_xm, stride_vn, stride_in, stride_ym,
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


def pack_nm_index(index: torch.Tensor, kept: int, m: int) -> tuple[torch.Tensor, int]:
    """The densest index form a kernel reads: 2 bits per kept value when m <= 4 (4 per byte),
    else the graph's 4-bit (or 8-bit) form. Returns (packed index, bits per entry)."""
    packed4 = index.shape[1] * 2 == kept
    if m > 4 or kept % 4:
        return index, 4 if packed4 else 8
    if packed4:
        idx = torch.stack((index & 0xF, index >> 4), dim=-1).reshape(index.shape[0], kept)
    else:
        idx = index
    idx = idx.to(torch.uint8).reshape(index.shape[0], kept // 4, 4)
    out = idx[..., 0] | (idx[..., 1] << 2) | (idx[..., 2] << 4) | (idx[..., 3] << 6)
    return out.contiguous(), 2


def nm_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, n: int, m: int,
              bias: torch.Tensor | None = None, block_n: int | None = None, block_j: int | None = None,
              num_warps: int = 4, index_bits: int | None = None):
    """x [..., K] @ densify_nm(values [N, K*n/m], index)^T + bias, reading the compressed form.
    ``index`` is the graph's (4-bit packed or u8) or, with ``index_bits=2``, ``pack_nm_index``'s."""
    N, KV = values.shape
    K = x.shape[-1]
    bits = index_bits or (4 if index.shape[1] * 2 == KV else 8)
    if KV * m != K * n or index.shape[1] * (8 // bits) < KV or (bits == 8 and index.shape != values.shape):
        raise ValueError(f"nm_linear: values {tuple(values.shape)} / index {tuple(index.shape)} do not hold "
                         f"{n}:{m} of K={K}")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if bits == 2:
        bn = block_n or (16 if INTERPRET else 16)
        bb = max((block_j or (64 if INTERPRET else 256)) // 4, 1)
        _nm_gemv_2bit_kernel[(triton.cdiv(N, bn), M)](
            x2, values, index, bias if bias is not None else values, y, N, KV, x2.stride(0), values.stride(0),
            index.stride(0), y.stride(0), KEEP=n, GROUP=m, HAS_BIAS=bias is not None, BLOCK_N=bn,
            BLOCK_B=triton.next_power_of_2(bb), num_warps=num_warps)
        return y.reshape(*x.shape[:-1], N)
    bn = block_n or (64 if INTERPRET else 32)
    bj = block_j or (32 if INTERPRET else 128)
    # [J, N] tiles with x gathered (session-1 layout; measured faster than [N, J] on the H100)
    _nm_linear_kernel_kn[(triton.cdiv(N, bn), M)](x2, values, index, bias if bias is not None else values, y, M, N,
                                                  KV, x2.stride(0), values.stride(0), index.stride(0), y.stride(0),
                                                  KEEP=n, GROUP=m, PACKED=bits == 4, HAS_BIAS=bias is not None,
                                                  BLOCK_N=bn, BLOCK_J=bj, num_warps=num_warps if block_n else 8)
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
    use_dot = M > 16 and not INTERPRET and x.dtype in (torch.float16, torch.bfloat16)   # (fp32 would be TF32)
    bm = 16 if use_dot else (1 if M == 1 else min(triton.next_power_of_2(M), 4))
    bn = 64 if INTERPRET else 128
    bk = 32 if INTERPRET else 64
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _int8_linear_kernel[grid](x2, q, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
                              y, M, N, K, group_size, x2.stride(0), q.stride(0), scales.stride(0), y.stride(0),
                              HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
                              BLOCK_K=bk, USE_DOT=use_dot, num_warps=num_warps)
    return y.reshape(*x.shape[:-1], N)
