"""Embedding lookups in quantized tables (``gather_dequantize``): each looked-up row is read in
its packed form and dequantized in registers, so a lookup moves rows x cols codes, never the
dense table.

Two storage layouts: the graph's (int8 [V, D], or int4 two per byte [V, D/2], group-wise fp16
scales [V, ceil(D/G)] and optional u8 zero points), and for int4 with group sizes 32..256 the tiled
layout of ``int4.py`` (``Int4Weight``), which the int4 linear kernels read. A table tied to an
LM head is prepared into the tiled layout once and both the lookup and the head's GEMV read it:
one copy on the device.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .int4 import Int4Weight

BLOCK_D = 128


@triton.jit
def _gather_dequant_kernel(ids_ptr, q_ptr, s_ptr, z_ptr, y_ptr, V, D, G, stride_q, stride_s,
                           BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = rd < D
    row = tl.load(ids_ptr + t).to(tl.int64)
    tl.device_assert((row >= 0) & (row < V), "gather_dequantize: index out of range")
    if BITS == 8:
        code = tl.load(q_ptr + row * stride_q + rd, mask=m, other=0).to(tl.float32)
    else:
        byte = tl.load(q_ptr + row * stride_q + rd // 2, mask=m, other=0).to(tl.int32)
        nib = (byte >> ((rd % 2) * 4)) & 0xF
        if SIGNED:
            nib = (nib ^ 8) - 8
        code = nib.to(tl.float32)
    g = rd // G
    s = tl.load(s_ptr + row * stride_s + g, mask=m, other=0.0).to(tl.float32)
    if HAS_ZERO:
        code = code - tl.load(z_ptr + row * stride_s + g, mask=m, other=0).to(tl.float32)
    tl.store(y_ptr + t * D + rd, (code * s).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gather_dequant_tiled_kernel(ids_ptr, q_ptr, s_ptr, z_ptr, y_ptr, V, D, NG, TILE: tl.constexpr,
                                 G: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK: tl.constexpr):
    """Rows of an ``Int4Weight``: row r's group g is the span q[r // TILE, g, r % TILE, :G/8];
    column k of it sits in word k // 8 at bit ``nibble_shift(k % 8)``, unsigned (offset 8 or the
    zero point)."""
    t = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = rd < D
    row = tl.load(ids_ptr + t).to(tl.int64)
    tl.device_assert((row >= 0) & (row < V), "gather_dequantize: index out of range")
    g = rd // G
    k = rd % G
    span = ((row // TILE) * NG + g) * TILE + row % TILE                              # [BLOCK] (row, group)
    word = tl.load(q_ptr + span * (G // 8) + k // 8, mask=m, other=0)
    j = k % 8
    code = ((word >> ((j % 2) * 16 + ((j // 2) % 2) * 8 + (j // 4) * 4)) & 0xF).to(tl.float32)
    s = tl.load(s_ptr + span, mask=m, other=0.0).to(tl.float32)
    if HAS_ZERO:
        off = tl.load(z_ptr + span, mask=m, other=0).to(tl.float32)
    else:
        off = 8.0
    tl.store(y_ptr + t * D + rd, ((code - off) * s).to(y_ptr.dtype.element_ty), mask=m)


def _launch_shape(ids: torch.Tensor, d: int):
    flat = ids.reshape(-1).contiguous()
    return flat, (flat.numel(), triton.cdiv(d, BLOCK_D))


def gather_dequant(ids: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                   bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of the table dequantize(q, scales, zeros) in the graph's layout -> ids.shape + [D]."""
    V = q.shape[0]
    D = q.shape[1] * (2 if bits == 4 else 1)
    if scales.shape != (V, -(-D // group_size)):       # (the last group may be shorter)
        raise ValueError(f"gather_dequant: q {tuple(q.shape)} ({bits}-bit), scales {tuple(scales.shape)} and "
                         f"group_size {group_size} do not fit together")
    flat, grid = _launch_shape(ids, D)
    y = torch.empty(flat.numel(), D, dtype=dtype, device=q.device)
    if flat.numel():
        _gather_dequant_kernel[grid](flat, q, scales, zeros if zeros is not None else scales, y, V, D, group_size,
                                     q.stride(0), scales.stride(0), BITS=bits,
                                     SIGNED=zeros is None,
                                     HAS_ZERO=zeros is not None, BLOCK=BLOCK_D)
    return y.reshape(*ids.shape, D)


def gather_dequant_tiled(ids: torch.Tensor, w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of an int4 table in the tiled layout (``int4.pack_int4``) -> ids.shape + [K]."""
    flat, grid = _launch_shape(ids, w.k)
    y = torch.empty(flat.numel(), w.k, dtype=dtype, device=w.q.device)
    if flat.numel():
        _gather_dequant_tiled_kernel[grid](flat, w.q, w.scales, w.zeros if w.zeros is not None else w.scales, y,
                                           w.n, w.k, w.k // w.group_size, TILE=w.q.shape[2], G=w.group_size,
                                           HAS_ZERO=w.zeros is not None, BLOCK=BLOCK_D)
    return y.reshape(*ids.shape, w.k)
