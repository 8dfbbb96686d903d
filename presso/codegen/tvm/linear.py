"""Linear layers on the CPU as TVM tensor expressions that read weights in their compressed form.

Every weight kind (dense, int8/int4 group-wise, N:M sparse) is first *prepacked* into column
tiles: a ``[rows, cols]`` matrix becomes ``[rows / NJ, cols, NJ]`` so that NJ output channels
sit next to each other in memory and the inner loop is one vector load. The packing is a layout
change only: int4 codes stay two per byte, N:M indices stay 4-bit, int8 stays int8.

The kernel is two stages: ``presso_wtile`` rebuilds one tile of dense weights from the packed
storage (dequantize, or scatter the N:M values), and ``presso_matmul`` consumes it. The schedule
(``schedule.py``) computes a tile per parallel column block, so each weight byte is decoded once
per call however many rows (tokens) the input has.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...ir.ops import unpack_int4

TILE_WIDTHS = (32, 16, 8, 4, 2, 1)


def tile_width(rows: int) -> int:
    """The widest column tile that divides the weight's output dim (wider = longer vectors)."""
    return next(w for w in TILE_WIDTHS if rows % w == 0)


def tile(a: torch.Tensor, nj: int) -> np.ndarray:
    """[rows, ...] -> [rows / nj, ..., nj]: nj consecutive rows become the innermost axis."""
    rows = a.shape[0]
    t = a.reshape(rows // nj, nj, *a.shape[1:]).movedim(1, -1).contiguous()
    return t.numpy()


def repack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte along the last dim (low nibble first), as ``pack_int4``."""
    u = u.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


@dataclass
class WeightSpec:
    """How one linear's weight is stored and decoded. ``arrays`` are the prepacked runtime params
    (name suffix -> numpy array), in the order the kernel takes them."""
    kind: str                  # dense | quant | nm
    rows: int                  # output features (N)
    cols: int                  # input features (K)
    nj: int
    dtype: str = "float32"     # the dense weight's dtype
    bits: int = 0
    group_size: int = 0
    signed: bool = True
    n: int = 0
    m: int = 0
    packed_index: bool = False
    arrays: dict = field(default_factory=dict)


def prepack_dense(w: torch.Tensor) -> WeightSpec:
    rows, cols = w.shape
    nj = tile_width(rows)
    return WeightSpec("dense", rows, cols, nj, dtype=_np_dtype(w.dtype), arrays={"w": tile(w, nj)})


def prepack_quant(q: torch.Tensor, scales: torch.Tensor, zeros, bits: int, group_size: int, signed: bool,
                  out_dtype: str) -> WeightSpec:
    """``q``: [rows, cols] int8/uint8 or [rows, cols/2] packed int4 (as the graph stores it)."""
    rows = q.shape[0]
    cols = q.shape[1] * (2 if bits == 4 else 1)
    nj = tile_width(rows)
    arrays = {"q": tile(q, nj), "scales": tile(scales, nj)}
    if zeros is not None:
        arrays["zeros"] = tile(zeros, nj)
    return WeightSpec("quant", rows, cols, nj, dtype=out_dtype, bits=bits, group_size=group_size, signed=signed,
                      arrays=arrays)


def prepack_nm(values: torch.Tensor, index: torch.Tensor, n: int, m: int) -> WeightSpec:
    """``values`` [rows, kept]; ``index`` each kept value's slot in its group of m, u8 or packed u4."""
    rows, kept = values.shape
    if index.shape[-1] * 2 == kept:
        index = unpack_int4(index, signed=False)
    nj = tile_width(rows)
    packed = kept % 2 == 0
    idx = repack_nibbles(index) if packed else index.to(torch.uint8)
    return WeightSpec("nm", rows, kept // n * m, nj, dtype=_np_dtype(values.dtype), n=n, m=m, packed_index=packed,
                      arrays={"values": tile(values, nj), "index": tile(idx, nj)})


def _np_dtype(dt: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64", torch.int8: "int8"}[dt]


def nibble(byte, i):
    """Field ``i % 2`` (0 = low nibble) of a byte, as the packed int4 codes and indices store them."""
    from tvm import tirx
    return (byte >> ((i % 2) * 4).astype("uint8")) & tirx.const(15, "uint8")


def dequant_value(q_at, s_at, z_at, k, bits: int, signed: bool, group_size: int, dtype: str):
    """Dense weight of column ``k`` from group-wise codes; ``q_at(c)`` reads stored column ``c``
    (a byte of two codes for int4), ``s_at``/``z_at`` read group ``g`` (``z_at`` None: symmetric)."""
    from tvm import tirx
    if bits == 8:
        code = q_at(k).astype("float32")
    else:
        nib = nibble(q_at(k // 2), k)
        code = (nib ^ tirx.const(8, "uint8")).astype("float32") - 8.0 if signed else nib.astype("float32")
    if z_at is not None:
        code = code - z_at(k // group_size).astype("float32")
    return (code * s_at(k // group_size).astype("float32")).astype(dtype)


def densify_value(v_at, idx_at, k, n: int, m: int, packed_index: bool, dtype: str):
    """Dense weight of column ``k`` under N:M sparsity: the kept value whose in-group slot is
    ``k % m``, else 0; ``v_at(t)``/``idx_at(t)`` read kept entry ``t`` (a byte of two for 4-bit)."""
    from tvm import tirx
    g, r = k // m, (k % m).astype("uint8")
    out = tirx.const(0, dtype)
    for t in range(n):
        kt = g * n + t
        slot = nibble(idx_at(kt // 2), kt) if packed_index else idx_at(kt)
        out = tirx.Select(slot == r, v_at(kt), out)
    return out


def weight_tile(te, spec: WeightSpec, params: dict):
    """The ``presso_wtile`` stage: dense [rows/NJ, cols, NJ] weights from the packed params."""
    shape = (spec.rows // spec.nj, spec.cols, spec.nj)
    if spec.kind == "quant":
        q, s, z = params["q"], params["scales"], params.get("zeros")

        def deq(jo, k, ji):
            return dequant_value(lambda c: q[jo, c, ji], lambda g: s[jo, g, ji],
                                 None if z is None else (lambda g: z[jo, g, ji]), k, spec.bits, spec.signed,
                                 spec.group_size, spec.dtype)

        return te.compute(shape, deq, name="presso_wtile")
    if spec.kind == "nm":
        vals, idx = params["values"], params["index"]

        def densify(jo, k, ji):
            return densify_value(lambda t: vals[jo, t, ji], lambda t: idx[jo, t, ji], k, spec.n, spec.m,
                                 spec.packed_index, spec.dtype)

        return te.compute(shape, densify, name="presso_wtile")
    raise ValueError(spec.kind)


def packed_linear(te, x, spec: WeightSpec, params: dict, epilogue=None, out_dtype="float32", acc="float32"):
    """y[..., j] = epilogue(sum_k x[..., k] * W[j, k], (...), j), reading the packed weight;
    ``acc`` is the accumulator dtype (int32 for int8 x int8). ``x`` keeps its leading dims so
    elementwise consumers of the result fuse into the kernel's epilogue."""
    lead = list(x.shape[:-1])
    k = te.reduce_axis((0, spec.cols), name="k")
    nj = spec.nj
    W = params["w"] if spec.kind == "dense" else weight_tile(te, spec, params)

    def dot(*idx):
        *i, j = idx
        return te.sum(x[(*i, k)].astype(acc) * W[j // nj, k, j % nj].astype(acc), axis=k)

    y = te.compute(lead + [spec.rows], dot, name="presso_matmul")
    if epilogue is None and out_dtype == acc:
        return y
    epi = epilogue or (lambda v, i, j: v)
    return te.compute(lead + [spec.rows], lambda *idx: epi(y[idx], idx[:-1], idx[-1]).astype(out_dtype),
                      name="presso_epilogue")
