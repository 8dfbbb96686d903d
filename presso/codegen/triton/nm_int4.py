"""2:4 sparse linears whose kept values are int4 (the ``sparsify{2:4}`` + ``quantize{int4}``
recipes) at decode (M <= 2): y = x W^T + b reading 12 bits per group of 4 weights.

Nothing is gathered: each kept value's input is *selected* among the 4 of its group by its 2-bit
position. With fp16 activations on the GPU one ``prmt`` (byte permute) does the selecting for both
kept values of a group at once: their two positions become a byte selector (a few integer ops on
the index word), the group's four x sit in two registers as fp16 pairs, and ``prmt`` returns the
pair (x[p0], x[p1]) as the fp16x2 operand of one multiply-add with the two dequantized codes
(1024 + c by one ``lop3``, exact (c - 8) / 8 by one fp16x2 FMA). About 5.5 instructions per kept
value instead of ~20 with selects in fp32 (which the plain path keeps: fp32 activations and the
interpreter, which runs no PTX). H100, 1x4096->14336 g128: 17.8 us, 2.3x dense fp16 (the fp32
select kernel it replaces: 45.0 us); three planes of words loaded in the compute layout, so no
shared-memory layout conversion in the loop.

Layout (``pack_nm_int4``, repacked once at load, the same bits as the graph's codes + indices):
K in chunks of 32 inputs (8 groups, 16 kept values); per row and chunk two int32 code words
(``codes`` [2, N_pad, chunks]: word w holds kept 8w + i, group j = i // 2, at bit 4j + 16 (i % 2),
so a group's pair sits 16 bits apart; codes unsigned, symmetric ones stored + 8) and one word of
2-bit positions (``index`` [N_pad, chunks], kept k at bits 2k). Rows are padded to a multiple of
``ROW_PAD`` so the kernel's row blocks need no masks. Scales (and zero points) stay per group of
QG kept values as in the graph, QG a multiple of 16, so a chunk has one.
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
from .linear import INTERPRET
from .nibbles import CODE_PAIRS_PTX, pair_sum_ptx

ROW_PAD = 128


@dataclass
class NMInt4Weight:
    codes: torch.Tensor           # int32 [2, N_pad, K / 32]
    index: torch.Tensor           # int32 [N_pad, K / 32]
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
        w = self.codes[:, :self.n].to(torch.int64) & 0xFFFFFFFF                      # [2, N, chunks]
        c = (w[..., None] >> _code_shifts(w.device)) & 15                             # [2, N, chunks, 8]
        c = c.permute(1, 2, 0, 3).reshape(self.n, -1)
        if self.zeros is None:
            c = c ^ 8
        i = self.index[:self.n].to(torch.int64) & 0xFFFFFFFF
        pos = (i[..., None] >> (2 * torch.arange(16, device=i.device))) & 3
        return pack_int4(c), pos.reshape(self.n, -1).to(torch.uint8)


def _code_shifts(device) -> torch.Tensor:
    """Bit offset of kept value i (0..7) in its code word: group i // 2 at 4 (i // 2), the pair's
    second at +16."""
    i = torch.arange(8, device=device)
    return 4 * (i // 2) + 16 * (i % 2)


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
    pad = -N % ROW_PAD

    def words(v, shifts):              # [N, KV] small ints -> int32 words [N_pad, KV / len(shifts)]
        w = (v.reshape(N, -1, len(shifts)) << shifts).sum(-1)
        w = torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)
        return torch.nn.functional.pad(w, (0, 0, 0, pad))
    cw = words(c, _code_shifts(c.device))                                  # [N_pad, 2 * chunks]
    codes2 = cw.reshape(N + pad, -1, 2).permute(2, 0, 1).contiguous()
    return NMInt4Weight(codes2, words(pos, 2 * torch.arange(16, device=c.device)).contiguous(), scales, zeros,
                        N, K, group)


def _selectors(shift: int, lo: str, hi: str) -> str:
    """PTX: prmt selectors for two groups from the 2 x 2 position bits at bits shift..shift+7 of
    $I: the four 2-bit fields spread to bytes (p0, p1 of each group), times 0x22 plus 0x10 per
    byte make each group's 16-bit selector (bytes 2p, 2p + 1 for each of its two kept values)."""
    src = "$I" if shift == 0 else "i"
    pre = "" if shift == 0 else f"""
        shr.u32 i, $I, {shift};"""
    return pre + f"""
        and.b32 i, {src}, 0xFF;
        shl.b32 u, i, 6;
        or.b32 T, i, u;
        shl.b32 u, i, 12;
        or.b32 T, T, u;
        shl.b32 u, i, 18;
        or.b32 T, T, u;
        and.b32 T, T, 0x03030303;
        mad.lo.u32 {lo}, T, 0x22, 0x10101010;
        shr.u32 {hi}, {lo}, 16;"""


# group j of a word: codes at bits (4j, 4j + 16) -- CODE_PAIRS_PTX's a, c, b, d for j = 0..3
_SELECT_DOT = CODE_PAIRS_PTX + _selectors(0, "s0", "s1") + _selectors(8, "s2", "s3") + """
        prmt.b32 y0, $X0, $X1, s0;
        prmt.b32 y1, $X2, $X3, s1;
        prmt.b32 y2, $X4, $X5, s2;
        prmt.b32 y3, $X6, $X7, s3;
        mul.rn.f16x2 acc, a, y0;
        fma.rn.f16x2 acc, c, y1, acc;
        fma.rn.f16x2 acc, b, y2, acc;
        fma.rn.f16x2 acc, d, y3, acc;""" + pair_sum_ptx("$0")
_SELECT_SUM = """
        add.f16x2 acc, y0, y1;
        add.f16x2 acc, acc, y2;
        add.f16x2 acc, acc, y3;""" + pair_sum_ptx("$1")
_REGS = """
        .reg .b32 a, b, c, d, t, m, s, acc, i, u, T, s0, s1, s2, s3, y0, y1, y2, y3;
        .reg .b16 lo, hi;
        .reg .f32 f0, f1;"""


def _asm(with_sum: bool) -> str:
    """The select-dot for one code word (4 groups) with operand numbers filled in: $0 the dot
    sum (c - 8) / 8 * x[p]; with_sum: $1 the sum of the selected x."""
    first = 2 if with_sum else 1
    names = {"$W": first, "$I": first + 1, **{f"$X{k}": first + 2 + k for k in range(8)}}
    body = _SELECT_DOT + (_SELECT_SUM if with_sum else "")
    for name in sorted(names, key=len, reverse=True):
        body = body.replace(name, f"${names[name]}")
    return "{" + _REGS + body + "\n        }"


_ASM_DOT = tl.constexpr(_asm(False))
_ASM_DOT_SUM = tl.constexpr(_asm(True))


@triton.jit
def _word_f16x2(w, wi, xb, HAS_ZERO: tl.constexpr):
    """One code word per (row, chunk) of a [BLOCK_N, CPS] tile: (sum (c - 8) / 8 * x[p], sum x[p]
    or 0) in fp32. wi: the word's 16 position bits at bits 0..15; xb: [CPS] pointers to its 4
    groups' x as 8 int32 fp16 pairs."""
    shape: tl.constexpr = w.shape
    xs = (tl.broadcast_to(tl.load(xb)[None, :], shape), tl.broadcast_to(tl.load(xb + 1)[None, :], shape),
          tl.broadcast_to(tl.load(xb + 2)[None, :], shape), tl.broadcast_to(tl.load(xb + 3)[None, :], shape),
          tl.broadcast_to(tl.load(xb + 4)[None, :], shape), tl.broadcast_to(tl.load(xb + 5)[None, :], shape),
          tl.broadcast_to(tl.load(xb + 6)[None, :], shape), tl.broadcast_to(tl.load(xb + 7)[None, :], shape))
    if HAS_ZERO:
        dot, xsum = tl.inline_asm_elementwise(
            asm=_ASM_DOT_SUM, constraints="=r,=r,r,r,r,r,r,r,r,r,r,r",
            args=[w, wi, xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7]],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        dot = tl.inline_asm_elementwise(
            asm=_ASM_DOT, constraints="=r,r,r,r,r,r,r,r,r,r,r",
            args=[w, wi, xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7]],
            dtype=tl.float32, is_pure=True, pack=1)
        xsum = 0.0
    return dot, xsum


@triton.jit
def _word_plain(w, wi, xb):
    """``_word_f16x2`` in plain fp32 Triton (fp32 activations, the interpreter): the same layout,
    each kept value's x chosen among its group's four (``xb``: [CPS] pointers to the word's 16
    inputs) by three selects."""
    dot = tl.zeros(w.shape, dtype=tl.float32)
    xsum = tl.zeros(w.shape, dtype=tl.float32)
    for i in tl.static_range(8):
        j = i // 2
        c = ((w >> (4 * j + 16 * (i % 2))) & 15).to(tl.float32)
        p = (wi >> (4 * j + 2 * (i % 2))) & 3
        x0 = tl.load(xb + 4 * j).to(tl.float32)[None, :]
        x1 = tl.load(xb + 4 * j + 1).to(tl.float32)[None, :]
        x2 = tl.load(xb + 4 * j + 2).to(tl.float32)[None, :]
        x3 = tl.load(xb + 4 * j + 3).to(tl.float32)[None, :]
        xv = tl.where(p < 2, tl.where(p == 0, x0, x1), tl.where(p == 2, x2, x3))
        dot += (c - 8.0) * 0.125 * xv
        xsum += xv
    return dot, xsum


@triton.jit
def _nm_int4_step(x_ptr, xw_ptr, c_ptr, i_ptr, s_ptr, z_ptr, st, m, rn, mn, chunks, N_PAD, stride_xm, stride_sn,
                  QG: tl.constexpr, CPS: tl.constexpr, F16X2: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Chunks st*CPS .. st*CPS + CPS - 1 of a block of rows: scale * (8 * sum (c - 8) / 8 x[p]
    + (8 - z) * sum x[p]) per (row, chunk), [BLOCK_N, CPS]."""
    ch = st * CPS + tl.arange(0, CPS)
    off = rn[:, None] * chunks + ch[None, :]
    w0 = tl.load(c_ptr + off, eviction_policy="evict_first")
    w1 = tl.load(c_ptr + N_PAD * chunks + off, eviction_policy="evict_first")
    wi = tl.load(i_ptr + off, eviction_policy="evict_first")
    if F16X2:
        xb = xw_ptr + m * (stride_xm // 2) + ch * 16                                    # fp16 pairs
        d0, s0 = _word_f16x2(w0, wi, xb, HAS_ZERO)
        d1, s1 = _word_f16x2(w1, wi >> 16, xb + 8, HAS_ZERO)
    else:
        xb = x_ptr + m * stride_xm + ch * 32
        d0, s0 = _word_plain(w0, wi, xb)
        d1, s1 = _word_plain(w1, wi >> 16, xb + 16)
    sq = rn[:, None] * stride_sn + (ch[None, :] * 16) // QG
    part = 8.0 * (d0 + d1)
    if HAS_ZERO:
        part += (8.0 - tl.load(z_ptr + sq, mask=mn[:, None], other=0).to(tl.float32)) * (s0 + s1)
    return part * tl.load(s_ptr + sq, mask=mn[:, None], other=0.0).to(tl.float32)


@triton.jit
def _nm_int4_gemv_kernel(x_ptr, xw_ptr, c_ptr, i_ptr, s_ptr, z_ptr, b_ptr, y_ptr, e0_ptr, e1_ptr, N, N_PAD, K,
                         stride_xm, stride_sn, QG: tl.constexpr, BLOCK_N: tl.constexpr, CPS: tl.constexpr,
                         UNROLL: tl.constexpr, F16X2: tl.constexpr, HAS_ZERO: tl.constexpr,
                         HAS_BIAS: tl.constexpr, EPI: tl.constexpr, E0: tl.constexpr, E1: tl.constexpr):
    """BLOCK_N rows over all of K, CPS chunks (32 inputs each) per step; UNROLL > 0: the UNROLL
    steps are unrolled (all their loads issued up front), else a loop."""
    pid_n, m = tl.program_id(0), tl.program_id(1)
    chunks = K // 32
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    acc = tl.zeros((BLOCK_N, CPS), dtype=tl.float32)
    if UNROLL > 0:
        for st in tl.static_range(UNROLL):
            acc += _nm_int4_step(x_ptr, xw_ptr, c_ptr, i_ptr, s_ptr, z_ptr, st, m, rn, mn, chunks, N_PAD, stride_xm,
                                 stride_sn, QG, CPS, F16X2, HAS_ZERO)
    else:
        for st in range(chunks // CPS):
            acc += _nm_int4_step(x_ptr, xw_ptr, c_ptr, i_ptr, s_ptr, z_ptr, st, m, rn, mn, chunks, N_PAD, stride_xm,
                                 stride_sn, QG, CPS, F16X2, HAS_ZERO)
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
    f16x2 = x2.dtype == torch.float16 and not INTERPRET
    xw = x2.view(torch.int32) if f16x2 else x2               # fp16 pairs as one int32 each

    def launch(cfg):
        cps = min(cfg["cps"], chunks)
        while chunks % cps:
            cps //= 2
        steps = chunks // cps
        _nm_int4_gemv_kernel[(triton.cdiv(N, cfg["block_n"]), M)](
            x2, xw, w.codes, w.index, w.scales, w.zeros if w.zeros is not None else w.scales,
            bias if bias is not None else w.scales, y, e0, e1, N, w.codes.shape[1], K, x2.stride(0),
            w.scales.stride(0), QG=w.group, BLOCK_N=cfg["block_n"], CPS=cps, UNROLL=steps if steps <= 16 else 0,
            F16X2=f16x2, HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None, num_warps=cfg["warps"], **epi)
    default = {"block_n": 32, "cps": 16, "warps": 4}     # H100 sweep at 1x4096->14336 (RESULTS.md)
    cfg = choose("nm_int4_select", (M, N, K, w.group, w.zeros is not None, x.dtype), x.device,
                 lambda: [{"block_n": bn, "cps": c, "warps": nw} for bn, c, nw in
                  ((16, 16, 4), (16, 32, 4), (32, 16, 4), (32, 32, 8), (64, 16, 8), (64, 32, 8))],
                 launch, default)
    launch(cfg)
    return y.reshape(*x.shape[:-1], N)
