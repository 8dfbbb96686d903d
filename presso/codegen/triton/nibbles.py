"""How a word of int4 codes becomes numbers, for the kernels of ``int4.py``: the nibble layout of
a word (``nibble_shift``), the fp32 trick (a nibble moved into the mantissa of 1.0f), and the
fp16x2 inline-PTX paths (two codes -> the fp16 numbers 1024 + c by one ``lop3``), each with a
plain-Triton twin that the interpreter runs (it executes no PTX) with the same layout and the
same fp16 rounding points.
"""
import triton
import triton.language as tl

from ...config import triton_interpret

# jit code reads globals as constexprs, fixed when a kernel is first compiled: Triton decides per
# decorated kernel whether it is interpreted, so this is read once, at import, like Triton itself
INTERPRET_DOT = tl.constexpr(triton_interpret())


def nibble_shift(j: int) -> int:
    """Bit offset of k = 8w + j's code in word w: the pairs (0, 1), (2, 3), (4, 5), (6, 7) sit at
    bits (0, 16), (8, 24), (4, 20), (12, 28), i.e. under the masks 0x000F000F / 0x00F000F0 of the
    word or of the word shifted right by 8."""
    return (j % 2) * 16 + ((j // 2) % 2) * 8 + (j // 4) * 4


@triton.jit
def nibble_shifts():
    """``nibble_shift(j)`` for j = 0..7, as a tensor."""
    j = tl.arange(0, 8)
    return (j % 2) * 16 + ((j // 2) % 2) * 8 + (j // 4) * 4


@triton.jit
def one_plus_nibble(w, SHIFT: tl.constexpr):
    """The nibble at bits [SHIFT, SHIFT + 4) of w as the float 1 + nibble / 16: the nibble moved
    to mantissa bits 19..22 of 1.0f (bit pattern 0x3F800000)."""
    if SHIFT <= 19:
        t = w << (19 - SHIFT)
    else:
        t = w >> (SHIFT - 19)
    return ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


CODE_PAIRS_PTX = """
        lop3.b32 a, $W, 0x000F000F, 0x64006400, 0xea;
        lop3.b32 c, $W, 0x00F000F0, 0x64006400, 0xea;
        shr.u32 t, $W, 8;
        lop3.b32 b, t, 0x000F000F, 0x64006400, 0xea;
        lop3.b32 d, t, 0x00F000F0, 0x64006400, 0xea;
        mov.b32 m, 0x30003000;
        mov.b32 s, 0xD808D808;
        fma.rn.f16x2 a, a, m, s;
        fma.rn.f16x2 b, b, m, s;
        mov.b32 m, 0x20002000;
        mov.b32 s, 0xC880C880;
        fma.rn.f16x2 c, c, m, s;
        fma.rn.f16x2 d, d, m, s;"""
"""PTX: the code word $W's 8 nibbles -> four fp16x2 registers of exact (c - 8) / 8 (``lop3``
makes 1024 + c or 1024 + 16c, one FMA rescales): a holds the codes at bits (0, 16), c (4, 20),
b (8, 24), d (12, 28). Needs .b32 registers a, b, c, d, t, m, s."""


def pair_sum_ptx(out: str) -> str:
    """PTX: the two fp16 halves of register ``acc`` summed into the fp32 operand ``out`` (needs
    .b16 lo, hi and .f32 f0, f1)."""
    return f"""
        mov.b32 {{lo, hi}}, acc;
        cvt.f32.f16 f0, lo;
        cvt.f32.f16 f1, hi;
        add.f32 {out}, f0, f1;"""


def selector_ptx(shift: int, lo: str, hi: str) -> str:
    """PTX: prmt selectors for two groups from the 2 x 2 position bits at bits shift..shift+7 of
    $I (needs .b32 registers i, u, T): the four 2-bit fields spread to bytes (p0, p1 of each
    group), times 0x22 plus 0x10 per byte make each group's 16-bit selector (bytes 2p, 2p + 1 for
    each of its two kept values); ``lo`` gets the first group's, ``hi`` the second's."""
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


_DOT8_PTX = tl.constexpr("""{
        .reg .b32 a, b, c, d, t, m, s, acc;
        .reg .b16 lo, hi;
        .reg .f32 f0, f1;""" + CODE_PAIRS_PTX.replace("$W", "$1") + """
        mul.rn.f16x2 acc, a, $2;
        fma.rn.f16x2 acc, b, $3, acc;
        fma.rn.f16x2 acc, c, $4, acc;
        fma.rn.f16x2 acc, d, $5, acc;""" + pair_sum_ptx("$0") + """
        }""")


@triton.jit
def f16x2_dot8(w, x01, x23, x45, x67):
    """sum_j (c_j - 8) / 8 * x_j over the 8 codes of word w (layout in the module docstring), the
    x pairs as fp16x2 bit patterns, as fp32. The dequantized (c - 8) / 8 are exact in fp16; the
    products and their sum are fp16 (|sum| <= 8 max|x|), then fp32."""
    return tl.inline_asm_elementwise(asm=_DOT8_PTX, constraints="=r,r,r,r,r,r", args=[w, x01, x23, x45, x67],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def f16x2_dot8_emulated(w, x01, x23, x45, x67):
    """``f16x2_dot8`` in plain Triton for the interpreter (which runs no PTX): the same layout
    and the same fp16 rounding points (up to fused-multiply-add rounding)."""
    acc = tl.zeros(w.shape, dtype=tl.float16)
    for p in tl.static_range(4):
        xp = x01 if p == 0 else (x23 if p == 1 else (x45 if p == 2 else x67))
        for h in tl.static_range(2):
            c = (w >> (h * 16 + (p % 2) * 8 + (p // 2) * 4)) & 15
            xv = ((xp >> (16 * h)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            acc += ((c - 8).to(tl.float16) * 0.125) * xv
    return acc.to(tl.float32)


@triton.jit
def half2_bits(v):
    """An fp16 tensor as int32 bit patterns holding the value in both halves (an fp16x2 operand)."""
    b = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


@triton.jit
def f16x2_dequant_tile(wq, sc, off, BLOCK_N: tl.constexpr, G: tl.constexpr):
    """A [BLOCK_N, G/8] tile of code words -> the fp16 weights (c - off) * scale, [BLOCK_N, G], each
    rounded once from exact operands (bit-identical to the reference's dequantize): per word four
    mask-ors make the pairs 1024 + c / 1024 + 16c as fp16x2, one subtract or FMA makes c - off
    exactly, one fp16x2 multiply scales (inline PTX; the interpreter runs the same arithmetic in
    plain Triton)."""
    if INTERPRET_DOT:
        c = tl.reshape((wq[:, :, None] >> nibble_shifts()[None, None, :]) & 15, (BLOCK_N, G))
        return (c.to(tl.float32) - off[:, None]).to(tl.float16) * sc.to(tl.float16)[:, None]
    shape: tl.constexpr = wq.shape
    s2 = tl.broadcast_to(half2_bits(sc)[:, None], shape)
    zl = tl.broadcast_to(half2_bits(1024.0 + off)[:, None], shape)
    zh = tl.broadcast_to(half2_bits(-(64.0 + off))[:, None], shape)
    o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 a, b, c, d, t, m;
        lop3.b32 a, $8, 0x000F000F, 0x64006400, 0xea;
        lop3.b32 c, $8, 0x00F000F0, 0x64006400, 0xea;
        shr.u32 t, $8, 8;
        lop3.b32 b, t, 0x000F000F, 0x64006400, 0xea;
        lop3.b32 d, t, 0x00F000F0, 0x64006400, 0xea;
        sub.f16x2 a, a, $10;
        sub.f16x2 b, b, $10;
        mov.b32 m, 0x2C002C00;
        fma.rn.f16x2 c, c, m, $11;
        fma.rn.f16x2 d, d, m, $11;
        mul.rn.f16x2 a, a, $9;
        mul.rn.f16x2 b, b, $9;
        mul.rn.f16x2 c, c, $9;
        mul.rn.f16x2 d, d, $9;
        mov.b32 {$0, $1}, a;
        mov.b32 {$2, $3}, b;
        mov.b32 {$4, $5}, c;
        mov.b32 {$6, $7}, d;
        }""",
        constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r", args=[wq, s2, zl, zh],
        dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    # join's new axis is the last: leaves in bit-reversed order put k = 8w + j at position j
    w8 = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
    return tl.reshape(w8, (BLOCK_N, G))
