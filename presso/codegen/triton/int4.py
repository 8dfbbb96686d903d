"""Group-wise int4 linears: y = x W^T + b, W = (code - zero) * scale per (row, group of K).

The graph stores codes two per byte along K (low nibble = even k). For group sizes 32..256 the
cuda target repacks them once, at load, into the layout its kernels stream (``pack_int4``,
same bytes): rows in tiles of ``TILE_ROWS``; inside a tile, group by group, each row's group as
G/8 int32 words; word w holds k = 8w + j in the nibble at bit ``nibble_shift(j)`` = 0, 16, 8, 24,
4, 20, 12, 28 for j = 0..7, as an unsigned code (symmetric codes c stored as c + 8, so the
offset is 8 or the zero point). A kernel's step over one group of a block of rows then reads one
contiguous span, each word's x values are 8 contiguous elements, and the pairs (j, j+1) sit 16
bits apart: one mask-or turns a pair into two fp16 numbers (below). Measured on the H100
(benchmarks/RESULTS.md): the graph layout read row by row peaked at 1.37 TB/s even for a kernel
that only loads; the tiled layout at 1.6 TB/s.

* decode (M <= 2): ``_int4_gemv_kernel``, groups split over several programs (split-K; the last
  program of a row block adds the partial sums). fp16 x: per word, four mask-ors (``lop3``) make
  the pairs 1024 + c (or 1024 + 16c) as fp16x2, one fp16x2 FMA each makes (c - 8) / 8 exactly,
  and four fp16x2 FMAs multiply by x (inline PTX: ~2 instructions per weight instead of 3; the
  dequantized weights are exact, the 8 products of a word are summed in fp16, then fp32). Other
  dtypes: each nibble becomes the float 1 + c/16 by a shift and a mask-or (no int->float
  conversion), recovering sum(c x) = 16 * sum((1 + c/16) x) - 16 * sum(x).
* M > 2: ``_int4_gemm_kernel`` dequantizes a group tile in registers and runs tl.dot; fp16: the
  same mask-or pairs, then c - offset exactly and one fp16x2 multiply by the scale (bit-identical
  to the reference's dequantized weights); other dtypes: the 1 + c/16 trick and one FMA per
  weight. For M <= 64 the groups are split over programs (split-K) whose fp32 partial tiles the
  last-arriving program adds.
* other group sizes: ``_int4_rows_kernel`` reads the graph layout as is.

The code-to-number helpers (inline PTX and their interpreter twins) live in ``nibbles.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ...config import triton_interpret
from ...ir.ops import unpack_int4
from .autotune import choose, sm_count
from .epilogue import Epilogue, apply_epilogue, no_epilogue, output_buffer, run_pair_epilogue, store_tile
from .nibbles import (INTERPRET_DOT, f16x2_dequant_tile, f16x2_dot8, f16x2_dot8_emulated, nibble_shifts,
                      one_plus_nibble, nibble_shift)
from .splitk import split_factor, split_sum, zeroed_counters

TILE_ROWS = 128


@dataclass
class Int4Weight:
    """int4 codes in the tiled layout (see the module docstring), scales and zero points as
    [N_pad/TILE_ROWS, K/G, TILE_ROWS]; rows past N are zero padding."""
    q: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    n: int
    k: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scales, self.zeros) if t is not None)


def tiled_layout_fits(group_size: int, k: int) -> bool:
    return group_size in (32, 64, 128, 256) and k % group_size == 0


def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int) -> Int4Weight:
    """The graph's packed codes [N, K/2] (+ scales, zeros [N, K/G]) -> the tiled layout."""
    N, K = q.shape[0], q.shape[1] * 2
    if not tiled_layout_fits(group_size, K):
        raise ValueError(f"pack_int4: group size {group_size} with K={K} has no tiled layout (needs 32..256, "
                         "a power of two dividing K)")
    G, NG = group_size, K // group_size
    pad = -N % TILE_ROWS
    codes = unpack_int4(q, signed=False).to(torch.int64).reshape(N, K // 8, 8)           # [N, word, j]
    if zeros is None:
        codes = codes ^ 8                      # two's-complement nibble c -> unsigned c + 8
    shifts = torch.tensor([nibble_shift(j) for j in range(8)], device=q.device)
    words = (codes << shifts).sum(-1)                                                 # [N, K/8] < 2^32
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    words = torch.nn.functional.pad(words, (0, 0, 0, pad))
    nt = (N + pad) // TILE_ROWS
    words = words.reshape(nt, TILE_ROWS, NG, G // 8).permute(0, 2, 1, 3).contiguous()

    def tiles(t):
        return None if t is None else torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(
            nt, TILE_ROWS, NG).permute(0, 2, 1).contiguous()
    return Int4Weight(words, tiles(scales), tiles(zeros), N, K, G)


@triton.jit
def _int4_weights(q_ptr, s_ptr, z_ptr, tile0, g0, HW: tl.constexpr, TILE: tl.constexpr, GPS: tl.constexpr,
                  HAS_ZERO: tl.constexpr):
    """The code words [BLOCK_N, GPS, G/8], scales and offsets (8, or the zero points) [BLOCK_N, GPS]
    of groups g0 .. g0 + GPS - 1 of a block of rows (``tile0``: each row's first group's tile row)."""
    rg = g0 + tl.arange(0, GPS)
    t = tile0[:, None] + rg[None, :] * TILE                                          # [BLOCK_N, GPS]
    wq = tl.load(q_ptr + t[:, :, None] * HW + tl.arange(0, HW)[None, None, :], eviction_policy="evict_first")
    sc = tl.load(s_ptr + t).to(tl.float32)
    if HAS_ZERO:
        off = tl.load(z_ptr + t).to(tl.float32)
    else:
        off = 8.0
    return wq, sc, off


@triton.jit
def _int4_step(x_ptr, xw_ptr, wq, sc, off, g0, m, stride_xm, HW: tl.constexpr, BLOCK_N: tl.constexpr,
               GPS: tl.constexpr, HAS_ZERO: tl.constexpr, F16X2: tl.constexpr):
    """Groups g0 .. g0 + GPS - 1 of a block of rows (their ``_int4_weights``): scale * sum_k
    (code - offset) x over their columns, as a [BLOCK_N, GPS, G/8] tile of per-word partial sums
    plus a [BLOCK_N] term; the caller accumulates both and reduces the tile across threads once,
    at the end. ``xw_ptr``: x as int32 fp16 pairs (F16X2)."""
    G: tl.constexpr = 8 * HW
    rw = tl.arange(0, HW)
    rg = g0 + tl.arange(0, GPS)
    if F16X2:
        xq = tl.load(xw_ptr + m * (stride_xm // 2) + rg[:, None, None] * (G // 2) + 4 * rw[None, :, None]
                     + tl.arange(0, 4)[None, None, :])                               # [GPS, HW, 4 pairs]
        xa, xb = tl.split(tl.reshape(xq, (GPS, HW, 2, 2)))       # pairs (0, 1), (2, 3) | (4, 5), (6, 7)
        x01, x45 = tl.split(xa)
        x23, x67 = tl.split(xb)
        if INTERPRET_DOT:
            part = f16x2_dot8_emulated(wq, x01[None], x23[None], x45[None], x67[None])
        else:
            shape: tl.constexpr = (BLOCK_N, GPS, HW)
            part = f16x2_dot8(wq, tl.broadcast_to(x01[None], shape), tl.broadcast_to(x23[None], shape),
                               tl.broadcast_to(x45[None], shape), tl.broadcast_to(x67[None], shape))
        tile = part * (8.0 * sc)[:, :, None]
        if HAS_ZERO:       # sum (c - z) x = 8 * sum (c - 8) / 8 x + (8 - z) sum x
            xs = tl.load(x_ptr + m * stride_xm + rg[:, None] * G + tl.arange(0, G)[None, :]).to(tl.float32)
            row = tl.sum((8.0 - off) * sc * tl.sum(xs, axis=1)[None, :], axis=1)
        else:
            row = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        xb = x_ptr + m * stride_xm + rg[:, None] * G + 8 * rw[None, :]                 # [GPS, HW]
        part = tl.zeros((BLOCK_N, GPS, HW), dtype=tl.float32)
        xs = tl.zeros((GPS, HW), dtype=tl.float32)
        for j in tl.static_range(8):      # shift: nibble_shift(j), as a constexpr
            xj = tl.load(xb + j).to(tl.float32)
            xs += xj
            part += one_plus_nibble(wq, (j % 2) * 16 + ((j // 2) % 2) * 8 + (j // 4) * 4) * xj[None, :, :]
        # sum (c - off) x = 16 * sum((1 + c/16) x) - (16 + off) * sum x
        tile = part * (16.0 * sc)[:, :, None]
        row = tl.sum(-(16.0 + off) * sc * tl.sum(xs, axis=1)[None, :], axis=1)
    return tile, row


@triton.jit
def _int4_gemv_kernel(x_ptr, xw_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, e0_ptr, e1_ptr, N, K,
                      stride_xm, HW: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr, GPS: tl.constexpr,
                      SPLIT: tl.constexpr, PER: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                      F16X2: tl.constexpr, EPI: tl.constexpr, E0: tl.constexpr, E1: tl.constexpr,
                      PAIR: tl.constexpr = False, PREFETCH: tl.constexpr = True):
    """A program: BLOCK_N rows over its share of the K steps (GPS groups each). PER > 0: exactly
    PER steps, unrolled (each step's loads wait behind the barriers of the step before, unless
    PREFETCH loads them during it); PER = 0: a loop. SPLIT > 1: the steps are split over SPLIT programs whose partial sums the last to
    arrive adds (an atomic counter it resets for the next call and CUDA-graph replays); wide
    steps (GPS groups of few rows) keep SPLIT at 1 for large N, so no program waits on others.
    PAIR: the weight is two stacked halves of N rows each (a gate and an up projection); the
    program also computes rows N + its rows, and the epilogue combines the two (``EPI(a, b)``,
    e.g. SwiGLU's silu(a) * b) into N outputs: one launch, x read once, no [2N] round trip."""
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, BLOCK_N)
    rn = pid_n * BLOCK_N + rows
    mn = rn < N
    W: tl.constexpr = 2 if PAIR else 1          # partial sums per output
    if PAIR:          # both halves' rows in one tile (N is a multiple of BLOCK_N: each half's block lies in one
        # tile), so all of the program's weight loads are issued together
        i = tl.arange(0, 2 * BLOCK_N)
        rr = pid_n * BLOCK_N + i + tl.where(i >= BLOCK_N, N - BLOCK_N, 0)
        both = _int4_rows_sum(x_ptr, xw_ptr, q_ptr, s_ptr, z_ptr, rr, pid_k, m, K, stride_xm, HW, TILE, 2 * BLOCK_N,
                              GPS, SPLIT, PER, HAS_ZERO, F16X2, PREFETCH)
        acc, acc2 = tl.split(tl.permute(tl.reshape(both, (2, BLOCK_N)), (1, 0)))
    else:
        acc = _int4_rows_sum(x_ptr, xw_ptr, q_ptr, s_ptr, z_ptr, rn, pid_k, m, K, stride_xm, HW, TILE, BLOCK_N, GPS,
                             SPLIT, PER, HAS_ZERO, F16X2, PREFETCH)
        acc2 = acc
    if SPLIT > 1:     # partial sums to the workspace; the last program of this row block adds them
        tl.store(ws_ptr + (m * SPLIT + pid_k) * (W * N) + rn, acc, mask=mn)
        if PAIR:
            tl.store(ws_ptr + (m * SPLIT + pid_k) * (W * N) + N + rn, acc2, mask=mn)
        cnt = cnt_ptr + m * tl.num_programs(0) + pid_n
        if tl.atomic_add(cnt, 1, sem="acq_rel") == SPLIT - 1:
            tot = split_sum(ws_ptr + m * SPLIT * (W * N) + rn, W * N, mn, SPLIT)
            tl.store(cnt, 0)
            if PAIR:
                tot2 = split_sum(ws_ptr + m * SPLIT * (W * N) + N + rn, W * N, mn, SPLIT)
                _store_pair(tot, tot2, b_ptr, y_ptr, m * N + rn, rn, mn, N, HAS_BIAS, EPI)
            else:
                _store_row(tot, b_ptr, y_ptr, m * N + rn, rn, mn, e0_ptr, e1_ptr, HAS_BIAS, EPI, E0, E1)
    elif PAIR:
        _store_pair(acc, acc2, b_ptr, y_ptr, m * N + rn, rn, mn, N, HAS_BIAS, EPI)
    else:
        _store_row(acc, b_ptr, y_ptr, m * N + rn, rn, mn, e0_ptr, e1_ptr, HAS_BIAS, EPI, E0, E1)


@triton.jit
def _int4_rows_sum(x_ptr, xw_ptr, q_ptr, s_ptr, z_ptr, rr, pid_k, m, K, stride_xm, HW: tl.constexpr,
                   TILE: tl.constexpr, BLOCK_N: tl.constexpr, GPS: tl.constexpr, SPLIT: tl.constexpr,
                   PER: tl.constexpr, HAS_ZERO: tl.constexpr, F16X2: tl.constexpr, PREFETCH: tl.constexpr):
    """Rows ``rr`` (BLOCK_N of them) times x over this program's share of the K steps."""
    G: tl.constexpr = 8 * HW
    NS = K // G // GPS
    # row r's group g: tile r // TILE, TILE rows further per group
    tile0 = (rr // TILE) * (K // G) * TILE + rr % TILE
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, GPS, HW), dtype=tl.float32)
    if PER > 0 and PREFETCH:  # unrolled; the next step's weights are loaded before this step's are used
        # (Triton puts barriers between steps, for the x operand's layout conversion: without the
        # prefetch a program has one step's loads in flight at a time; with it, ~1/3 more registers)
        g0 = pid_k * PER * GPS
        wq, sc, off = _int4_weights(q_ptr, s_ptr, z_ptr, tile0, g0, HW, TILE, GPS, HAS_ZERO)
        for i in tl.static_range(PER):
            if i + 1 < PER:
                wq2, sc2, off2 = _int4_weights(q_ptr, s_ptr, z_ptr, tile0, g0 + (i + 1) * GPS, HW, TILE, GPS, HAS_ZERO)
            tile, row = _int4_step(x_ptr, xw_ptr, wq, sc, off, g0 + i * GPS, m, stride_xm, HW, BLOCK_N, GPS,
                                   HAS_ZERO, F16X2)
            acc3 += tile
            acc += row
            if i + 1 < PER:
                wq, sc, off = wq2, sc2, off2
    elif PER > 0:
        for i in tl.static_range(PER):
            g0 = (pid_k * PER + i) * GPS
            wq, sc, off = _int4_weights(q_ptr, s_ptr, z_ptr, tile0, g0, HW, TILE, GPS, HAS_ZERO)
            tile, row = _int4_step(x_ptr, xw_ptr, wq, sc, off, g0, m, stride_xm, HW, BLOCK_N, GPS, HAS_ZERO, F16X2)
            acc3 += tile
            acc += row
    else:
        per = tl.cdiv(NS, SPLIT)
        for st in range(pid_k * per, tl.minimum(NS, pid_k * per + per)):
            wq, sc, off = _int4_weights(q_ptr, s_ptr, z_ptr, tile0, st * GPS, HW, TILE, GPS, HAS_ZERO)
            tile, row = _int4_step(x_ptr, xw_ptr, wq, sc, off, st * GPS, m, stride_xm, HW, BLOCK_N, GPS, HAS_ZERO,
                                   F16X2)
            acc3 += tile
            acc += row
    return acc + tl.sum(tl.sum(acc3, axis=2), axis=1)


@triton.jit
def _store_pair(acc, acc2, b_ptr, y_ptr, offs, rn, mn, N, HAS_BIAS: tl.constexpr, EPI: tl.constexpr):
    """A paired row block: each half's bias, then EPI(first half, second half), one store."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)
        acc2 += tl.load(b_ptr + N + rn, mask=mn, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, EPI(acc, acc2, 0.0).to(y_ptr.dtype.element_ty), mask=mn)


@triton.jit
def _store_row(acc, b_ptr, y_ptr, offs, rn, mn, e0_ptr, e1_ptr, HAS_BIAS: tl.constexpr, EPI: tl.constexpr,
               E0: tl.constexpr, E1: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)
    acc = apply_epilogue(acc, offs, rn, mn, e0_ptr, e1_ptr, EPI, E0, E1)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mn)


@triton.jit
def _int4_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, e0_ptr, e1_ptr, M, N, K, stride_xm,
                      HW: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      SPLIT: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      F16X2: tl.constexpr, EPI: tl.constexpr, E0: tl.constexpr, E1: tl.constexpr):
    """tl.dot over dequantized group tiles. fp16 x and scales (F16X2): ``f16x2_dequant_tile``.
    Otherwise a nibble c becomes the float v = 1 + c/16 by bit moves (no int->float conversion)
    and the weight (c - zero) * scale is one FMA: v * 16s - (16 + zero) s.
    SPLIT > 1 (small M): the groups are split over SPLIT programs that store fp32 partial tiles;
    the last to arrive (an atomic counter, which it resets for the next call and CUDA-graph
    replays) adds them and applies bias and epilogue. (Atomic adds of the tiles instead were wrong
    on the H100: the dot's accumulator layout replicates elements across threads, and every
    replica added its copy. A "swap AB" variant, W x^T with the weights as the dot's first operand,
    measured the same at M=16 on the H100 and was dropped.)"""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = 8 * HW
    NG = K // G
    rows = tl.arange(0, BLOCK_N)
    rn = pid_n * BLOCK_N + rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm, mn = rm < M, rn < N
    rw = tl.arange(0, HW)
    rk = tl.arange(0, G)
    shift = nibble_shifts()
    tile0 = (pid_n * BLOCK_N // TILE) * NG * TILE + (pid_n * BLOCK_N) % TILE + rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    per = tl.cdiv(NG, SPLIT)
    for g in range(pid_k * per, tl.minimum(NG, pid_k * per + per)):
        t = tile0 + g * TILE
        wq = tl.load(q_ptr + t[:, None] * HW + rw[None, :])
        if HAS_ZERO:
            off = tl.load(z_ptr + t).to(tl.float32)
        else:
            off = tl.full((BLOCK_N,), 8.0, tl.float32)
        xk = tl.load(x_ptr + rm[:, None] * stride_xm + g * G + rk[None, :], mask=mm[:, None], other=0.0)
        if F16X2:
            wk = f16x2_dequant_tile(wq, tl.load(s_ptr + t), off, BLOCK_N, G)
        else:
            sc = tl.load(s_ptr + t).to(tl.float32)
            mul = (16.0 * sc)[:, None]
            add = (-(16.0 + off) * sc)[:, None]
            v = tl.reshape((((wq[:, :, None] >> shift[None, None, :]) & 15) << 19) | 0x3F800000, (BLOCK_N, G))
            wk = (v.to(tl.float32, bitcast=True) * mul + add).to(xk.dtype)
        if IEEE:
            acc += tl.dot(xk, tl.trans(wk), input_precision="ieee")
        else:
            acc += tl.dot(xk, tl.trans(wk))
    if SPLIT > 1:     # partial tiles to the workspace; the last program of this tile adds them
        offs = rm[:, None] * N + rn[None, :]
        mask = mm[:, None] & mn[None, :]
        tl.store(ws_ptr + pid_k * M * N + offs, acc, mask=mask)
        cnt = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(cnt, 1, sem="acq_rel") == SPLIT - 1:
            tot = split_sum(ws_ptr + offs, M * N, mask, SPLIT)
            tl.store(cnt, 0)
            store_tile(tot, b_ptr, y_ptr, rm, rn, mm, mn, N, e0_ptr, e1_ptr, HAS_BIAS, EPI, E0, E1)
    else:
        store_tile(acc, b_ptr, y_ptr, rm, rn, mm, mn, N, e0_ptr, e1_ptr, HAS_BIAS, EPI, E0, E1)


# Multi-step programs load the next step's weights during this one (``prefetch`` 1), or not (0).
# Offline (ptxas of Triton 3.6, 16 rows x 4 groups x 8 steps) it issues two steps' loads before the
# first barrier at 96 registers a thread instead of 72: ~40 KB in flight per SM instead of ~28.
# Not yet timed on a GPU, so the default stays the measured 0; the autotuner tries both.
GEMV_PREFETCH = 0


def gemv_default(n: int, groups: int, hw: int, pair: bool, device) -> dict:
    """The decode GEMV's launch config without tuning. Few output rows and a short K (Llama-1B's
    2048 -> 2048 / 512 projections): 8-row blocks that take their whole share of K in one step,
    so each program issues all its loads at once and the grid still fills the GPU (the best of the
    sweep at 1x2048->2048 on the H100, RESULTS.md). Otherwise 16 rows and 4 groups a step (steps
    unrolled; ``GEMV_PREFETCH``), K split until 2 programs per SM (6 was slower at each Llama
    shape in the H100 sweep: 1x4096->4096 6.8 vs 6.3 us, 1x2048->8192 6.6 vs 5.2). (One step of a
    whole 4096-long row block needs ~130 registers a thread under Triton 3.6: 1 program per SM,
    twice as slow.)"""
    if not pair and groups <= 16 and triton.cdiv(n, 16) < 2 * (4 if triton_interpret() else sm_count(device)):
        sp = split_factor(triton.cdiv(n, 8), groups, 1, device)
        warps = 8 if 8 * (groups // sp) * hw >= 2048 else 4
        return {"block_n": 8, "gps": 0, "split": sp, "warps": warps, "prefetch": 1}
    gps = min(4, groups)
    return {"block_n": 16, "gps": gps, "split": split_factor(triton.cdiv(n, 16), groups // gps, 2, device), "warps": 4,
            "prefetch": GEMV_PREFETCH}


def gemv_candidates(groups: int, hw: int, pair: bool) -> list[dict]:
    """What ``PRESSO_AUTOTUNE=1`` tries at decode: row blocks of 8..64, K split 1..8, one step per
    program (4..32 words per thread), or several steps of 2..8 groups (4..16 words a step, with and
    without the prefetch of the next step); 4 or 8 warps."""
    out = []
    for bn in (8, 16, 32, 64):
        for sp in (1, 2, 4, 8):
            if sp > groups:
                continue
            for nw in (4, 8):
                words = bn * (groups // sp) * hw * (2 if pair else 1) / (32 * nw)
                if 4 <= words <= 32:
                    out.append({"block_n": bn, "gps": 0, "split": sp, "warps": nw, "prefetch": 1})
            for gps in (2, 4, 8):
                for nw in (4, 8):
                    words = bn * gps * hw * (2 if pair else 1) / (32 * nw)
                    if bn <= 32 and gps * sp < groups and 4 <= words <= 16:
                        out += [{"block_n": bn, "gps": gps, "split": sp, "warps": nw, "prefetch": pf} for pf in (0, 1)]
    return out


def int4_linear_tiled(x: torch.Tensor, w: Int4Weight, bias: Optional[torch.Tensor] = None,
                      split: Optional[int] = None, num_warps: Optional[int] = None,
                      epilogue: Optional[Epilogue] = None, extras: tuple = (), pair: bool = False,
                      config: Optional[dict] = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) (-> epilogue) -> [..., N] with W in the tiled layout (``pack_int4``).
    Launches take ``split`` / ``num_warps`` if given, else the per-shape choice (autotune.py);
    ``config``: a whole decode (M <= 2) launch config (``gemv_candidates``' keys), for benchmarks.
    ``pair``: W stacks two halves of N/2 rows and ``epilogue`` combines them (its accumulator is the
    first half's, its one extra operand the second half's): [..., N/2] out, in one launch at decode
    (M <= 2), else the stacked product and then the epilogue over its halves."""
    K, N = w.k, w.n
    if x.shape[-1] != K:
        raise ValueError(f"int4_linear: x [..., {x.shape[-1]}] does not fit a weight of K={K}")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if pair:
        if epilogue is None or len(epilogue.extra_indices) != 1 or extras or N % 32:
            raise ValueError(f"int4_linear(pair=True): needs an epilogue of the two halves and no other operand, "
                             f"and N={N} a multiple of 32")
        if M > 2:          # (prefill: no paired GEMM kernel)
            return run_pair_epilogue(int4_linear_tiled(x, w, bias, split, num_warps), epilogue)
        N //= 2
        y = torch.empty(M, N, dtype=epilogue.out_dtype, device=x.device)
        epi = dict(no_epilogue(y), EPI=epilogue.fn)      # (the kernel calls it with the two halves)
    else:
        y, epi = output_buffer(x, M, N, epilogue, extras)
    hw = w.group_size // 8
    z = w.zeros if w.zeros is not None else w.scales
    b = bias if bias is not None else w.scales
    e0, e1 = epi.pop("e0_ptr"), epi.pop("e1_ptr")
    if M <= 2:
        groups = K // w.group_size

        def launch(cfg):
            bn = cfg["block_n"]
            while pair and N % bn:                # a paired row block must not cross a half
                bn //= 2
            blocks = triton.cdiv(N, bn)
            sp = max(1, min(cfg["split"], groups))
            gps = cfg["gps"] or max(1, groups // sp)   # 0: the program's whole share of K in one step
            gps = 1 << (gps.bit_length() - 1)
            while groups % gps:                   # a power of two dividing the group count
                gps //= 2
            steps = groups // gps
            sp = min(sp, steps)
            ws = torch.empty(M * sp, 2 * N if pair else N, dtype=torch.float32, device=x.device) if sp > 1 else y
            f16x2 = x.dtype == torch.float16 and cfg.get("f16x2", True)
            _int4_gemv_kernel[(blocks, sp, M)](x2, x2.view(torch.int32) if f16x2 else x2, w.q, w.scales, z, b, y,
                                               ws, zeroed_counters(M * blocks, x.device), e0, e1, N, K,
                                               x2.stride(0), HW=hw, TILE=TILE_ROWS, BLOCK_N=bn, GPS=gps, SPLIT=sp,
                                               PER=steps // sp if steps % sp == 0 and steps // sp <= 8 else 0,
                                               HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None,
                                               F16X2=f16x2, PAIR=pair, PREFETCH=bool(cfg.get("prefetch", 1)),
                                               num_warps=cfg["warps"], **epi)
        if config is not None:
            cfg = config
        elif split is not None or num_warps is not None:
            cfg = gemv_default(N, groups, hw, pair, x.device)
            cfg.update({k: v for k, v in (("split", split), ("warps", num_warps)) if v is not None})
        else:
            cfg = choose("int4_gemv" + ("_pair" if pair else ""), (M, N, K, w.group_size, w.zeros is not None, x.dtype),
                         x.device, lambda: gemv_candidates(groups, hw, pair), launch,
                         gemv_default(N, groups, hw, pair, x.device))
        launch(cfg)
    else:
        bm = 16 if M <= 16 else 64
        m_blocks = triton.cdiv(M, bm)
        groups = K // w.group_size

        # fp16x2 dequant when x and the scales are fp16; not for 32-groups in 64-row tiles, whose
        # [32, BLOCK_N] operand Triton 3.6 fails to lay out for wgmma ("Illegal shared layout")
        f16x2 = x.dtype == torch.float16 and w.scales.dtype == torch.float16 and (w.group_size >= 64 or bm <= 16)

        def launch_gemm(cfg):
            bn, sp = cfg["block_n"], cfg["split"]
            blocks = triton.cdiv(N, bn)
            ws = torch.empty(sp * M * N, dtype=torch.float32, device=x.device) if sp > 1 else y
            cnt = zeroed_counters(m_blocks * blocks, x.device)
            _int4_gemm_kernel[(blocks, sp, m_blocks)](
                x2, w.q, w.scales, z, b, y, ws, cnt, e0, e1, M, N, K, x2.stride(0), HW=hw, TILE=TILE_ROWS,
                BLOCK_M=bm, BLOCK_N=bn, SPLIT=sp, HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None,
                IEEE=x.dtype == torch.float32, F16X2=f16x2 and cfg.get("f16x2", True), num_warps=cfg["warps"],
                num_stages=cfg["stages"], **epi)
        # the sweep's best at 16 / 64 x 4096 -> 14336 on the H100 (RESULTS.md)
        default = {"block_n": 128, "split": split_factor(triton.cdiv(N, 128) * m_blocks, groups, 2, x.device) if M <= 16
                   else (2 if M <= 64 else 1), "warps": 4, "stages": 2 if M <= 16 else 3}
        if split is not None or num_warps is not None:
            cfg = dict(default, split=split or default["split"], warps=num_warps or 4)
        else:
            cfg = choose("int4_gemm", (M, N, K, w.group_size, w.zeros is not None, x.dtype), x.device,
                         lambda: [{"block_n": bn, "split": sp, "warps": nw, "stages": st} for bn in (32, 64, 128)
                          for sp in (1, 2, 4, 8, 16) if sp <= groups for nw in (4, 8) for st in (2, 3, 4)],
                         launch_gemm, default)
        launch_gemm(cfg)
    return y.reshape(*x.shape[:-1], N)


@triton.jit
def _int4_rows_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, e0_ptr, e1_ptr, M, N, K, G, stride_xm, stride_qn,
                      stride_sn, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, EPI: tl.constexpr, E0: tl.constexpr,
                      E1: tl.constexpr):
    """The graph layout as is (any even group size): [BLOCK_N, BLOCK_KH] byte tiles inside one
    group, even and odd columns of x against the low and high nibbles."""
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
        s = tl.load(s_ptr + rn * stride_sn + g, mask=mn, other=0.0).to(tl.float32)
        xm = mm[:, None] & mj[None, :]
        xe = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rj[None, :], mask=xm, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rj[None, :] + 1, mask=xm, other=0.0).to(tl.float32)
        part = tl.sum(lo[None, :, :] * xe[:, None, :] + hi[None, :, :] * xo[:, None, :], axis=2)
        if HAS_ZERO:
            z = tl.load(z_ptr + rn * stride_sn + g, mask=mn, other=0).to(tl.float32)
            part = part - tl.sum(xe + xo, axis=1)[:, None] * z[None, :]
        acc += part * s[None, :]
    store_tile(acc, b_ptr, y_ptr, rm, rn, mm, mn, N, e0_ptr, e1_ptr, HAS_BIAS, EPI, E0, E1)


def int4_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], group_size: int, epilogue: Optional[Epilogue] = None,
                extras: tuple = ()) -> torch.Tensor:
    """x [..., K] @ dequant(q [N, K/2] packed int4, scales [N, K/G], zeros)^T + bias -> [..., N],
    from the graph's storage (repacked on the fly where the tiled kernels apply; the cuda target
    repacks once at load instead)."""
    K = x.shape[-1]
    N = q.shape[0]
    if q.shape[1] * 2 != K or group_size % 2 or K % 2 or scales.shape != (N, -(-K // group_size)):
        raise ValueError(f"int4_linear: x [..., {K}], q {tuple(q.shape)}, scales {tuple(scales.shape)} and "
                         f"group_size {group_size} do not fit together")
    if tiled_layout_fits(group_size, K):
        return int4_linear_tiled(x, pack_int4(q, scales, zeros, group_size), bias, epilogue=epilogue, extras=extras)
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y, epi = output_buffer(x, M, N, epilogue, extras)
    interpret = triton_interpret()
    bkh = 16 if interpret else 64
    while (group_size // 2) % bkh or (K % group_size // 2) % bkh:   # a chunk never straddles a group
        bkh //= 2
    bm, bn = min(triton.next_power_of_2(M), 4), (64 if interpret else 16)
    _int4_rows_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
        x2, q, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
        epi.pop("e0_ptr"), epi.pop("e1_ptr"), M, N, K, group_size, x2.stride(0), q.stride(0), scales.stride(0),
        HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_KH=bkh, num_warps=4,
        **epi)
    return y.reshape(*x.shape[:-1], N)
