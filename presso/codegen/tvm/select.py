"""Kernel selection for the TVM targets (``llvm``, ``aarch64``): patterns rewriting linears whose
weight is a param (dense, ``dequantize``-d or ``densify_nm``-ed) and W8A8 linears into the
prepacked-weight ops of ``ir/llvm_ops.py``, and a quantized lookup whose table a fused head also
reads into the lookup of that head's tiles. ``lower.py`` lowers the ops it finds; what TVM fuses
on its own (epilogues, the Hadamard rotation into its quantizer) stays a lowering decision.

The AVX2 W8A7 kernel is chosen for the machine being compiled for (its TVM target ``spec``).
Selecting again is a no-op.
"""
from __future__ import annotations

from ...ir.analysis import packed_weight_producer
from ...ir.graph import Graph, Node
from ...ir.types import DType
from ...passes.rewrite import Rewriter, apply_patterns, pattern_table
from . import int8_avx2

DENSE_WEIGHT_DTYPES = (DType.f32, DType.f16, DType.f64)


def _packed_linear(rw: Rewriter, n: Node) -> bool:
    x, w, b = n.inputs
    if w.kind == "param":
        if w.type.dtype not in DENSE_WEIGHT_DTYPES:
            return False
        rw.retarget(n, "llvm.packed_linear", [x, w, b])
        return True
    p = packed_weight_producer(w, rw.users)
    if p is None:
        return False
    if p.op == "dequantize":
        rw.retarget(n, "llvm.quant_linear", [x, *p.inputs, b], **p.attrs)
    else:
        rw.retarget(n, "llvm.nm_linear", [x, *p.inputs, b], **p.attrs)
    return True


def _seven_bit_codes(n: Node) -> bool:
    p = n.inputs[0].node
    return p is not None and p.op == "quantize_per_token" and p.attrs["bits"] == 7


def _int8_linear(spec: dict):
    def pattern(rw: Rewriter, n: Node) -> bool:
        w = n.inputs[2]
        if w.kind != "param" or w.type.dtype != DType.i8:
            return False
        rows, cols = w.type.shape
        avx2 = _seven_bit_codes(n) and int8_avx2.fits(spec, cols, rows)
        rw.retarget(n, "llvm.w8a7_avx2_linear" if avx2 else "llvm.int8_linear", n.inputs)
        return True
    return pattern


def _tied_lookup(rw: Rewriter, n: Node) -> bool:
    """A lookup in a table (codes, scales, zeros) that an ``llvm.quant_linear`` of the same bits
    and group size reads (a tied LM head) reads that linear's column tiles."""
    a = n.attrs
    for u in rw.users.get(n.inputs[1], []):
        if (u.op == "llvm.quant_linear" and u.inputs[1:4] == n.inputs[1:4] and u.attrs["bits"] == a["bits"]
                and u.attrs["group_size"] == a["group_size"]):
            rw.retarget(n, "llvm.tied_gather_dequant", n.inputs, **a)
            return True
    return False


def select_kernels(g: Graph, spec: dict | None = None) -> Graph:
    """Rewrite ``g`` in place into the TVM targets' ops for the machine ``spec`` (a TVM target dict)."""
    apply_patterns(g, pattern_table(("linear", _packed_linear), ("linear_int8", _int8_linear(spec or {}))))
    apply_patterns(g, pattern_table(("gather_dequantize", _tied_lookup)))
    return g
