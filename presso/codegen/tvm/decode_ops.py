"""TVM lowerings of the decode program's own ops (``passes/decode.py``): ``cache_update`` writes a
step's keys / values into the preallocated cache *in place* (``call_tir_inplace``: the buffer the
caller passed is the buffer it gets back, so a decode step copies no cache), and
``attention_cached`` attends over the whole cache buffer with the slots past each query's
position, and before its sequence's start, masked out (the reference slices the cache to the
newest position instead; masked slots weigh exactly zero, so both agree).
"""
from __future__ import annotations

import math

from ...errors import CodegenError
from .attention import attention_probs_times_v, attention_scores
from .table import TVM_DTYPE, lowers


def cache_update_name(rank: int, axis: int, dtype: str) -> str:
    return f"presso_cache_update_r{rank}_a{axis}_{dtype}"


def cache_update_func(rank: int, axis: int, dtype: str):
    """cache[..., positions[i], ...] = new[..., i, ...] along ``axis``, in place; every dim is
    symbolic, so one kernel serves the prefill (a symbolic sequence) and the step (one token)."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(cache_update_name(rank, axis, dtype))
            # opaque (8): Relax's FuseOps must not fuse an in-place write with its producer
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
            dims = [tirx.Var(f"d{i}", "int64") for i in range(rank)]
            seq = tirx.Var("seq", "int64")
            new_dims = dims[:axis] + [seq] + dims[axis + 1:]
            cache = T.match_buffer(T.arg("cache", T.handle()), dims, dtype)
            new = T.match_buffer(T.arg("new", T.handle()), new_dims, dtype)
            pos = T.match_buffer(T.arg("positions", T.handle()), (seq,), "int64")
            with T.sblock("root"):
                idx = []
                frames = [T.parallel(0, new_dims[0])] + [T.serial(0, d) for d in new_dims[1:]]
                _nest(frames, idx, lambda: T.buffer_store(
                    cache, tirx.BufferLoad(new, idx), idx[:axis] + [tirx.BufferLoad(pos, [idx[axis]])] + idx[axis + 1:]))
    return ib.get()


def _nest(frames, idx, body):
    """Open the loop frames one inside the other, collecting their variables in ``idx``."""
    if not frames:
        body()
        return
    with frames[0] as v:
        idx.append(v)
        _nest(frames[1:], idx, body)


@lowers("cache_update")
def _cache_update(L, n, ins):
    cache = n.inputs[0]
    rank, axis = cache.type.rank, n.attrs["axis"] % cache.type.rank
    dt = TVM_DTYPE[cache.type.dtype]
    new = ins[1] if n.inputs[1].type.dtype == cache.type.dtype else L.emit(L.rx.op.astype(ins[1], dt))
    kernel = L.kernel(cache_update_name(rank, axis, dt), lambda: cache_update_func(rank, axis, dt))
    return L.emit(L.rx.call_tir_inplace(kernel, L.rx.Tuple([ins[0], new, ins[2]]), [0],
                                        L.rx.TensorType(L.shape(cache.type), dt)))


@lowers("attention_cached")
def _attention_cached(L, n, ins):
    q = n.inputs[0]
    starts = n.inputs[4] if len(n.inputs) > 4 else None
    if starts is not None and q.type.rank != 4:
        raise CodegenError(f"node '{n.name}': attention_cached with per-sequence starts needs q as "
                           f"[batch, heads, seq, dim], got {q.type}")
    s, vv = attention_scores(L, n, ins[0], ins[1], ins[2])
    s = L.emit_te(_cache_mask, s, ins[3], *([ins[4]] if starts is not None else []), name="cache_mask")
    return attention_probs_times_v(L, s, vv, n.inputs[0].type.rank)


def _cache_mask(s, positions, starts=None):
    """-inf where cache slot j is past query i's position, or before its sequence's first slot."""
    from tvm import te, tirx
    ninf = tirx.const(-math.inf, s.dtype)

    def at(*i):
        j, p = i[-1], positions[i[-2]]
        ok = j <= p
        if starts is not None:
            ok = tirx.And(ok, j >= tirx.min(starts[i[0]], p))
        return tirx.Select(ok, s[i], ninf)
    return te.compute(s.shape, at, name="cache_mask")


@lowers("kv_quantize")
def _kv_quantize(L, n, ins):
    bits, group = n.attrs["bits"], n.attrs["group_size"]
    return L.emit_te(lambda x: kv_quantize_te(x, bits, group), ins[0], name=f"kv_quantize{bits}")


@lowers("kv_dequantize")
def _kv_dequantize(L, n, ins):
    a = n.attrs
    dt = TVM_DTYPE[n.output.type.dtype]
    return L.emit_te(lambda p: kv_dequantize_te(p, a["bits"], a["group_size"], a["width"], dt), ins[0],
                     name=f"kv_dequantize{a['bits']}")


def kv_quantize_te(x, bits: int, group: int):
    """The u8 rows of ``kv_quantize`` (codes, two per byte at 4 bits with the even index in the low
    nibble, then each group's f16 scale as two little-endian bytes), rounding half to even as
    torch does."""
    from tvm import te, tirx
    lead, width = list(x.shape[:-1]), int(x.shape[-1])
    qmax = 2 ** (bits - 1) - 1
    nc = width * bits // 8
    k = te.reduce_axis((0, group), "k")
    amax = te.compute(lead + [width // group], lambda *i: te.max(tirx.abs(x[(*i[:-1], i[-1] * group + k)]).astype(
        "float32"), axis=k), name="kv_amax")
    scale = te.compute(amax.shape, lambda *i: tirx.max(amax[i] / tirx.const(qmax + 0.5, "float32"),
                                                       tirx.const(1e-8, "float32")).astype("float16"), name="kv_scale")

    def code(i, j):      # the signed code of value j, as an int32
        q = tirx.nearbyint(x[(*i, j)].astype("float32") / scale[(*i, j // group)].astype("float32"))
        return tirx.max(tirx.min(q, tirx.const(qmax, "float32")), tirx.const(-qmax - 1, "float32")).astype("int32")

    def byte(*idx):
        i, b = idx[:-1], idx[-1]
        if bits == 8:
            c = code(i, b) & 255
        else:
            c = (code(i, 2 * b) & 15) | ((code(i, 2 * b + 1) & 15) << 4)
        sb = b - nc
        half = tirx.reinterpret("uint16", scale[(*i, sb // 2)]).astype("int32")
        s = (half >> ((sb % 2) * 8)) & 255
        return tirx.Select(b < nc, c, s).astype("uint8")
    return te.compute(lead + [nc + 2 * (width // group)], byte, name="kv_quantize")


def kv_dequantize_te(p, bits: int, group: int, width: int, dtype: str):
    """``kv_dequantize``: each code times its group's f16 scale."""
    from tvm import te, tirx
    lead = list(p.shape[:-1])
    nc = width * bits // 8

    def value(*idx):
        i, j = idx[:-1], idx[-1]
        if bits == 8:
            c = ((p[(*i, j)].astype("int32") ^ 128) - 128)
        else:
            nib = (p[(*i, j // 2)].astype("int32") >> ((j % 2) * 4)) & 15
            c = (nib ^ 8) - 8
        g = nc + 2 * (j // group)
        half = (p[(*i, g)].astype("int32") | (p[(*i, g + 1)].astype("int32") << 8)).astype("uint16")
        s = tirx.reinterpret("float16", half).astype("float32")
        return (c.astype("float32") * s).astype(dtype)
    return te.compute(lead + [width], value, name="kv_dequantize")
