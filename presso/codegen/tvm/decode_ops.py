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


def cache_update_func(rank: int, axis: int, dtype: str):
    """cache[..., positions[i], ...] = new[..., i, ...] along ``axis``, in place; every dim is
    symbolic, so one kernel serves the prefill (a symbolic sequence) and the step (one token)."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(f"presso_cache_update_r{rank}_a{axis}_{dtype}")
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
    kernel = L.kernel(f"presso_cache_update_r{rank}_a{axis}_{dt}", lambda: cache_update_func(rank, axis, dt))
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
