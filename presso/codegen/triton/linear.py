"""Compressed linear kernels besides int4 (``int4.py``): y = x W^T + b with W stored compressed,
read directly by the kernel (never densified in memory).

* ``nm_linear``: N:M sparse weights as kept values [N_out, K*n/m] and 2-, 4- or 8-bit in-group
  positions; each kept value gathers its x entry (x is small and cache-resident at decode).
* ``int8_linear``: group-wise int8 codes; ``tl.dot`` for M > 16.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ...config import triton_interpret
from .autotune import choose
from .epilogue import Epilogue, apply_epilogue, output_buffer, store_tile

INTERPRET = triton_interpret()     # one reading: Triton fixes interpreted or compiled per decorated kernel


@triton.jit
def _kept_positions(i_ptr, row_off, j, mask, BITS: tl.constexpr):
    """The in-group positions of kept values ``j`` (offsets ``row_off`` + j), BITS bits each,
    8 // BITS to a byte (low bits first)."""
    PER: tl.constexpr = 8 // BITS
    ib = tl.load(i_ptr + row_off + j // PER, mask=mask, other=0).to(tl.int32)
    if BITS < 8:
        ib = (ib >> ((j % PER) * BITS)) & ((1 << BITS) - 1)
    return ib


@triton.jit
def _kept_values(v_ptr, s_ptr, z_ptr, rn, rj, msk, stride_vn, stride_sn, QBITS: tl.constexpr, QG: tl.constexpr,
                 HAS_ZERO: tl.constexpr):
    """The kept values at rows ``rn`` (columns of the tile), positions ``rj`` (its rows), as fp32:
    stored floats (QBITS = 0), or 4-bit codes two per byte (low nibble first) with a scale (and
    zero point) per QG values: (code - zero) * scale, signed codes when there is no zero point."""
    if QBITS == 0:
        return tl.load(v_ptr + rn[None, :] * stride_vn + rj[:, None], mask=msk, other=0.0).to(tl.float32)
    byte = tl.load(v_ptr + rn[None, :] * stride_vn + rj[:, None] // 2, mask=msk, other=0).to(tl.int32)
    code = (byte >> ((rj[:, None] % 2) * 4)) & 15
    sq = rn[None, :] * stride_sn + rj[:, None] // QG
    if HAS_ZERO:
        off = tl.load(z_ptr + sq, mask=msk, other=0).to(tl.float32)
    else:
        code = code ^ 8                 # two's-complement nibble c -> c + 8
        off = 8.0
    return (code.to(tl.float32) - off) * tl.load(s_ptr + sq, mask=msk, other=0.0).to(tl.float32)


@triton.jit
def _nm_linear_kernel(x_ptr, v_ptr, s_ptr, z_ptr, i_ptr, b_ptr, y_ptr, e0_ptr, e1_ptr, N, KV, stride_xm, stride_vn,
                      stride_sn, stride_in, KEEP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                      QBITS: tl.constexpr, QG: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, EPI: tl.constexpr, E0: tl.constexpr,
                      E1: tl.constexpr):
    """[BLOCK_J, BLOCK_N] tiles of kept values (contiguous along J) and their in-group positions
    (BITS = 2, 4 or 8 per entry); each value gathers its x entry (x is small and stays in L1).
    One row of x per program column (a block of rows gathering a [BLOCK_M, J, N] x tile measured
    3.7x slower at M=16 on the H100)."""
    pid_n, m = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(0, KV, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        msk = (rj < KV)[:, None] & (rn < N)[None, :]
        v = _kept_values(v_ptr, s_ptr, z_ptr, rn, rj, msk, stride_vn, stride_sn, QBITS, QG, HAS_ZERO)
        ib = _kept_positions(i_ptr, rn[None, :] * stride_in, rj[:, None], msk, BITS)
        k = (rj // KEEP)[:, None] * GROUP + ib
        xv = tl.load(x_ptr + m * stride_xm + k, mask=msk, other=0.0).to(tl.float32)
        acc += tl.sum(v * xv, axis=0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    acc = apply_epilogue(acc, m * N + rn, rn, rn < N, e0_ptr, e1_ptr, EPI, E0, E1)
    tl.store(y_ptr + m * N + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _nm_gemm_kernel(x_ptr, v_ptr, i_ptr, b_ptr, y_ptr, e0_ptr, e1_ptr, M, N, K, stride_xm, stride_vn, stride_in,
                    KEEP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, IEEE: tl.constexpr,
                    EPI: tl.constexpr, E0: tl.constexpr, E1: tl.constexpr):
    """M > 2: a [BLOCK_N, BLOCK_G groups x GROUP] weight tile rebuilt dense in registers from its
    kept values and positions (one compare-select per kept value and position), then tl.dot with
    BLOCK_M rows of x: the compressed weights are read once per row block, not once per row."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mn, mm = rn < N, rm < M
    BK: tl.constexpr = BLOCK_G * GROUP
    rg = tl.arange(0, BLOCK_G)
    rkeep = tl.arange(0, KEEP)
    rp = tl.arange(0, GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, K // GROUP, BLOCK_G):
        j = (g0 + rg)[:, None] * KEEP + rkeep[None, :]                                  # [G, KEEP]
        mg = ((g0 + rg) < K // GROUP)[:, None] & (rkeep < KEEP)[None, :]
        wmask = mn[:, None, None] & mg[None, :, :]
        v = tl.load(v_ptr + rn[:, None, None] * stride_vn + j[None, :, :], mask=wmask, other=0.0)
        ib = _kept_positions(i_ptr, rn[:, None, None] * stride_in, j[None, :, :], wmask, BITS)
        hit = ib[:, :, :, None] == rp[None, None, None, :]                              # [N, G, KEEP, GROUP]
        dense = tl.sum(tl.where(hit, v.to(tl.float32)[:, :, :, None], 0.0), axis=2)     # [N, G, GROUP]
        rk = g0 * GROUP + tl.arange(0, BK)
        xk = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mm[:, None] & (rk < K)[None, :], other=0.0)
        w = tl.reshape(dense, (BLOCK_N, BK)).to(xk.dtype)
        if IEEE:
            acc += tl.dot(xk, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xk, tl.trans(w))
    store_tile(acc, b_ptr, y_ptr, rm, rn, mm, mn, N, e0_ptr, e1_ptr, HAS_BIAS, EPI, E0, E1)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


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
              num_warps: int | None = None, index_bits: int | None = None, epilogue: Epilogue | None = None,
              extras: tuple = (), value_scales: torch.Tensor | None = None, value_zeros: torch.Tensor | None = None,
              value_group: int = 0):
    """x [..., K] @ densify_nm(values [N, K*n/m], index)^T + bias, reading the compressed form.
    ``index`` is the graph's (4-bit packed or u8) or, with ``index_bits=2``, ``pack_nm_index``'s
    (the cuda target repacks to it at load: 2:4 reads 10% fewer bytes, measured 1.41x vs 1.23x
    over dense fp16 on the H100). ``block_n`` / ``block_j`` / ``num_warps`` set the per-row kernel
    (M <= 2, or N and M not powers of two); otherwise M > 2 runs the dense-tile tl.dot kernel with
    the autotune store's (or the default) config. With ``value_scales`` the kept values are int4
    codes [N, KV/2] (two per byte) quantized in groups of ``value_group`` along KV (signed, or
    with ``value_zeros``): the per-row kernel dequantizes them in registers; M > 2 dequantizes the
    values once per call (prefill) and runs the tl.dot kernel."""
    N, KV = values.shape[0], values.shape[1] * (2 if value_scales is not None else 1)
    if value_scales is not None:
        if value_group <= 0 or KV % value_group or tuple(value_scales.shape) != (N, KV // value_group):
            raise ValueError(f"nm_linear: int4 values {tuple(values.shape)} with scales {tuple(value_scales.shape)} "
                             f"do not fit groups of {value_group}")
        if x.reshape(-1, x.shape[-1]).shape[0] > 2:
            from ...ir.registry import get_op
            vals = get_op("dequantize").run([values, value_scales, value_zeros],
                                            {"bits": 4, "group_size": value_group, "dtype": "f32"})[0].to(x.dtype)
            return nm_linear(x, vals, index, n, m, bias, index_bits=index_bits, epilogue=epilogue, extras=extras)
    K = x.shape[-1]
    bits = index_bits or (4 if index.shape[1] * 2 == KV else 8)
    if KV * m != K * n or index.shape[1] * (8 // bits) < KV or (bits == 8 and tuple(index.shape) != (N, KV)):
        raise ValueError(f"nm_linear: values {tuple(values.shape)} / index {tuple(index.shape)} do not hold "
                         f"{n}:{m} of K={K}")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y, epi = output_buffer(x, M, N, epilogue, extras)
    e0, e1 = epi.pop("e0_ptr"), epi.pop("e1_ptr")
    if M > 2 and _pow2(n) and _pow2(m) and K % m == 0:
        def launch_gemm(cfg):
            bm, bn, bg = cfg["block_m"], cfg["block_n"], cfg["block_g"]
            _nm_gemm_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
                x2, values, index, bias if bias is not None else values, y, e0, e1, M, N, K, x2.stride(0),
                values.stride(0), index.stride(0), KEEP=n, GROUP=m, BITS=bits, HAS_BIAS=bias is not None,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_G=bg, IEEE=x.dtype == torch.float32, num_warps=cfg["warps"], **epi)
        bm = 16 if M <= 16 else 64
        default = {"block_m": bm, "block_n": 64, "block_g": max(16 // m, 64 // m), "warps": 4}
        cfg = choose("nm_gemm", (M, N, K, n, m, bits, x.dtype), x.device,
                     lambda: [{"block_m": bm, "block_n": b, "block_g": max(16 // m, bk // m), "warps": nw}
                      for b in (32, 64, 128) for bk in (32, 64, 128) for nw in (4, 8)], launch_gemm, default)
        launch_gemm(cfg)
        return y.reshape(*x.shape[:-1], N)

    sv = value_scales if value_scales is not None else values
    zv = value_zeros if value_zeros is not None else sv

    def launch(cfg):
        bn, bj = cfg["block_n"], cfg["block_j"]
        _nm_linear_kernel[(triton.cdiv(N, bn), M)](
            x2, values, sv, zv, index, bias if bias is not None else values, y, e0, e1, N, KV, x2.stride(0),
            values.stride(0), sv.stride(0), index.stride(0), KEEP=n, GROUP=m, BITS=bits,
            QBITS=4 if value_scales is not None else 0, QG=max(value_group, 1), HAS_ZERO=value_zeros is not None,
            HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_J=bj, num_warps=cfg["warps"], **epi)
    default = {"block_n": 32 if INTERPRET else 16, "block_j": 32 if INTERPRET else 128, "warps": 8}
    if block_n or block_j or num_warps:
        cfg = {"block_n": block_n or default["block_n"], "block_j": block_j or default["block_j"],
               "warps": num_warps or default["warps"]}
    else:
        key = (M, N, KV, n, m, bits, x.dtype) + ((4, value_group) if value_scales is not None else ())
        cfg = choose("nm_linear", key, x.device,
                     lambda: [{"block_n": bn, "block_j": bj, "warps": nw} for bn in (8, 16, 32) for bj in (64, 128, 256)
                      for nw in (4, 8)], launch, default)
    launch(cfg)
    return y.reshape(*x.shape[:-1], N)


@triton.jit
def _int8_linear_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, e0_ptr, e1_ptr, M, N, K, G, stride_xm, stride_qn,
                        stride_sn, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, EPI: tl.constexpr,
                        E0: tl.constexpr, E1: tl.constexpr):
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
    store_tile(acc, b_ptr, y_ptr, rm, rn, rm < M, rn < N, N, e0_ptr, e1_ptr, HAS_BIAS, EPI, E0, E1)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bias: torch.Tensor | None, group_size: int, num_warps: int = 4, epilogue: Epilogue | None = None,
                extras: tuple = ()):
    """x [..., K] @ dequant(q [N, K] int8 or uint8 with zeros, scales [N, K/G])^T + bias -> [..., N]."""
    N, K = q.shape
    if x.shape[-1] != K or scales.shape != (N, -(-K // group_size)):
        raise ValueError(f"int8_linear: x [..., {x.shape[-1]}], q {tuple(q.shape)}, scales {tuple(scales.shape)} "
                         f"and group_size {group_size} do not fit together")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y, epi = output_buffer(x, M, N, epilogue, extras)
    use_dot = M > 16 and not INTERPRET and x.dtype in (torch.float16, torch.bfloat16)   # (fp32 would be TF32)
    bm = 16 if use_dot else (1 if M == 1 else min(triton.next_power_of_2(M), 4))
    bn = 64 if INTERPRET else 128
    bk = 32 if INTERPRET else 64
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _int8_linear_kernel[grid](x2, q, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
                              y, epi.pop("e0_ptr"), epi.pop("e1_ptr"), M, N, K, group_size, x2.stride(0),
                              q.stride(0), scales.stride(0), HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None,
                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot, num_warps=num_warps, **epi)
    return y.reshape(*x.shape[:-1], N)
