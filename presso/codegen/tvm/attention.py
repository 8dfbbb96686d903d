"""TVM lowerings of attention: the scores q k^T (GQA key / value heads repeated to the query
heads, their shape stated so that later ``emit_te`` calls see it with symbolic dims too), masks,
and a softmax written as three reductions."""
from __future__ import annotations

import math

from ...ir.types import DType
from .table import TVM_DTYPE, lowers


def emit_softmax(L, x, axis):
    def f(x):
        from tvm import te, topi
        last = len(x.shape) - 1
        if axis != last:
            return topi.nn.softmax(x, axis)
        k1 = te.reduce_axis((0, x.shape[last]), "k1")
        k2 = te.reduce_axis((0, x.shape[last]), "k2")
        mx = te.compute(x.shape[:last], lambda *i: te.max(x[(*i, k1)], axis=k1), name="softmax_max")
        e = topi.fast_exp(te.compute(x.shape, lambda *i: x[i] - mx[i[:last]], name="softmax_shift"))
        sm = te.compute(x.shape[:last], lambda *i: te.sum(e[(*i, k2)], axis=k2), name="softmax_sum")
        return te.compute(x.shape, lambda *i: e[i] / sm[i[:last]], name="softmax_norm")
    return L.emit_te(f, x, name="softmax")


@lowers("attention")
def _attention(L, n, ins):
    s, vv = attention_scores(L, n, ins[0], ins[1], ins[2])
    mask = n.inputs[3]
    if n.attrs["causal"]:
        s = L.emit_te(_causal_mask, s, name="causal_mask")
    if mask is not None:
        dt = TVM_DTYPE[n.inputs[0].type.dtype]
        if mask.type.dtype == DType.bool:
            s = L.emit(L.rx.op.where(ins[3], s, L.rx.const(-math.inf, dt)))
        else:
            s = L.emit(L.rx.op.add(s, L.cast(ins[3], mask, dt)))
    return attention_probs_times_v(L, s, vv, n.inputs[0].type.rank)


def attention_scores(L, n, q_in, k_in, v_in):
    """The scaled (and soft-capped) scores q k^T of an attention node, and its values, the key and
    value heads repeated to the query heads (GQA) with their shape stated, so that later
    ``emit_te`` calls see it with symbolic dims too."""
    rx = L.rx
    q, k, v = n.inputs[:3]
    rank = q.type.rank
    hq, hk = q.type.shape[-3], k.type.shape[-3]
    dt = TVM_DTYPE[q.type.dtype]
    kk, vv = k_in, v_in
    if hq != hk:
        kk, vv = (L.bb.match_cast(L.emit(rx.op.repeat(e, hq // hk, axis=rank - 3)),
                                  rx.TensorType(L.shape(t.type)[:rank - 3] + [hq] + L.shape(t.type)[rank - 2:], dt))
                  for e, t in ((k_in, k), (v_in, v)))
    scale = n.attrs["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(q.type.shape[-1])
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    s = L.emit(rx.op.matmul(q_in, L.emit(rx.op.permute_dims(kk, perm))))
    s = L.emit(rx.op.multiply(s, rx.const(scale, dt)))
    cap = n.attrs["softcap"]
    if cap is not None:
        s = L.emit(rx.op.multiply(L.emit(rx.op.tanh(L.emit(rx.op.divide(s, rx.const(cap, dt))))), rx.const(cap, dt)))
    return s, vv


def attention_probs_times_v(L, s, vv, rank):
    """softmax over the last axis of the (masked) scores, times the values."""
    p = emit_softmax(L, s, rank - 1)
    return L.emit(L.rx.op.matmul(p, vv))


def _causal_mask(s):
    from tvm import te, tirx
    ninf = tirx.const(-math.inf, s.dtype)
    return te.compute(s.shape, lambda *i: tirx.Select(i[-1] <= i[-2], s[i], ninf), name="causal_mask")
