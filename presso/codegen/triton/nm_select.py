"""2:4 and 4:8 sparse linears at decode (up to 16 rows of x per call), kept values fp16 / bf16
or int4: y = x W^T + b with each kept value's input *selected* among its group's, never gathered.

The graph's kept values and 2-bit positions become, once at load (``pack_nm_select`` /
``pack_nm_select_int4``), planes of int32 words stored transposed (row index fastest), so a tile
[chunks, rows] loads contiguous along the rows and one thread holds several rows of one chunk
(32 inputs, 8 groups):

* fp16 ``values`` [K/4, N_pad]: word (g, n) is the fp16 pair (v0, v1) of group g of row n; int4
  ``values`` [2, K/32, N_pad]: two code words per chunk (decoded to exact (c - 8) / 8 fp16 pairs
  by ``lop3`` + one fp16x2 FMA; the scale, per chunk, multiplies the row sums);
* ``index`` [K/32, N_pad]: word (c, n) holds the 2-bit positions of chunk c's 16 kept values
  (kept value k at bits 2k) -- the graph's 2-bit index bytes, four to a word.

Per chunk and row the positions become 8 ``prmt`` selectors once (``selector_ptx``), shared by
all the call's rows of x: per group and row of x one ``prmt`` picks (x[p0], x[p1]) from the
group's four x (one 64-bit word) and one fp16x2 FMA multiplies them with (v0, v1); a chunk's 16
products are summed in fp16x2, then in fp32. The weights are read once per call whatever the
rows. The kernel is generated per number of rows (one fp32 accumulator tile per row of x, all in
registers). H100, 4096 -> 14336: 1 row fp16 values 23.5 us (1.77x dense fp16, 92% of copy
bandwidth), int4 values 12.6 us (3.3x); 4 rows 1.44x / 2.04x; 16 rows 0.69x / 0.72x (ALU-bound).
bf16 models select the same way, then widen x and values to fp32 (a shift or a mask) for fp32
FMAs (1 row 1.59x dense bf16).

4:8 keeps the same planes (a chunk's 16 kept values are 8 pairs, pair g in group g // 2 of eight
inputs) plus a second index plane with bit 2 of each position: the 2-bit selectors pick within
each half of the group's eight x, and a third ``prmt`` per pair takes each lane from the half its
bit 2 names (merge selectors from the bit-2 word, ``chunk_merges``). H100: 1 row 1.57x dense fp16
(26.4 us), 4 rows 1.19x, int4 values 2.12x / 1.17x (the gather and dense-tile kernels 4:8 ran
before: 1.35x at 1 row, 0.09x at 4). More rows (prefill) rebuild the dense weight transposed into a
transient workspace (copy-bound) for one cuBLAS matmul. The interpreter and other activation
dtypes run the same layout with the selection done by gathers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ...ir.ops import unpack_int4
from .autotune import choose
from .epilogue import apply_epilogue, output_buffer, run_epilogue
from .linear import INTERPRET, pack_nm_index
from .nibbles import CODE_PAIRS_PTX, pair_sum_ptx, selector_ptx
from .source import load_source
from .splitk import split_factor, zeroed_counters

ROW_PAD = 256          # rows padded to the largest row block: the weight loads need no masks
MAX_ROWS = 16          # rows of x per program; more rows (prefill) densify into a workspace instead
F16, INT4 = 0, 1       # what the kept values are


@dataclass
class NMSelectWeight:
    """One 2:4 linear in the select layout (module docstring); ``kind`` F16 or INT4."""
    values: torch.Tensor                     # F16: int32 [K/4, N_pad] pairs; INT4: int32 [2, K/32, N_pad] codes
    index: torch.Tensor                      # int32 [K/32, N_pad]: 2-bit positions
    n: int
    k: int
    kind: int = F16
    scales: Optional[torch.Tensor] = None    # INT4: [KV/group, N_pad] (fp16)
    zeros: Optional[torch.Tensor] = None     # INT4 with zero points: [KV/group, N_pad] (uint8)
    group: int = 0                           # INT4: kept values per scale
    bf16: bool = False                       # F16: the pairs are bf16 (else fp16)
    m: int = 4                               # 2:4, or 4:8 (index [2, K/32, N_pad]: low bits, then bit 2)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.index, self.scales, self.zeros)
                   if t is not None)

    def dense_t(self, block_n: int = 256) -> torch.Tensor:
        """The weight (fp16; bf16 for bf16 values) rebuilt transposed, [K, N_pad] (one kernel; reads
        and writes run along the rows, as the planes are stored): the prefill path's transient
        workspace, x @ it[:, :N]."""
        n_pad = self.values.shape[-1]
        w = torch.empty(self.k, n_pad, dtype=torch.bfloat16 if self.bf16 else torch.float16, device=self.values.device)
        sc = self.scales if self.scales is not None else self.values
        _densify_kernel[(triton.cdiv(n_pad, block_n), self.k // 32)](
            self.values, self.index, sc, self.zeros if self.zeros is not None else sc, w, n_pad, self.k,
            KIND=self.kind, QG=max(self.group, 1), HAS_ZERO=self.zeros is not None, VBF=self.bf16, M8=self.m == 8,
            BLOCK_N=block_n)
        return w

    def dense(self) -> torch.Tensor:
        """The weight [N, K] (tests, inspection)."""
        return self.dense_t()[:, :self.n].t().contiguous()


@triton.jit
def _densify_kernel(v_ptr, i_ptr, s_ptr, z_ptr, w_ptr, N_PAD, K, KIND: tl.constexpr, QG: tl.constexpr,
                    HAS_ZERO: tl.constexpr, VBF: tl.constexpr, M8: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows 32c .. 32c + 31 (chunk c) of the transposed dense weight for BLOCK_N of its columns:
    each pair of kept values put at their positions, zeros elsewhere (2:4: pair g fills group g's
    four rows; 4:8: pairs 2h and 2h + 1 fill group h's eight, each pair its own copy of them, added)."""
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[None, None, :]
    c = tl.program_id(1)
    g = tl.arange(0, 8)[:, None, None]
    j = tl.arange(0, 4)[None, :, None]
    bits = tl.load(i_ptr + c * N_PAD + rn) >> (4 * g)                                  # [8, 1, BLOCK_N]
    if KIND == 0:
        v = tl.load(v_ptr + (8 * c + g) * N_PAD + rn)
        lo, hi = _half(v, 0, VBF), _half(v, 1, VBF)
    else:
        wd = tl.load(v_ptr + ((g // 4) * (K // 32) + c) * N_PAD + rn)
        sh = 4 * (g % 4)
        so = (c * 16 // QG) * N_PAD + rn
        sc = tl.load(s_ptr + so).to(tl.float32)
        off = tl.load(z_ptr + so).to(tl.float32) if HAS_ZERO else 8.0
        lo = (((wd >> sh) & 15).to(tl.float32) - off) * sc
        hi = (((wd >> (sh + 16)) & 15).to(tl.float32) - off) * sc
    if M8:     # positions 0..7 in group g // 2: bit 2 from the second plane; the pair's eight rows
        high = tl.load(i_ptr + (K // 32 + c) * N_PAD + rn) >> (2 * g)
        p0, p1 = (bits & 3) | ((high & 1) << 2), ((bits >> 2) & 3) | ((high & 2) << 1)
        j8 = tl.arange(0, 8)[None, :, None]
        d = tl.where(j8 == p0, lo, tl.where(j8 == p1, hi, 0.0))                        # [8 pairs, 8, BLOCK_N]
        d = tl.sum(tl.reshape(d, (4, 2, 8, BLOCK_N)), axis=1)                           # a group's two pairs
        g4 = tl.arange(0, 4)[:, None, None]
        tl.store(w_ptr + (32 * c + 8 * g4 + j8) * N_PAD + rn, d.to(w_ptr.dtype.element_ty))
    else:
        d = tl.where(j == (bits & 3), lo, tl.where(j == ((bits >> 2) & 3), hi, 0.0))
        tl.store(w_ptr + (32 * c + 4 * g + j) * N_PAD + rn, d.to(w_ptr.dtype.element_ty))


def fits(k: int, dtype: torch.dtype = torch.float16, group: int = 16) -> bool:
    """Whether a 2:4 or 4:8 linear over K inputs has the select layout: fp16 or bf16 kept values,
    or int4 ones in scale groups of a multiple of 16 kept values (one scale per chunk)."""
    return (k % 32 == 0 and dtype in (torch.float16, torch.bfloat16) and group % 16 == 0
            and (k // 2) % group == 0)


def _two_bit_words(index: torch.Tensor, kept: int) -> torch.Tensor:
    """The graph's 2:4 positions (4-bit packed or one byte each) -> int32 words [N, K/32]."""
    idx2, bits = pack_nm_index(index, kept, 4)
    if bits != 2 or idx2.shape[1] * 4 != kept:
        raise ValueError(f"pack_nm_select: index {tuple(index.shape)} does not hold the 2:4 positions of {kept} "
                         "kept values")
    return idx2.contiguous().view(torch.int32)


def _position_planes(index: torch.Tensor, kept: int, m: int) -> torch.Tensor:
    """The graph's positions -> the select layout's index plane: 2:4 [K/32, N_pad]; 4:8 [2, K/32,
    N_pad], the positions' low two bits as 2:4's words (so the same prmt selectors pick within each
    half of a group's eight x), then bit 2 of kept value k of each chunk at bit k."""
    if m == 4:
        return _plane(_two_bit_words(index, kept))
    if m != 8:
        raise ValueError(f"pack_nm_select: {m} inputs per group has no select layout (2:4 or 4:8)")
    N = index.shape[0]
    if index.shape[1] * 2 == kept:                                   # 4-bit packed
        index = unpack_int4(index, signed=False)
    if tuple(index.shape) != (N, kept) or kept % 16:
        raise ValueError(f"pack_nm_select: index {tuple(index.shape)} does not hold the 4:8 positions of {kept} "
                         "kept values")
    index = index.to(torch.int64)
    high = ((index >> 2) & 1).reshape(N, kept // 16, 16) << torch.arange(16, device=index.device)
    return torch.stack([_plane(_two_bit_words((index & 3).to(torch.uint8), kept)),
                        _plane(high.sum(-1).to(torch.int32))])


def _plane(t: torch.Tensor) -> torch.Tensor:
    """[N, X] -> [X, N_pad]: rows padded to ROW_PAD, the row index fastest."""
    return torch.nn.functional.pad(t, (0, 0, 0, -t.shape[0] % ROW_PAD)).t().contiguous()


def pack_nm_select(values: torch.Tensor, index: torch.Tensor, m: int = 4) -> NMSelectWeight:
    """The graph's 2:4 (or 4:8, ``m=8``) kept values [N, K/2] (fp16 or bf16) and positions (4-bit
    packed [N, K/4] or one byte each [N, K/2]) -> the select layout."""
    N, KV = values.shape
    if not fits(2 * KV, values.dtype):
        raise ValueError(f"pack_nm_select: {m // 2}:{m} values {tuple(values.shape)} {values.dtype} have no select "
                         "layout (needs fp16 or bf16 values and K % 32 == 0)")
    return NMSelectWeight(_plane(values.contiguous().view(torch.int32)), _position_planes(index, KV, m),
                          N, 2 * KV, bf16=values.dtype == torch.bfloat16, m=m)


def pack_nm_select_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group: int,
                        index: torch.Tensor, m: int = 4) -> NMSelectWeight:
    """The graph's int4 kept values [N, KV/2] (two per byte; signed, or unsigned with zero
    points), their scales [N, KV/group] and 2:4 (or 4:8) positions -> the select layout: per chunk two
    code words, word w holding kept value 8w + i (group i // 2) at bit 4 (i // 2) + 16 (i % 2),
    so a group's pair sits 16 bits apart; codes stored unsigned (symmetric ones + 8)."""
    N, KV = codes.shape[0], codes.shape[1] * 2
    if not fits(2 * KV, torch.float16, group) or tuple(scales.shape) != (N, KV // group):
        raise ValueError(f"pack_nm_select_int4: {KV} int4 kept values per row with scales {tuple(scales.shape)} "
                         f"in groups of {group} have no select layout (needs K % 32 == 0 and groups of a multiple "
                         "of 16 kept values)")
    c = unpack_int4(codes, signed=False).to(torch.int64)
    if zeros is None:
        c = c ^ 8                                          # two's-complement nibble -> c + 8
    i = torch.arange(8, device=c.device)
    w = (c.reshape(N, -1, 8) << (4 * (i // 2) + 16 * (i % 2))).sum(-1)                 # [N, KV / 8]
    w = torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32).reshape(N, -1, 2)   # [N, chunks, 2]
    planes = torch.stack([_plane(w[..., h]) for h in range(2)])
    return NMSelectWeight(planes, _position_planes(index, KV, m), N, 2 * KV, INT4,
                          _plane(scales.half()), None if zeros is None else _plane(zeros.to(torch.uint8)), group, m=m)


_SELECT_PTX = "{\n        .reg .b32 i, u, T;" + "".join(
    selector_ptx(8 * w, f"${2 * w}", f"${2 * w + 1}") for w in range(4)).replace("$I", "$8") + "\n        }"


def _select_x(g: int, o: int, nm8: bool) -> list[str]:
    """PTX: pair g's two x into ``y`` (an fp16 / bf16 pair). Operands from $o: the 8 value pairs,
    their selectors, (4:8: their merge selectors,) then the chunk's 8 words of four x. 2:4: one
    ``prmt`` among group g's four x; 4:8: the same selector picks in each half of group g // 2's
    eight x, and a third ``prmt`` takes each lane from the half its position's bit 2 names."""
    xw = o + (24 if nm8 else 16)
    if not nm8:
        return [f"        mov.b64 {{xa, xb}}, ${xw + g};", f"        prmt.b32 y, xa, xb, ${o + 8 + g};"]
    h = 2 * (g // 2)
    return [f"        mov.b64 {{xa, xb}}, ${xw + h};", f"        prmt.b32 yl, xa, xb, ${o + 8 + g};",
            f"        mov.b64 {{xa, xb}}, ${xw + h + 1};", f"        prmt.b32 yh, xa, xb, ${o + 8 + g};",
            f"        prmt.b32 y, yl, yh, ${o + 16 + g};"]


def _dot_ptx(with_sum: bool, nm8: bool = False) -> str:
    """Operands: $0 the fp32 sum of value * selected x (with_sum: $1 that of the selected x); then
    the value pairs of the chunk's 8 pairs of kept values, their selectors (``_select_x``), and
    the chunk's x as 8 64-bit words (two fp16 pairs each)."""
    o = 2 if with_sum else 1
    body = ["{", "        .reg .b32 y, yl, yh, acc, sacc, xa, xb;", "        .reg .b16 lo, hi;", "        .reg .f32 f0, f1;"]
    for g in range(8):
        body += _select_x(g, o, nm8)
        body.append(f"        mul.rn.f16x2 acc, ${o + g}, y;" if g == 0 else
                    f"        fma.rn.f16x2 acc, ${o + g}, y, acc;")
        if with_sum:
            body.append("        mov.b32 sacc, y;" if g == 0 else "        add.rn.f16x2 sacc, sacc, y;")
    text = "\n".join(body) + pair_sum_ptx("$0")
    if with_sum:
        text += "\n        mov.b32 acc, sacc;" + pair_sum_ptx("$1")
    return text + "\n        }"


def _dot_f32_ptx(with_sum: bool, values_bf16: bool, nm8: bool = False) -> str:
    """``_dot_ptx`` for bf16 activations, in fp32: the selected pair of bf16 x and the value pair
    (bf16, or the int4 path's exact fp16 codes) widened to fp32 (a bf16 is the top half of an fp32:
    a shift or a mask), two fp32 FMAs per group (bf16 products summed in bf16 would lose too much)."""
    o = 2 if with_sum else 1
    body = ["{", "        .reg .b32 y, yl, yh, t, xa, xb;", "        .reg .b16 lo, hi;",
            "        .reg .f32 acc, sacc, xl, xh, vl, vh;"]
    for g in range(8):
        body += _select_x(g, o, nm8) + ["        shl.b32 t, y, 16;", "        mov.b32 xl, t;",
                 "        and.b32 t, y, 0xFFFF0000;", "        mov.b32 xh, t;"]
        if values_bf16:
            body += [f"        shl.b32 t, ${o + g}, 16;", "        mov.b32 vl, t;",
                     f"        and.b32 t, ${o + g}, 0xFFFF0000;", "        mov.b32 vh, t;"]
        else:
            body += [f"        mov.b32 {{lo, hi}}, ${o + g};", "        cvt.f32.f16 vl, lo;",
                     "        cvt.f32.f16 vh, hi;"]
        body += ["        mul.rn.f32 acc, vl, xl;" if g == 0 else "        fma.rn.f32 acc, vl, xl, acc;",
                 "        fma.rn.f32 acc, vh, xh, acc;"]
        if with_sum:
            body += ["        add.f32 sacc, xl, xh;" if g == 0 else "        add.f32 sacc, sacc, xl;"]
            if g:
                body.append("        add.f32 sacc, sacc, xh;")
    body.append("        mov.b32 $0, acc;")
    if with_sum:
        body.append("        mov.b32 $1, sacc;")
    return "\n".join(body) + "\n        }"


def _codes_ptx() -> str:
    """Two code words ($8, $9) -> the 8 groups' exact (c - 8) / 8 fp16 pairs ($0..$7)."""
    parts = []
    for h in range(2):
        outs = [f"${4 * h + j}" for j in range(4)]
        parts.append("{\n        .reg .b32 a, b, c, d, t, m, s;" + CODE_PAIRS_PTX.replace("$W", f"${8 + h}")
                     + "".join(f"\n        mov.b32 {o}, {r};" for o, r in zip(outs, "acbd")) + "\n        }")
    return "{\n" + "\n".join(parts) + "\n        }"


_ASM_SELECT = tl.constexpr(_SELECT_PTX)
_ASM_CODES = tl.constexpr(_codes_ptx())
_ASM_DOT = tl.constexpr(_dot_ptx(False))
_ASM_DOT_SUM = tl.constexpr(_dot_ptx(True))
_ASM_DOT_BF = tl.constexpr(_dot_f32_ptx(False, True))            # bf16 x, bf16 values
_ASM_DOT_BF_F16 = tl.constexpr(_dot_f32_ptx(False, False))       # bf16 x, int4 codes as fp16 pairs
_ASM_DOT_BF_F16_SUM = tl.constexpr(_dot_f32_ptx(True, False))
_ASM_DOT8 = tl.constexpr(_dot_ptx(False, True))                  # the same for 4:8
_ASM_DOT8_SUM = tl.constexpr(_dot_ptx(True, True))
_ASM_DOT8_BF = tl.constexpr(_dot_f32_ptx(False, True, True))
_ASM_DOT8_BF_F16 = tl.constexpr(_dot_f32_ptx(False, False, True))
_ASM_DOT8_BF_F16_SUM = tl.constexpr(_dot_f32_ptx(True, False, True))
PLAIN, F16X2, BF16_F32 = 0, 1, 2      # how the kernel computes (``PTX``): gathers / fp16x2 / bf16 in fp32


@triton.jit
def chunk_selectors(wi, PTX: tl.constexpr):
    """The 8 groups' prmt selectors of a [CPS, BLOCK_N] tile of position words (PTX paths); the
    plain path selects by gathers and gets the words back unchanged."""
    if PTX > 0:
        return tl.inline_asm_elementwise(asm=_ASM_SELECT, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r", args=[wi],
                                         dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    return wi, wi, wi, wi, wi, wi, wi, wi


@triton.jit
def chunk_codes(v_ptr, off, CHUNK_PLANE, PTX: tl.constexpr):
    """INT4: a chunk's two code words -> its 8 groups' value pairs as fp16x2 bit patterns of the
    exact (c - 8) / 8 (the scale is applied to the row sums)."""
    w0 = tl.load(v_ptr + off, eviction_policy="evict_first")
    w1 = tl.load(v_ptr + CHUNK_PLANE + off, eviction_policy="evict_first")
    if PTX > 0:
        return tl.inline_asm_elementwise(asm=_ASM_CODES, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r", args=[w0, w1],
                                         dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    return (_code_pair(w0, 0), _code_pair(w0, 1), _code_pair(w0, 2), _code_pair(w0, 3),
            _code_pair(w1, 0), _code_pair(w1, 1), _code_pair(w1, 2), _code_pair(w1, 3))


@triton.jit
def _code_pair(w, j: tl.constexpr):
    """Plain path: group j's codes (bits 4j and 4j + 16) as the fp16 pair of (c - 8) / 8."""
    lo = ((((w >> (4 * j)) & 15) - 8).to(tl.float32) * 0.125).to(tl.float16).to(tl.int16, bitcast=True)
    hi = ((((w >> (4 * j + 16)) & 15) - 8).to(tl.float32) * 0.125).to(tl.float16).to(tl.int16, bitcast=True)
    return (lo.to(tl.int32) & 0xFFFF) | (hi.to(tl.int32) << 16)


@triton.jit
def _half(v, hi: tl.constexpr, VBF: tl.constexpr = False):
    """The low (hi = 0) or high fp16 (bf16 with VBF) of int32 pairs, as fp32."""
    h = ((v >> (16 * hi)) & 0xFFFF).to(tl.int16)
    if VBF:
        return h.to(tl.bfloat16, bitcast=True).to(tl.float32)
    return h.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def row_dot(v0, v1, v2, v3, v4, v5, v6, v7, s0, s1, s2, s3, s4, s5, s6, s7, m0, m1, m2, m3, m4, m5, m6, m7, wi, wh,
            xw_row, x_row, ch, PTX: tl.constexpr, VBF: tl.constexpr, WITH_SUM: tl.constexpr, M8: tl.constexpr):
    """(sum over each chunk of kept value * selected x, that of the selected x -- or the first
    again without WITH_SUM) for one row of x: [CPS, BLOCK_N] fp32 each. ``xw_row``: the row as
    int64 words of four 16-bit x (PTX paths), ``x_row``: the row itself (plain); VBF: the value
    pairs are bf16 (else fp16); M8: 4:8 (m0..m7 the merge selectors, wh the positions' bit 2)."""
    shape: tl.constexpr = wi.shape
    if PTX > 0:
        xb = xw_row + ch * 8
        x0, x1, x2, x3 = _xgroup(xb, 0, shape), _xgroup(xb, 1, shape), _xgroup(xb, 2, shape), _xgroup(xb, 3, shape)
        x4, x5, x6, x7 = _xgroup(xb, 4, shape), _xgroup(xb, 5, shape), _xgroup(xb, 6, shape), _xgroup(xb, 7, shape)
        if M8:
            args = [v0, v1, v2, v3, v4, v5, v6, v7, s0, s1, s2, s3, s4, s5, s6, s7, m0, m1, m2, m3, m4, m5, m6, m7,
                    x0, x1, x2, x3, x4, x5, x6, x7]
            ins: tl.constexpr = ",r" * 24 + ",l" * 8
            if PTX == 1:
                asm: tl.constexpr = _ASM_DOT8_SUM if WITH_SUM else _ASM_DOT8
            elif WITH_SUM:
                asm: tl.constexpr = _ASM_DOT8_BF_F16_SUM
            else:
                asm: tl.constexpr = _ASM_DOT8_BF if VBF else _ASM_DOT8_BF_F16
        else:
            args = [v0, v1, v2, v3, v4, v5, v6, v7, s0, s1, s2, s3, s4, s5, s6, s7, x0, x1, x2, x3, x4, x5, x6, x7]
            ins: tl.constexpr = ",r" * 16 + ",l" * 8
            if PTX == 1:
                asm: tl.constexpr = _ASM_DOT_SUM if WITH_SUM else _ASM_DOT
            elif WITH_SUM:
                asm: tl.constexpr = _ASM_DOT_BF_F16_SUM
            else:
                asm: tl.constexpr = _ASM_DOT_BF if VBF else _ASM_DOT_BF_F16
        if WITH_SUM:          # (int4 values with zero points)
            return tl.inline_asm_elementwise(asm=asm, constraints="=r,=r" + ins, args=args,
                                             dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
        d = tl.inline_asm_elementwise(asm=asm, constraints="=r" + ins, args=args, dtype=tl.float32, is_pure=True,
                                      pack=1)
        return d, d
    xb = x_row + ch[:, None] * 32
    d0, t0 = _gathered_pair(v0, wi, wh, xb, 0, VBF, M8)
    d1, t1 = _gathered_pair(v1, wi, wh, xb, 1, VBF, M8)
    d2, t2 = _gathered_pair(v2, wi, wh, xb, 2, VBF, M8)
    d3, t3 = _gathered_pair(v3, wi, wh, xb, 3, VBF, M8)
    d4, t4 = _gathered_pair(v4, wi, wh, xb, 4, VBF, M8)
    d5, t5 = _gathered_pair(v5, wi, wh, xb, 5, VBF, M8)
    d6, t6 = _gathered_pair(v6, wi, wh, xb, 6, VBF, M8)
    d7, t7 = _gathered_pair(v7, wi, wh, xb, 7, VBF, M8)
    return d0 + d1 + d2 + d3 + d4 + d5 + d6 + d7, t0 + t1 + t2 + t3 + t4 + t5 + t6 + t7


@triton.jit
def chunk_merges(wh, PTX: tl.constexpr):
    """4:8: the 8 pairs' merge selectors (``_select_x``) from a [CPS, BLOCK_N] tile of bit-2 words:
    lane 0 of pair g from the high half's bytes 4, 5 when kept value 2g's bit 2 is set, lane 1
    from bytes 6, 7 when 2g + 1's is."""
    if PTX > 0:
        return (_merge(wh, 0), _merge(wh, 1), _merge(wh, 2), _merge(wh, 3), _merge(wh, 4), _merge(wh, 5),
                _merge(wh, 6), _merge(wh, 7))
    return wh, wh, wh, wh, wh, wh, wh, wh


@triton.jit
def _merge(wh, g: tl.constexpr):
    h = wh >> (2 * g)
    return 0x3210 + (h & 1) * 0x44 + ((h >> 1) & 1) * 0x4400


@triton.jit
def _xgroup(xb, g: tl.constexpr, shape: tl.constexpr):
    """Group g's four fp16 x of each chunk as one int64, broadcast over the tile's rows."""
    return tl.broadcast_to(tl.load(xb + g)[:, None], shape)


@triton.jit
def _gathered_pair(v, wi, wh, xb, g: tl.constexpr, VBF: tl.constexpr, M8: tl.constexpr):
    """Plain path: pair g's two kept values times their x, gathered by position (2:4: in group g's
    four x; 4:8: in group g // 2's eight), and the two x (fp32)."""
    p0 = (wi >> (4 * g)) & 3
    p1 = (wi >> (4 * g + 2)) & 3
    if M8:
        base: tl.constexpr = 8 * (g // 2)
        p0 |= ((wh >> (2 * g)) & 1) << 2
        p1 |= ((wh >> (2 * g + 1)) & 1) << 2
    else:
        base: tl.constexpr = 4 * g
    x0 = tl.load(xb + base + p0).to(tl.float32)
    x1 = tl.load(xb + base + p1).to(tl.float32)
    return _half(v, 0, VBF) * x0 + _half(v, 1, VBF) * x1, x0 + x1


@triton.jit
def finish_row(acc, r: tl.constexpr, rn, N, b_ptr, y_ptr, e0_ptr, e1_ptr, HAS_BIAS: tl.constexpr,
               EPI: tl.constexpr, E0: tl.constexpr, E1: tl.constexpr):
    """Row r of y: the chunk sums added up, bias, epilogue, one store."""
    store_sum(tl.sum(acc, axis=0), r, rn, N, b_ptr, y_ptr, e0_ptr, e1_ptr, HAS_BIAS, EPI, E0, E1)


@triton.jit
def split_partial(acc, r: tl.constexpr, rn, N, ws_ptr, SPLIT: tl.constexpr):
    """Split-K: this program's chunk sums of row r to its slot of the fp32 workspace [rows, SPLIT, N]."""
    tl.store(ws_ptr + (r * SPLIT + tl.program_id(1)) * N + rn, tl.sum(acc, axis=0), mask=rn < N)


@triton.jit
def store_sum(out, r: tl.constexpr, rn, N, b_ptr, y_ptr, e0_ptr, e1_ptr, HAS_BIAS: tl.constexpr,
              EPI: tl.constexpr, E0: tl.constexpr, E1: tl.constexpr):
    """Row r of y from its fp32 sums: bias, epilogue, one store."""
    mask = rn < N
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=mask, other=0.0).to(tl.float32)
    out = apply_epilogue(out, r * N + rn, rn, mask, e0_ptr, e1_ptr, EPI, E0, E1)
    tl.store(y_ptr + r * N + rn, out.to(y_ptr.dtype.element_ty), mask=mask)


def kernel_source(rows: int, kind: int, has_zero: bool, m: int = 4) -> str:
    """The kernel for ``rows`` rows of x: one accumulator tile per row, unrolled. INT4 scales
    each row's chunk sums (and adds (8 - zero) * scale * the selected x's sum). 4:8 (``m=8``)
    also loads the positions' bit-2 words and turns them into merge selectors."""
    R = range(rows)
    vs = ", ".join(f"v{i}" for i in range(8))
    ss = ", ".join(f"s{i}" for i in range(8))
    ms = ", ".join(f"m{i}" for i in range(8))
    lines = [
        "import triton", "import triton.language as tl",
        "from presso.codegen.triton.nm_select import (chunk_codes, chunk_merges, chunk_selectors, finish_row, row_dot,",
        "                                             split_partial, store_sum)",
        "from presso.codegen.triton.splitk import split_sum",
        "", "",
        "@triton.jit",
        "def nm_select_kernel(x_ptr, xw_ptr, v_ptr, i_ptr, s_ptr, z_ptr, b_ptr, y_ptr, e0_ptr, e1_ptr, ws_ptr,",
        "                     cnt_ptr, N, N_PAD, K, stride_xm, QG: tl.constexpr, BLOCK_N: tl.constexpr,",
        "                     CPS: tl.constexpr, PTX: tl.constexpr, VBF: tl.constexpr, HAS_BIAS: tl.constexpr,",
        "                     EPI: tl.constexpr,",
        "                     E0: tl.constexpr, E1: tl.constexpr, SPLIT: tl.constexpr):",
        "    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)",
        "    steps = K // 32 // CPS",
        "    per = tl.cdiv(steps, SPLIT)          # this program's share of the steps (split-K)",
    ]
    lines += [f"    acc{i} = tl.zeros((CPS, BLOCK_N), dtype=tl.float32)" for i in R]
    lines += [
        "    for st in range(tl.program_id(1) * per, tl.minimum(tl.program_id(1) * per + per, steps)):",
        "        ch = st * CPS + tl.arange(0, CPS)",
        "        off = ch[:, None] * N_PAD + rn[None, :]",
        "        wi = tl.load(i_ptr + off, eviction_policy='evict_first')",
        f"        {ss} = chunk_selectors(wi, PTX)",
    ]
    if m == 8:
        lines += ["        wh = tl.load(i_ptr + K // 32 * N_PAD + off, eviction_policy='evict_first')",
                  f"        {ms} = chunk_merges(wh, PTX)"]
    else:
        lines += ["        wh = wi", f"        {ms} = {ss}"]
    if kind == F16:
        lines.append("        vb = v_ptr + 8 * ch[:, None] * N_PAD + rn[None, :]")
        lines += [f"        v{i} = tl.load(vb + {i} * N_PAD, eviction_policy='evict_first')" for i in range(8)]
    else:
        lines += ["        " + vs + " = chunk_codes(v_ptr, off, K // 32 * N_PAD, PTX)",
                  "        so = (ch[:, None] * 16 // QG) * N_PAD + rn[None, :]",
                  "        sc = tl.load(s_ptr + so).to(tl.float32)",
                  "        s8 = 8.0 * sc"]
        if has_zero:
            lines.append("        zs = (8.0 - tl.load(z_ptr + so).to(tl.float32)) * sc")
    for i in R:
        call = (f"row_dot({vs}, {ss}, {ms}, wi, wh, xw_ptr + {i} * (stride_xm // 4), x_ptr + {i} * stride_xm, ch, "
                f"PTX, VBF, M8={m == 8}, WITH_SUM=")
        if kind == F16:
            lines += [f"        d, _ = {call}False)", f"        acc{i} += d"]
        elif has_zero:
            lines += [f"        d, t = {call}True)", f"        acc{i} += d * s8 + t * zs"]
        else:
            lines += [f"        d, _ = {call}False)", f"        acc{i} += d * s8"]
    lines.append("    if SPLIT == 1:")
    lines += [f"        finish_row(acc{i}, {i}, rn, N, b_ptr, y_ptr, e0_ptr, e1_ptr, HAS_BIAS, EPI, E0, E1)" for i in R]
    lines.append("    else:             # partial sums out; the last program of this row block adds them")
    lines += [f"        split_partial(acc{i}, {i}, rn, N, ws_ptr, SPLIT)" for i in R]
    lines += ["        cnt = cnt_ptr + tl.program_id(0)",
              "        if tl.atomic_add(cnt, 1, sem='acq_rel') == SPLIT - 1:"]
    lines += [f"            store_sum(split_sum(ws_ptr + {i} * SPLIT * N + rn, N, rn < N, SPLIT), {i}, rn, N, b_ptr, "
              "y_ptr, e0_ptr, e1_ptr, HAS_BIAS, EPI, E0, E1)" for i in R]
    lines.append("            tl.store(cnt, 0)")
    return "\n".join(lines) + "\n"


def nm_select_linear(x: torch.Tensor, w: NMSelectWeight, bias: torch.Tensor | None = None, epilogue=None,
                     extras: tuple = (), block_n: int | None = None, cps: int | None = None,
                     num_warps: int | None = None, split: int | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) (-> epilogue) for a ``pack_nm_select`` weight: up to
    ``MAX_ROWS`` rows of x in one block of the select kernel (the rows share every weight load);
    more (prefill, compute-bound) through a dense fp16 workspace rebuilt per call (transposed,
    N x K x 2 bytes, freed after) and a dense matmul. Few row blocks (N small against the SMs)
    split K over up to ``split`` programs each (default: until two programs per SM; splitk.py)."""
    K, N = w.k, w.n
    if x.shape[-1] != K:
        raise ValueError(f"nm_select_linear: x {tuple(x.shape)} must be [..., {K}]")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M > MAX_ROWS:
        wt = w.dense_t()[:, :N].to(x2.dtype)
        y = torch.addmm(bias.to(x2.dtype), x2, wt) if bias is not None else x2 @ wt
        return run_epilogue(y, epilogue, extras).reshape(*x.shape[:-1], N)
    kernel = load_source(kernel_source(M, w.kind, w.zeros is not None, w.m), "nm_select_kernel")
    y, epi = output_buffer(x, M, N, epilogue, extras)
    e0, e1 = epi.pop("e0_ptr"), epi.pop("e1_ptr")
    chunks = K // 32
    ptx = PLAIN
    if not INTERPRET and x2.dtype == torch.float16 and not w.bf16:
        ptx = F16X2
    elif not INTERPRET and x2.dtype == torch.bfloat16 and (w.bf16 or w.kind == INT4):
        ptx = BF16_F32
    xw = x2.view(torch.int64) if ptx else x2                 # a group's four 16-bit x as one word
    sc = w.scales if w.scales is not None else w.values

    def launch(cfg):
        c = cfg["cps"]                  # a power of two dividing the chunks
        while chunks % c:
            c //= 2
        blocks, steps = triton.cdiv(N, cfg["block_n"]), chunks // c
        sp = min(cfg["split"], steps) if cfg["split"] else split_factor(blocks, steps, 2, x.device)
        ws = torch.empty(M * sp, N, dtype=torch.float32, device=x.device) if sp > 1 else y
        kernel[(blocks, sp)](
            x2, xw, w.values, w.index, sc, w.zeros if w.zeros is not None else sc,
            bias if bias is not None else x2, y, e0, e1, ws, zeroed_counters(blocks, x.device), N,
            w.values.shape[-1], K, x2.stride(0), QG=max(w.group, 1), BLOCK_N=cfg["block_n"], CPS=c, PTX=ptx,
            VBF=w.bf16, HAS_BIAS=bias is not None, SPLIT=sp, num_warps=cfg["warps"], **epi)
    # H100 sweeps at 4096 -> 14336 (RESULTS.md): few rows want long steps, 16 rows 4 rows per thread;
    # the selects that cost more ALU per weight (bf16's fp32 FMAs, 4:8's three prmt) shorter steps at 2-4
    table = _DEFAULTS_HEAVY if (w.m == 8 or x2.dtype == torch.bfloat16) else _DEFAULTS
    default = dict({"block_n": 32, "cps": 8, "warps": 4} if INTERPRET else table[min(table, key=lambda r: abs(r - M))],
                   split=None)
    if block_n or cps or num_warps or split:
        cfg = {"block_n": block_n or default["block_n"], "cps": cps or default["cps"],
               "warps": num_warps or default["warps"], "split": split}
    else:
        cfg = choose("nm_select", (M, N, K, w.kind, w.group, w.zeros is not None, x.dtype) + ((8,) if w.m == 8 else ()),
                     x.device,
                     lambda: [{"block_n": bn, "cps": c, "warps": nw, "split": sp} for bn in (32, 64, 128)
                              for c in (4, 8, 16) for nw in (4, 8) if bn * c >= 32 * nw for sp in (None, 1)],
                     launch, default)
    launch(cfg)
    return y.reshape(*x.shape[:-1], N)


_DEFAULTS = {1: {"block_n": 32, "cps": 16, "warps": 8}, 2: {"block_n": 32, "cps": 16, "warps": 4},
             4: {"block_n": 64, "cps": 16, "warps": 4}, 8: {"block_n": 64, "cps": 8, "warps": 8},
             16: {"block_n": 64, "cps": 8, "warps": 4}}
_DEFAULTS_HEAVY = {**_DEFAULTS, 2: {"block_n": 32, "cps": 8, "warps": 8}, 4: {"block_n": 64, "cps": 8, "warps": 8}}
