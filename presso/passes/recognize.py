"""Recognition of high-level ops, so later passes match on meaning rather than on one frontend's
spelling: ``linear`` (matmul by a constant + bias add, reshape-wrapped addmm), ``rms_norm`` and
``layer_norm`` (decomposed forms + affine), ``attention`` (matmul -> scale -> mask -> softmax ->
matmul, scale possibly split between q and k; tanh soft-capped scores; causal masks read from
constants; repeat_kv folded into GQA) and ``rotary`` (x*cos + rotate_half(x)*sin)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..ir.graph import Node, Value
from ..ir.types import DType, dims_product, eval_dim
from .rewrite import Rewriter, pattern_table


# ---- linear -------------------------------------------------------------------------------
def matmul_to_linear(rw: Rewriter, n: Node) -> bool:
    """matmul(x, W) with a constant 2-D W -> linear(x, W^T) (weights stored out x in)."""
    x, w = n.inputs
    data = rw.const(w)
    if data is None or w.type.rank != 2 or x.type.rank < 1:
        return False
    if rw.single_use(w):  # transpose the storage in place and keep the param's name
        name = w.name
        rw.g.remove_param(name)
        wt = rw.g.add_param(name, data.t().contiguous())
        rw.changed()
    else:
        wt = rw.new_param(w.name + ".T", data.t())
    return rw.replace(n, rw.op("linear", x, wt, None, before=n))


def linear_bias(rw: Rewriter, n: Node) -> bool:
    """add(linear(x, W), b) with b a constant of shape [out] -> linear(x, W, b)."""
    for a, b in rw.commuted(n):
        lin = rw.producer(a, "linear")
        if lin is None or lin.inputs[2] is not None or not rw.single_use(a):
            continue
        data = rw.const(b)
        out = lin.inputs[1].type.shape[0]
        if data is None or not b.type.shape or list(b.type.shape) != [1] * (b.type.rank - 1) + [out] \
                or b.type.rank > a.type.rank:
            continue
        bias = b if b.type.rank == 1 else rw.new_param(b.name + ".flat", data.reshape(out))
        return rw.replace(n, rw.op("linear", lin.inputs[0], lin.inputs[1], bias, before=n))
    return False


def unwrap_linear(rw: Rewriter, n: Node) -> bool:
    """reshape(x -> [M, C]) -> linear -> reshape(-> [*lead, N]) with prod(lead) == M is
    linear(reshape(x -> [*lead, C])): linear maps the last dim, so keep the leading dims."""
    users = rw.users.get(n.output, [])
    r1 = rw.producer(n.inputs[0], "reshape")
    if r1 is None or len(users) != 1 or users[0].op != "reshape" or not rw.single_use(n.output) \
            or r1.output.type.rank != 2:
        return False
    x, r2 = r1.inputs[0], users[0]
    lead = list(r2.output.type.shape[:-1])
    if not lead or r2.output.type.shape[-1] != n.output.type.shape[-1] \
            or dims_product(lead) != dims_product([r1.output.type.shape[0]]):
        return False
    c = r1.output.type.shape[1]
    if list(x.type.shape) != lead + [c]:
        x = rw.op("reshape", x, shape=lead + [c], before=r2)
    rw.g.replace_uses(r2.output, rw.op("linear", x, n.inputs[1], n.inputs[2], before=r2))
    rw.changed()
    return True


# ---- norms --------------------------------------------------------------------------------
def _mean_of_square(rw: Rewriter, v: Value) -> Optional[tuple[Value, int]]:
    """v = reduce_mean(x*x or pow(x, 2), last k axes, keepdim) -> (x, k)."""
    m = rw.producer(v, "reduce_mean")
    if m is None or not m.attrs["keepdim"]:
        return None
    x2 = m.inputs[0]
    p = rw.producer(x2, "pow", "mul")
    if p is None:
        return None
    if p.op == "pow" and rw.scalar(p.inputs[1]) == 2.0:
        x = p.inputs[0]
    elif p.op == "mul" and p.inputs[0] is p.inputs[1]:
        x = p.inputs[0]
    else:
        return None
    k = len(m.attrs["axes"])
    if sorted(m.attrs["axes"]) != list(range(x.type.rank - k, x.type.rank)):
        return None
    return x, k


def _inv_std(rw: Rewriter, v: Value, mul: bool) -> Optional[tuple[Value, int, float]]:
    """rsqrt(ms + eps) (for mul) or sqrt(ms + eps) (for div) -> (x, k, eps)."""
    r = rw.producer(v, "rsqrt" if mul else "sqrt")
    if r is None:
        return None
    add = rw.producer(r.inputs[0], "add")
    if add is None:
        return None
    for a, b in rw.commuted(add):
        eps = rw.scalar(b)
        ms = _mean_of_square(rw, a) if eps is not None else None
        if ms is not None:
            return ms[0], ms[1], eps
    return None


def _normalized(rw: Rewriter, n: Node):
    """Yield (x, inv-std match) for ``x * rsqrt(...)`` and ``x / sqrt(...)``."""
    if n.op == "div":
        yield n.inputs[0], _inv_std(rw, n.inputs[1], mul=False)
    else:
        for a, b in rw.commuted(n):
            yield a, _inv_std(rw, b, mul=True)


def norm_core(rw: Rewriter, n: Node) -> bool:
    """x * rsqrt(mean(x^2) + eps) -> rms_norm; the same over d = x - mean(x) -> layer_norm."""
    for x, m in _normalized(rw, n):
        if m is None or m[0] is not x:
            continue
        _, k, eps = m
        sub = rw.producer(x, "sub")
        mean = rw.producer(sub.inputs[1], "reduce_mean") if sub else None
        src = sub.inputs[0] if sub else None
        if mean is not None and mean.inputs[0] is src and mean.attrs["keepdim"] \
                and sorted(mean.attrs["axes"]) == list(range(src.type.rank - k, src.type.rank)):
            return rw.replace(n, rw.op("layer_norm", src, None, None, eps=eps, ndim=k, before=n))
        return rw.replace(n, rw.op("rms_norm", x, None, eps=eps, ndim=k, before=n))
    return False


def norm_in_float32(rw: Rewriter, n: Node) -> bool:
    """cast_T(rms_norm(cast_f32(x))) -> rms_norm(x), x of a 16-bit float dtype T: Llama's spelling
    (statistics in fp32, the result rounded back to the input dtype) is what ``rms_norm`` computes
    on a T input, bit for bit; the weight multiply after it (in T) then folds in (``norm_affine``).
    A compiled decode step was paying two extra launches per norm for the casts."""
    norm = rw.producer(n.inputs[0], "rms_norm")
    widen = rw.producer(norm.inputs[0], "cast") if norm is not None else None
    if widen is None or norm.inputs[1] is not None or not rw.single_use(n.inputs[0]):
        return False
    x = widen.inputs[0]
    dtype = x.type.dtype
    if dtype not in (DType.f16, DType.bf16) or norm.output.type.dtype != DType.f32 or n.output.type.dtype != dtype:
        return False
    return rw.replace(n, rw.op("rms_norm", x, None, before=n, **norm.attrs))


def norm_affine(rw: Rewriter, n: Node) -> bool:
    """mul(norm(x), w) -> norm(x, w); add(layer_norm(x, w), b) -> layer_norm(x, w, b)."""
    for a, b in rw.commuted(n):
        norm = rw.producer(a, "rms_norm", "layer_norm")
        if norm is None or not rw.single_use(a) or rw.const(b) is None:
            continue
        k = norm.attrs["ndim"]
        if list(b.type.shape) != list(a.type.shape[-k:]):
            continue
        x = norm.inputs[0]
        if n.op == "mul" and norm.inputs[1] is None and (norm.op == "rms_norm" or norm.inputs[2] is None):
            extra = [None] if norm.op == "layer_norm" else []
            return rw.replace(n, rw.op(norm.op, x, b, *extra, before=n, **norm.attrs))
        if n.op == "add" and norm.op == "layer_norm" and norm.inputs[2] is None:
            w = norm.inputs[1]
            if w is None:
                w = rw.new_param(b.name + ".ones", torch.ones_like(rw.const(b)))
            return rw.replace(n, rw.op("layer_norm", x, w, b, before=n, **norm.attrs))
    return False


# ---- attention ----------------------------------------------------------------------------
def _strip_scale(rw: Rewriter, v: Value) -> tuple[Value, float]:
    """v = x * c or x / c with a scalar c -> (x, factor); else (v, 1)."""
    node = rw.producer(v, "mul", "div")
    if node is None or not rw.single_use(v):
        return v, 1.0
    if node.op == "div":
        c = rw.scalar(node.inputs[1])
        return (node.inputs[0], 1.0 / c) if c else (v, 1.0)
    for a, b in rw.commuted(node):
        c = rw.scalar(b)
        if c is not None and b.type.rank <= a.type.rank and b.type.numel() == 1:
            return a, c
    return v, 1.0


def is_causal_mask(mask: torch.Tensor, L: int, S: int) -> bool:
    """Additive mask that is 0 on and below the diagonal and very negative above (top-left)."""
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (L, S) or not mask.is_floating_point():
        return False
    keep = torch.ones(L, S, dtype=torch.bool).tril()
    m = mask.reshape(-1, L, S)
    return bool((m[:, keep] == 0).all() and (m[:, ~keep] <= -1e4).all())


def attention(rw: Rewriter, n: Node) -> bool:
    probs, v = n.inputs
    sm = rw.producer(probs, "softmax")
    if sm is None or not rw.single_use(probs) or sm.attrs["axis"] != probs.type.rank - 1 or probs.type.rank < 3:
        return False
    scores, mask = sm.inputs[0], None
    add = rw.producer(scores, "add")
    if add is not None and rw.single_use(scores):
        for a, b in rw.commuted(add):
            if rw.producer(a, "mul", "div", "matmul") is not None and b.type.rank <= a.type.rank:
                scores, mask = a, b
                break
    where = rw.producer(scores, "where")
    causal_table = False
    if mask is None and where is not None and rw.single_use(scores):
        # where(keep, s, very_negative) with a constant keep mask == s + (0 | -inf)
        keep, fill = rw.const(where.inputs[0]), rw.scalar(where.inputs[2])
        if keep is not None and keep.dtype == torch.bool and fill is not None and fill <= -1e4:
            scores = where.inputs[1]
            mask = rw.new_param(where.inputs[0].name + ".additive",
                                torch.zeros(keep.shape).masked_fill(~keep, float("-inf")))
        elif fill is not None and fill <= -1e4 and _top_left_of_tril(rw, where.inputs[0]):
            scores, causal_table = where.inputs[1], True  # a symbolic-length slice of a causal table
    scores, softcap = _strip_softcap(rw, scores)
    scores, s0 = _strip_scale(rw, scores)
    mm = rw.producer(scores, "matmul")
    if mm is None or not rw.single_use(scores):
        return False
    q, s1 = _strip_scale(rw, mm.inputs[0])
    kt, s2 = _strip_scale(rw, mm.inputs[1])
    tr = rw.producer(kt, "transpose")
    r = kt.type.rank
    if tr is None or not rw.single_use(kt):
        return False
    perm = tr.attrs["perm"][:-2] + [tr.attrs["perm"][-1], tr.attrs["perm"][-2]]
    k = tr.inputs[0]  # kt = transpose(k') and k = k' permuted by perm (kt with its last two dims swapped)
    if perm != list(range(r)):
        k = rw.op("transpose", k, perm=perm, before=n)
    if not (q.type.rank == k.type.rank == v.type.rank) or k.type.shape[-2] != v.type.shape[-2]:
        return False
    if q.type.shape[:-3] != k.type.shape[:-3]:
        return False
    scale = s0 * s1 * s2
    d = q.type.shape[-1]
    if isinstance(d, int) and math.isclose(scale, 1.0 / math.sqrt(d), rel_tol=1e-6):
        scale = None
    causal = causal_table
    if mask is not None:
        data = rw.const(mask)
        L, S = q.type.shape[-2], k.type.shape[-2]
        if data is not None and isinstance(L, int) and isinstance(S, int) and is_causal_mask(data, L, S):
            mask, causal = None, True
        elif data is None and _top_left_of_additive_causal(rw, mask):
            mask, causal = None, True
    out = rw.op("attention", q, k, v, mask, causal=causal, scale=scale, softcap=softcap, before=n)
    return rw.replace(n, out)


def _strip_softcap(rw: Rewriter, v: Value) -> tuple[Value, Optional[float]]:
    """v = tanh(x / c) * c (or tanh(x * (1/c)) * c) with a scalar c > 0, Gemma 2's soft-capped
    scores -> (x, c); else (v, None)."""
    outer = rw.producer(v, "mul")
    if outer is None or not rw.single_use(v):
        return v, None
    for t, c in rw.commuted(outer):
        cap = rw.scalar(c)
        th = rw.producer(t, "tanh")
        if cap is None or not cap > 0 or th is None or not rw.single_use(t) or c.type.numel() != 1:
            continue
        x, factor = _strip_scale(rw, th.inputs[0])
        if x is not th.inputs[0] and math.isclose(factor * cap, 1.0, rel_tol=1e-6):
            return x, cap
    return v, None


def _top_left_of_tril(rw: Rewriter, v: Value) -> bool:
    """v = slices [0:a] of the last two dims of a constant lower-triangular bool table (GPT-2's
    ``bias[:, :, :T, :T]``): a causal mask for any length."""
    table = _sliced_table(rw, v)
    if table is None or table.dtype != torch.bool or table.dim() < 2 or table.shape[-1] != table.shape[-2]:
        return False
    n = table.shape[-1]
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    return bool((table.reshape(-1, n, n) == tril).all())


def _top_left_of_additive_causal(rw: Rewriter, v: Value) -> bool:
    """v = slices [0:a] of the last two dims of a constant square additive causal table (0 on and
    below the diagonal, very negative above): a causal mask for any length."""
    table = _sliced_table(rw, v)
    return table is not None and table.dim() >= 2 and table.shape[-1] == table.shape[-2] \
        and is_causal_mask(table, table.shape[-2], table.shape[-1])


def _sliced_table(rw: Rewriter, v: Value) -> Optional[torch.Tensor]:
    """The constant under a chain of slices [0:a] (unit step) of v, else None (the callers check
    that every matrix of the table is the same causal one, so any such slice of it is too)."""
    while True:
        s = rw.producer(v, "slice")
        if s is None:
            break
        if s.attrs["start"] != 0 or s.attrs["step"] != 1:
            return None
        v = s.inputs[0]
    return rw.const(v)


def _repeat_kv_source(rw: Rewriter, v: Value, before: Node) -> Optional[tuple[Value, int]]:
    """v = reshape(expand(x5)) repeating each head n times (HF ``repeat_kv``), where x5 is the
    [.., Hkv, 1, S, D] view of k -> (k as [.., Hkv, S, D], n). Checked exactly with an index probe
    (for symbolic dims, at two different sizes of each symbol)."""
    r2 = rw.producer(v, "reshape")
    e = rw.producer(r2.inputs[0], "expand") if r2 else None
    if e is None:
        return None
    x5 = e.inputs[0]
    shape5 = list(x5.type.shape)
    if len(shape5) != v.type.rank + 1 or shape5[-3] != 1:
        return None
    src_shape = shape5[:-3] + shape5[-2:]
    hk, hq = src_shape[-3], v.type.shape[-3]
    if not isinstance(hk, int) or not isinstance(hq, int) or hq % hk or hq == hk:
        return None
    syms = sorted(x5.type.symbols | v.type.symbols)
    for sizes in ((2,) * len(syms), tuple(range(3, 3 + len(syms)))) if syms else ((),):
        b = dict(zip(syms, sizes))
        src = [eval_dim(d, b) for d in src_shape]
        idx = torch.arange(math.prod(src)).reshape(src)
        try:
            probe = idx.reshape([eval_dim(d, b) for d in shape5]).expand([eval_dim(d, b) for d in e.attrs["shape"]]) \
                .reshape([eval_dim(d, b) for d in r2.attrs["shape"]])
        except RuntimeError:
            return None
        if not torch.equal(probe, idx.repeat_interleave(hq // hk, dim=-3)):
            return None
    r1 = rw.producer(x5, "reshape")
    if r1 is not None and list(r1.inputs[0].type.shape) == src_shape:
        return r1.inputs[0], hq // hk
    return rw.op("reshape", x5, shape=src_shape, before=before), hq // hk


def fold_repeat_kv(rw: Rewriter, n: Node) -> bool:
    """attention(q, repeat_kv(k), repeat_kv(v)) -> attention(q, k, v): GQA made explicit."""
    q, k, v, mask = n.inputs
    ks = _repeat_kv_source(rw, k, n)
    vs = _repeat_kv_source(rw, v, n) if ks else None
    if ks is None or vs is None or ks[1] != vs[1]:
        return False
    return rw.replace(n, rw.op("attention", q, ks[0], vs[0], mask, before=n, **n.attrs))


# ---- rotary -------------------------------------------------------------------------------
def _rotate_half_of(rw: Rewriter, v: Value) -> Optional[Value]:
    """v = concat(neg(x[..., h:]), x[..., :h]) on the last axis -> x."""
    cat = rw.producer(v, "concat")
    if cat is None or len(cat.inputs) != 2 or cat.attrs["axis"] != v.type.rank - 1:
        return None
    neg = rw.producer(cat.inputs[0], "neg")
    hi = rw.producer(neg.inputs[0], "slice") if neg else None
    lo = rw.producer(cat.inputs[1], "slice")
    if hi is None or lo is None or hi.inputs[0] is not lo.inputs[0]:
        return None
    x = lo.inputs[0]
    d = x.type.shape[-1]
    if not isinstance(d, int) or d % 2:
        return None
    h, last = d // 2, x.type.rank - 1
    ok_lo = lo.attrs["axis"] == last and lo.attrs["start"] == 0 and lo.attrs["end"] == h and lo.attrs["step"] == 1
    ok_hi = hi.attrs["axis"] == last and hi.attrs["start"] == h and hi.attrs["step"] == 1 and \
        (hi.attrs["end"] == d or (isinstance(hi.attrs["end"], int) and hi.attrs["end"] >= d))
    return x if ok_lo and ok_hi else None


def rotary(rw: Rewriter, n: Node) -> bool:
    for a, b in rw.commuted(n):
        m1, m2 = rw.producer(a, "mul"), rw.producer(b, "mul")
        if m1 is None or m2 is None:
            continue
        for x, cos in rw.commuted(m1):
            for rot, sin in rw.commuted(m2):
                if _rotate_half_of(rw, rot) is x and x.type.rank >= cos.type.rank and x.type.rank >= sin.type.rank:
                    out = rw.op("rotary", x, cos, sin, before=n)
                    if out.type == n.output.type:
                        return rw.replace(n, out)
    return False


PATTERNS = pattern_table(
    ("matmul", matmul_to_linear), ("add", linear_bias), ("linear", unwrap_linear),
    ("mul", norm_core), ("div", norm_core), ("cast", norm_in_float32),
    ("mul", norm_affine), ("add", norm_affine),
    ("matmul", attention), ("attention", fold_repeat_kv),
    ("add", rotary),
)
