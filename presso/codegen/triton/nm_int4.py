"""2:4 sparse linears whose kept values are int4 (the ``sparsify{2:4}`` + ``quantize{int4}``
recipes) at decode (M <= 2): y = x W^T + b reading 12 bits per group of 4 weights.

The gather kernel of ``linear.nm_linear`` loads one x entry per kept value; with int4 values its
loads and nibble handling made it slower than dense fp16 (58.6 us vs 41.7 at 1x4096->14336 on the
H100). Here nothing is gathered: each kept value *selects* its input among the 4 of its group by
its 2-bit position (three selects): 45.0 us (0.94x dense fp16; 22.5 MB read at 0.5 TB/s, so
compute-bound: the compiled kernel moves the code and x tiles between register layouts through
shared memory, ~7 barriers per step; fixing that is the next step, RESULTS.md).

Layout (``pack_nm_int4``, repacked once at load, the same bits as the graph's codes + indices):
rows in tiles of ``TILE_ROWS``; per tile, chunk by chunk (32 inputs = 16 kept values), each row's
chunk as two int32 words of unsigned codes (kept 8w + i in nibble i of word w; signed codes
stored + 8) in ``codes`` [tiles, chunks, TILE_ROWS, 2] and one word of 2-bit positions (kept k
at bits 2k) in ``index`` [tiles, chunks, TILE_ROWS]. Scales (and zero points) stay per group of
QG kept values, QG a multiple of 16, so a chunk has one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ...ir.ops import pack_int4, unpack_int4
from .autotune import choose
from .epilogue import apply_epilogue, output_buffer

TILE_ROWS = 128


@dataclass
class NMInt4Weight:
    codes: torch.Tensor
    index: torch.Tensor
    scales: torch.Tensor          # [N, KV / QG] as in the graph
    zeros: Optional[torch.Tensor]
    n: int
    k: int
    group: int                    # kept values per scale

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.index, self.scales, self.zeros)
                   if t is not None)

    def graph_forms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Back to the graph's packed codes [N, KV/2] and one-byte positions [N, KV] (for M > 2,
        which runs the dense-tile kernel of ``linear.nm_linear``)."""
        def fields(words, per_word, bits):       # [tiles, chunks, TILE_ROWS, w] -> [N, chunks * w * per_word]
            w = words.permute(0, 2, 1, 3).reshape(-1, words.shape[1] * words.shape[3])[:self.n].to(torch.int64)
            w = w & 0xFFFFFFFF
            v = (w[..., None] >> (bits * torch.arange(per_word, device=w.device))) & ((1 << bits) - 1)
            return v.reshape(self.n, -1)
        c = fields(self.codes, 8, 4)
        if self.zeros is None:
            c = c ^ 8
        return pack_int4(c), fields(self.index[..., None], 16, 2).to(torch.uint8)


def fits(k: int, group: int) -> bool:
    return k % 32 == 0 and group % 16 == 0 and (k // 2) % group == 0


def pack_nm_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group: int,
                 index: torch.Tensor) -> NMInt4Weight:
    """The graph's int4 kept values [N, KV/2] (two per byte), their scales [N, KV/group] (+ zero
    points) and 2:4 positions (4-bit packed [N, KV/2] or one byte each [N, KV]) -> the layout."""
    N, KV = codes.shape[0], codes.shape[1] * 2
    K = 2 * KV
    if not fits(K, group):
        raise ValueError(f"pack_nm_int4: K={K} with groups of {group} kept values has no layout (needs K % 32 == 0 "
                         "and groups of a multiple of 16 kept values)")
    c = unpack_int4(codes, signed=False).to(torch.int64)
    if zeros is None:
        c = c ^ 8                                     # two's-complement nibble -> unsigned c + 8
    pos = (unpack_int4(index, signed=False) if index.shape[1] * 2 == KV else index).to(torch.int64)
    pad = -N % TILE_ROWS
    nt, chunks = (N + pad) // TILE_ROWS, K // 32

    def words(v, per_word, bits):     # [N, KV] small ints -> [tiles, chunks, TILE_ROWS, words per chunk]
        v = v.reshape(N, -1, per_word) << (bits * torch.arange(per_word, device=v.device))
        w = v.sum(-1)
        w = torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)
        w = torch.nn.functional.pad(w, (0, 0, 0, pad)).reshape(nt, TILE_ROWS, chunks, -1)
        return w.permute(0, 2, 1, 3).contiguous()
    return NMInt4Weight(words(c, 8, 4), words(pos, 16, 2)[..., 0].contiguous(), scales, zeros, N, K, group)


@triton.jit
def _nm_int4_step(x_ptr, c_ptr, i_ptr, s_ptr, z_ptr, st, m, rn, mn, row0, stride_xm, stride_sn, QG: tl.constexpr,
                  TILE: tl.constexpr, BLOCK_N: tl.constexpr, CPS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Chunks st*CPS .. st*CPS + CPS - 1 of a block of rows: scale * sum (c - offset) x per
    (row, chunk), [BLOCK_N, CPS]. Per kept value: its code by a shift and a mask-or into the
    float 2^23 + c (one subtract makes c - offset exactly), its position by a shift, its x by
    three selects among its group's four, one FMA."""
    rc = tl.arange(0, CPS)
    kk = tl.arange(0, 16)                   # kept value in a chunk
    ch = st * CPS + rc                                                           # [CPS] chunk numbers
    r = row0[:, None] + ch[None, :] * TILE                                       # [BLOCK_N, CPS]
    w0 = tl.load(c_ptr + r * 2, eviction_policy="evict_first")
    w1 = tl.load(c_ptr + r * 2 + 1, eviction_policy="evict_first")
    wi = tl.load(i_ptr + r, eviction_policy="evict_first")
    word = tl.where((kk < 8)[None, None, :], w0[:, :, None], w1[:, :, None])
    code = (word >> (4 * (kk % 8))[None, None, :]) & 15                         # kept 8w + i: nibble i of word w
    cf = (code | 0x4B000000).to(tl.float32, bitcast=True)                        # 2^23 + c, exact
    pos = (wi[:, :, None] >> (2 * kk)[None, None, :]) & 3
    xb = x_ptr + m * stride_xm + ch[:, None] * 32 + (kk // 2)[None, :] * 4       # [CPS, 16]: group starts
    x0 = tl.load(xb).to(tl.float32)[None, :, :]
    x1 = tl.load(xb + 1).to(tl.float32)[None, :, :]
    x2 = tl.load(xb + 2).to(tl.float32)[None, :, :]
    x3 = tl.load(xb + 3).to(tl.float32)[None, :, :]
    xs = tl.where(pos < 2, tl.where(pos == 0, x0, x1), tl.where(pos == 2, x2, x3))
    sq = rn[:, None] * stride_sn + (ch[None, :] * 16) // QG                       # [BLOCK_N, CPS]
    if HAS_ZERO:
        off = tl.load(z_ptr + sq, mask=mn[:, None], other=0).to(tl.float32)
    else:
        off = tl.full((BLOCK_N, CPS), 8.0, tl.float32)
    part = tl.sum((cf - (8388608.0 + off)[:, :, None]) * xs, axis=2)
    return part * tl.load(s_ptr + sq, mask=mn[:, None], other=0.0).to(tl.float32)


@triton.jit
def _nm_int4_gemv_kernel(x_ptr, c_ptr, i_ptr, s_ptr, z_ptr, b_ptr, y_ptr, e0_ptr, e1_ptr, N, K, stride_xm,
                         stride_sn, QG: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                         CPS: tl.constexpr, UNROLL: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                         EPI: tl.constexpr, E0: tl.constexpr, E1: tl.constexpr):
    """BLOCK_N rows over all of K, CPS chunks (32 inputs each) per step; UNROLL > 0: the UNROLL
    steps are unrolled (all their loads issued up front), else a loop."""
    pid_n, m = tl.program_id(0), tl.program_id(1)
    chunks = K // 32
    rows = tl.arange(0, BLOCK_N)
    rn = pid_n * BLOCK_N + rows
    mn = rn < N
    row0 = (pid_n * BLOCK_N // TILE) * chunks * TILE + (pid_n * BLOCK_N) % TILE + rows     # chunk 0's rows
    acc = tl.zeros((BLOCK_N, CPS), dtype=tl.float32)
    if UNROLL > 0:
        for st in tl.static_range(UNROLL):
            acc += _nm_int4_step(x_ptr, c_ptr, i_ptr, s_ptr, z_ptr, st, m, rn, mn, row0, stride_xm, stride_sn, QG,
                                 TILE, BLOCK_N, CPS, HAS_ZERO)
    else:
        for st in range(chunks // CPS):
            acc += _nm_int4_step(x_ptr, c_ptr, i_ptr, s_ptr, z_ptr, st, m, rn, mn, row0, stride_xm, stride_sn, QG,
                                 TILE, BLOCK_N, CPS, HAS_ZERO)
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)
    out = apply_epilogue(out, m * N + rn, rn, mn, e0_ptr, e1_ptr, EPI, E0, E1)
    tl.store(y_ptr + m * N + rn, out.to(y_ptr.dtype.element_ty), mask=mn)


def nm_int4_linear(x: torch.Tensor, w: NMInt4Weight, bias: Optional[torch.Tensor] = None, epilogue=None,
                   extras: tuple = ()) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) (-> epilogue) for a ``pack_nm_int4`` weight: this kernel for at
    most 2 rows, ``linear.nm_linear`` on the graph's forms for more (prefill)."""
    K, N = w.k, w.n
    if x.shape[-1] != K:
        raise ValueError(f"nm_int4_linear: x {tuple(x.shape)} must be [..., {K}]")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M > 2:
        from .linear import nm_linear
        codes, index = w.graph_forms()
        return nm_linear(x, codes, index, 2, 4, bias, epilogue=epilogue, extras=extras, value_scales=w.scales,
                         value_zeros=w.zeros, value_group=w.group)
    y, epi = output_buffer(x, M, N, epilogue, extras)
    e0, e1 = epi.pop("e0_ptr"), epi.pop("e1_ptr")
    chunks = K // 32

    def launch(cfg):
        cps = min(cfg["cps"], chunks)
        while chunks % cps:
            cps //= 2
        steps = chunks // cps
        _nm_int4_gemv_kernel[(triton.cdiv(N, cfg["block_n"]), M)](
            x2, w.codes, w.index, w.scales, w.zeros if w.zeros is not None else w.scales,
            bias if bias is not None else w.scales, y, e0, e1, N, K, x2.stride(0), w.scales.stride(0), QG=w.group,
            TILE=TILE_ROWS, BLOCK_N=cfg["block_n"], CPS=cps, UNROLL=steps if steps <= 16 else 0,
            HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None, num_warps=cfg["warps"], **epi)
    default = {"block_n": 16, "cps": 8, "warps": 4}
    cfg = choose("nm_int4_gemv", (M, N, K, w.group, w.zeros is not None, x.dtype), x.device,
                 [{"block_n": bn, "cps": c, "warps": nw} for bn in (8, 16, 32) for c in (4, 8, 16) for nw in (2, 4, 8)],
                 launch, default)
    launch(cfg)
    return y.reshape(*x.shape[:-1], N)
