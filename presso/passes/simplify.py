"""Algebraic and layout simplifications that make different spellings of one computation look
the same (so recognition patterns and frontends agree): no-op casts/reshapes/transposes/slices,
composed layout chains, empty concat operands dropped, ``reciprocal(sqrt)`` -> ``rsqrt``, ``x*sigmoid(x)`` -> ``silu``, and
one-element constants made 0-d."""
from __future__ import annotations

import itertools

import torch

from ..ir.graph import Node
from ..ir.types import eval_dim
from .rewrite import Rewriter, pattern_table

ELEMENTWISE_BINARY = ("add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
                      "where", "logical_and", "logical_or")
MAX_LAYOUT_PROBE = 1 << 24


def noop_cast(rw: Rewriter, n: Node) -> bool:
    return n.inputs[0].type.dtype == n.output.type.dtype and rw.replace(n, n.inputs[0])


def noop_layout(rw: Rewriter, n: Node) -> bool:
    """reshape/expand to the same shape, identity transpose, full-range slice, 1-way concat."""
    x = n.inputs[0]
    if n.op == "transpose" and n.attrs["perm"] != list(range(x.type.rank)):
        return False
    if n.op == "slice" and not (n.attrs["start"] == 0 and n.attrs["step"] == 1
                                and _covers(n.attrs["end"], x.type.shape[n.attrs["axis"]])):
        return False
    if n.op == "concat" and len(n.inputs) != 1:
        return False
    return x.type == n.output.type and rw.replace(n, x)


def concat_without_empty(rw: Rewriter, n: Node) -> bool:
    """concat drops operands with no elements: torch.cat's legacy empty 1-D tensor, which joins
    tensors of any rank (HF's empty ``DynamicCache`` layers), and zero-length pieces along the axis."""
    axis = n.attrs["axis"]
    keep = [x for x in n.inputs
            if not (x.type.shape == (0,) and x.type.rank != n.output.type.rank)
            and not (x.type.rank == n.output.type.rank and x.type.shape[axis] == 0)]
    if len(keep) == len(n.inputs) or not keep:
        return False
    if len(keep) == 1:
        return keep[0].type == n.output.type and rw.replace(n, keep[0])
    return rw.replace(n, rw.op("concat", *keep, axis=axis, before=n))


def _covers(end, dim) -> bool:
    """True when slicing up to ``end`` keeps all of a dim of size ``dim``."""
    if end == dim:
        return True
    return isinstance(end, int) and (end >= 2 ** 62 or (isinstance(dim, int) and end >= dim))


def canonical_reshape(rw: Rewriter, n: Node) -> bool:
    """reshape(reshape(x)) -> reshape(x); the shape attribute spelled as the result type."""
    want = list(n.output.type.shape)
    if n.attrs["shape"] != want:
        n.attrs["shape"] = want
    inner = rw.producer(n.inputs[0], "reshape")
    if inner is not None:
        return rw.replace(n, rw.op("reshape", inner.inputs[0], shape=want, before=n))
    return False


def compose_transpose(rw: Rewriter, n: Node) -> bool:
    inner = rw.producer(n.inputs[0], "transpose")
    if inner is None:
        return False
    perm = [inner.attrs["perm"][p] for p in n.attrs["perm"]]
    return rw.replace(n, rw.op("transpose", inner.inputs[0], perm=perm, before=n))


def probe_bindings(*types) -> list[dict]:
    """Sizes to try symbolic dims at: two different small values per symbol (one probe when static)."""
    syms = sorted(set().union(*(t.symbols for t in types)))
    if not syms:
        return [{}]
    return [dict.fromkeys(syms, 2), {s: 3 + i for i, s in enumerate(syms)}]


def _chain_probe(chain, x, b):
    idx = torch.arange(x.type.numel(b)).reshape(x.type.concrete_shape(b))
    r = idx
    for c in reversed(chain):
        r = r.reshape([eval_dim(d, b) for d in c.attrs["shape"]]) if c.op == "reshape" else r.permute(c.attrs["perm"])
    return idx, r


def fold_layout_chain(rw: Rewriter, n: Node) -> bool:
    """A chain of reshapes/transposes that is equivalent to one reshape, one transpose, or (for
    chains of three or more) one reshape followed by one transpose, becomes that, e.g. ONNX's
    reshape->transpose->reshape spelling of ``k.transpose(-1, -2)``. Equivalence is checked
    exactly by pushing an index tensor through the chain (at two sizes of each symbolic dim)."""
    chain = [n]
    while True:
        p = rw.producer(chain[-1].inputs[0], "reshape", "transpose")
        if p is None or not rw.single_use(p.output):
            break
        chain.append(p)
    if len(chain) < 2:
        return False
    x = chain[-1].inputs[0]
    out_shape = list(n.output.type.shape)
    probes = [_chain_probe(chain, x, b) for b in probe_bindings(x.type, n.output.type)]
    if any(idx.numel() > MAX_LAYOUT_PROBE for idx, _ in probes):
        return False
    if all(torch.equal(r.reshape(-1), idx.reshape(-1)) for idx, r in probes):
        return rw.replace(n, rw.op("reshape", x, shape=out_shape, before=n))
    rank = len(out_shape)
    if rank > 6:
        return False
    perms = list(itertools.permutations(range(rank)))
    if rank == x.type.rank:
        for perm in perms:
            if all(idx.dim() == r.dim() and tuple(idx.shape[p] for p in perm) == tuple(r.shape)
                   and torch.equal(idx.permute(perm), r) for idx, r in probes):
                return rw.replace(n, rw.op("transpose", x, perm=list(perm), before=n))
    if len(chain) >= 3:
        for perm in perms:
            src = [0] * rank
            for j, p in enumerate(perm):
                src[p] = out_shape[j]
            if all(torch.equal(idx.reshape([r.shape[perm.index(i)] for i in range(rank)]).permute(perm), r)
                   for idx, r in probes):
                mid = rw.op("reshape", x, shape=src, before=n)
                return rw.replace(n, rw.op("transpose", mid, perm=list(perm), before=n))
    return False


def rsqrt(rw: Rewriter, n: Node) -> bool:
    s = rw.producer(n.inputs[0], "sqrt")
    return s is not None and rw.replace(n, rw.op("rsqrt", s.inputs[0], before=n))


def silu(rw: Rewriter, n: Node) -> bool:
    for a, b in rw.commuted(n):
        s = rw.producer(b, "sigmoid")
        if s is not None and s.inputs[0] is a:
            return rw.replace(n, rw.op("silu", a, before=n))
    return False


def scalar_operands(rw: Rewriter, n: Node) -> bool:
    """A ``full`` of shape [1]/[1,1] feeding an elementwise op whose result keeps its shape becomes 0-d
    (only beside an operand of its dtype: a 0-d operand no longer takes part in type promotion)."""
    changed = False
    for i, v in enumerate(n.inputs):
        f = rw.producer(v, "full")
        if f is None or not v.type.shape or any(d != 1 for d in v.type.shape):
            continue
        others = [u for j, u in enumerate(n.inputs) if j != i and u is not None]
        if not any(u.type.rank >= v.type.rank and u.type.dtype == v.type.dtype for u in others):
            continue
        n.inputs[i] = rw.op("full", value=f.attrs["value"], dtype=f.attrs["dtype"], before=n)
        changed = True
    return changed


def split_to_slices(rw: Rewriter, n: Node) -> bool:
    """split -> one slice per piece (frontends spell unbind/chunk either way; slices are one form)."""
    start, axis = 0, n.attrs["axis"]
    for out, size in zip(n.outputs, n.attrs["sizes"]):
        rw.g.replace_uses(out, rw.op("slice", n.inputs[0], axis=axis, start=start, end=start + size, before=n))
        start += size
    rw.changed()
    return True


def gather_scalar_index(rw: Rewriter, n: Node) -> bool:
    """gather(x, i) with a constant 0-d index i -> reshape(slice(x, i, i+1)) (torch's select)."""
    x, index = n.inputs
    i = rw.scalar(index)
    if index.type.rank != 0 or i is None:
        return False
    i, axis = int(i), n.attrs["axis"]
    dim = x.type.shape[axis]
    if i < 0:
        if not isinstance(dim, int):
            return False
        i += dim
    sl = rw.op("slice", x, axis=axis, start=i, end=i + 1, before=n)
    return rw.replace(n, rw.op("reshape", sl, shape=list(n.output.type.shape), before=n))


PATTERNS = pattern_table(
    ("split", split_to_slices), ("gather", gather_scalar_index),
    ("cast", noop_cast),
    *[(op, noop_layout) for op in ("reshape", "expand", "transpose", "slice", "concat")],
    ("concat", concat_without_empty),
    ("reshape", canonical_reshape), ("reshape", fold_layout_chain),
    ("transpose", compose_transpose), ("transpose", fold_layout_chain),
    ("reciprocal", rsqrt), ("mul", silu),
    *[(op, scalar_operands) for op in ELEMENTWISE_BINARY],
)
