"""The ``llvm`` / ``aarch64`` targets' ops: linears whose weight TVM reads prepacked from params
(``codegen/tvm/linear.py``'s column tiles, int4 kept two per byte, N:M indices 4-bit; the AVX2
W8A7 kernel's own layout), and quantized lookups reading a tied head's tiles. They are written
into the graph by the targets' ``select_kernels`` pass (``codegen/tvm/select.py``); each op's
reference implementation is the composition it replaces. Any other node lowers through
``codegen/tvm/table.py``'s ``LOWER`` by its op.
"""
from __future__ import annotations

from .ops import (_gather_dequant_infer, _lin8_infer, _linear_flops, densify_nm, dequantize, gather_dequantize,
                  linear, linear_int8)
from .registry import Attr, defop


@defop("llvm.packed_linear", ["x", "weight", "bias?"], category="linear", flops=_linear_flops, implements="linear")
def packed_linear(x, weight, bias):
    """linear with a param weight, prepacked into column tiles at build and load."""
    return linear(x, weight, bias)


@defop("llvm.quant_linear", ["x", "q", "scales", "zeros?", "bias?"],
       {"bits": Attr("int", choices=(4, 8)), "group_size": Attr("int"), "dtype": Attr("dtype", "f32")}, "linear",
       flops=_linear_flops, implements="linear")
def quant_linear(x, q, scales, zeros, bias, bits, group_size, dtype):
    """linear(x, dequantize(q, scales, zeros), bias): the codes prepacked as column tiles, decoded
    one tile per parallel column block."""
    return linear(x, dequantize(q, scales, zeros, bits, group_size, dtype), bias)


@defop("llvm.nm_linear", ["x", "values", "index", "bias?"], {"n": Attr("int"), "m": Attr("int")}, "linear",
       flops=_linear_flops, implements="linear")
def nm_linear(x, values, index, bias, n, m):
    """linear(x, densify_nm(values, index), bias): kept values and 4-bit positions prepacked."""
    return linear(x, densify_nm(values, index, n, m), bias)


def _int8_flops(ins, outs, attrs, b):
    return 2 * outs[0].numel(b) * ins[0].concrete_shape(b)[-1]


@defop("llvm.int8_linear", ["xq", "x_scale", "wq", "w_scale", "bias?"], {}, "linear", infer=_lin8_infer,
       flops=_int8_flops, implements="linear_int8")
def int8_linear(xq, x_scale, wq, w_scale, bias):
    """linear_int8 (W8A8) with the int8 weight prepacked into column tiles, int32 accumulation."""
    return linear_int8(xq, x_scale, wq, w_scale, bias)


@defop("llvm.w8a7_avx2_linear", ["xq", "x_scale", "wq", "w_scale", "bias?"], {}, "linear", infer=_lin8_infer,
       flops=_int8_flops, implements="linear_int8")
def w8a7_avx2_linear(xq, x_scale, wq, w_scale, bias):
    """linear_int8 of 7-bit activation codes on an x86 host with AVX2: int8_avx2.py's u8 x s8
    kernel (codes + 64 as u8, exact), the weight prepacked [N/8, K/4, 8x4] with column sums."""
    return linear_int8(xq, x_scale, wq, w_scale, bias)


@defop("llvm.tied_gather_dequant", ["index", "q", "scales", "zeros?"],
       {"bits": Attr("int", choices=(4, 8)), "group_size": Attr("int"), "dtype": Attr("dtype", "f32")},
       "compressed", infer=_gather_dequant_infer, implements="gather_dequantize")
def tied_gather_dequant(index, q, scales, zeros, bits, group_size, dtype):
    """gather_dequantize of a table an ``llvm.quant_linear`` also reads (a tied LM head): rows are
    looked up in that linear's column tiles, so the table is held once."""
    return gather_dequantize(index, q, scales, zeros, bits, group_size, dtype)
