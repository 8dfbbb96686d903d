"""Blockwise Hadamard rotation on the CPU as a fast Walsh-Hadamard transform, optionally fused
with the per-token quantization that reads it (``quantize{rotate=hadamard,activations=...}``).

Lowered as a dense matmul by the block's matrix the rotation costs ``2 * block`` flops per element
(for MiniLM's FFN input, block 512, more than the linear it protects); the butterfly form costs
``log2(block)`` adds per element. One kernel per call (built with TVM's IRBuilder, so the
butterfly network is unrolled in Python), row chunks in parallel, each row in a stack buffer:

1. the row is loaded 8 lanes at a time, scaled by ``1/sqrt(block)`` (the normalized matrix), and
   the three butterfly stages of span 1, 2, 4 run inside each 8-lane vector as a lane shuffle
   plus a multiply-add by a +-1 sign vector;
2. the stages of span 8 .. block/2 run as radix-8 (or smaller) passes: 8 vectors loaded into
   registers, three butterfly stages on them, stored back (with step 1, measured 0.38 -> 0.25 ms
   per 1024 x 384 call on the 2-core Zen 3 against a version doing the in-vector stages as an
   8 x 8 broadcast-FMA product and the others one stage per memory pass);
3. with ``quant``: the row's |x| max, the scale and the codes (the rotated row never goes to
   memory; the codes are written as u8 = code + 64 when the AVX2 W8A7 kernel reads them).

Blocks smaller than 8 keep the matmul lowering. Rounding follows the reference (division by the
scale, round half to even), so codes differ from the reference only where the butterflies' float
rounding moves a value across a rounding boundary.
"""
from __future__ import annotations

import numpy as np

LANES = 8
CHUNKS = 64        # parallel row chunks; each allocates its row buffer once


def fits(block: int, dim: int, dtype: str) -> bool:
    return dtype == "float32" and block >= LANES and block % LANES == 0 and dim % block == 0


def prim_func(dim: int, block: int, quant: tuple | None = None):
    """rotate: X [m, dim] f32 -> Y [m, dim] f32. With ``quant=(qmax, as_u8)``: X -> codes [m, dim]
    (i8, or u8 = code + 64) and scales [m] f32, as ``quantize_per_token`` of the rotated rows."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    V = LANES
    f32 = lambda v: tirx.FloatImm("float32", v)  # noqa: E731
    bc = lambda v: tirx.Broadcast(f32(v) if isinstance(v, float) else v, V)  # noqa: E731
    ramp = lambda base: tirx.Ramp(base, 1, V)  # noqa: E731

    def load(buf, *idx):
        return tirx.BufferLoad(buf, list(idx[:-1]) + [ramp(idx[-1])])

    def store(buf, value, *idx):
        T.buffer_store(buf, value, list(idx[:-1]) + [ramp(idx[-1])])

    def within8(v):
        """Butterfly stages of span 1, 2, 4 inside one 8-lane vector: v * sign + swapped(v)."""
        for span in (1, 2, 4):
            swap = [i ^ span for i in range(V)]
            sign = tirx.Shuffle([bc(1.0), bc(-1.0)], [V if i & span else 0 for i in range(V)])
            v = T.bind(v * sign + tirx.Shuffle([v], swap))
        return v

    def across(vs):
        """Full butterfly network over a list of 2^k vectors (bound once per stage)."""
        span = 1
        while span < len(vs):
            vs = [T.bind(vs[i] + vs[i ^ span]) if not i & span else T.bind(vs[i ^ span] - vs[i])
                  for i in range(len(vs))]
            span *= 2
        return vs

    nvec = dim // V
    stages = (block // V).bit_length() - 1          # butterfly stages across vectors
    passes, u = [], 1
    while stages:
        k = min(3, stages)
        passes.append((u, k))
        u, stages = u << k, stages - k
    inv = float(1.0 / np.sqrt(block))

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("presso_hadamard")
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            m = tirx.Var("m", "int64")
            X = T.match_buffer(T.arg("x", T.handle()), (m, dim), "float32")
            if quant is None:
                Y = T.match_buffer(T.arg("y", T.handle()), (m, dim), "float32")
            else:
                qmax, as_u8 = quant
                out = "uint8" if as_u8 else "int8"
                C = T.match_buffer(T.arg("codes", T.handle()), (m, dim), out)
                S = T.match_buffer(T.arg("scales", T.handle()), (m,), "float32")
            with T.sblock("root"):     # Relax's pattern analysis expects a root block
                per = (m + CHUNKS - 1) // CHUNKS
                with T.parallel(0, CHUNKS) as t:
                    buf = T.alloc_buffer((dim,), "float32", scope="local")
                    with T.serial(tirx.min(t * per, m), tirx.min((t + 1) * per, m)) as r:
                        with T.serial(0, nvec) as i:
                            store(buf, within8(T.bind(load(X, r, i * V) * bc(inv))), i * V)
                        for u, k in passes:
                            radix = 1 << k
                            with T.serial(0, nvec // radix) as g:
                                base = T.bind((g // u) * (radix * u) + g % u)
                                vs = across([T.bind(load(buf, (base + j * u) * V)) for j in range(radix)])
                                for j, v in enumerate(vs):
                                    store(buf, v, (base + j * u) * V)
                        if quant is None:
                            with T.serial(0, nvec) as i:
                                store(Y, load(buf, i * V), r, i * V)
                        else:
                            mx = T.alloc_buffer((V,), "float32", scope="local")
                            store(mx, bc(0.0), 0)
                            with T.serial(0, nvec) as i:
                                v = T.bind(load(buf, i * V))
                                store(mx, tirx.Max(load(mx, 0), tirx.Max(v, -v)), 0)
                            amax = f32(1e-8)
                            for lane in range(V):
                                amax = tirx.Max(amax, tirx.BufferLoad(mx, [lane]))
                            scale = T.bind(amax / f32(qmax))
                            T.buffer_store(S, scale, [r])
                            with T.serial(0, nvec) as i:
                                c = tirx.Max(tirx.Min(tirx.nearbyint(load(buf, i * V) / bc(scale)), bc(qmax)), bc(-qmax))
                                store(C, tirx.Cast(f"{out}x{V}", c + bc(64.0 if as_u8 else 0.0)), r, i * V)
    return ib.get()
