"""ONNX layout, indexing and sequence ops.

Indices in ONNX may be negative (counted from the end); torch's indexing ops reject them, so every
index operand goes through ``_wrap`` (``i < 0 ? i + dim : i``). Sequences exist only at import:
a ``Seq`` is the Python list of the values it holds, so the sequence ops must see import-time
positions (or, for SequenceAt, elements of one type to select among at run time).
"""
from __future__ import annotations

import torch

from ..errors import FrontendError
from ..ir.graph import Value
from ..ir.types import dims_product
from .onnx_table import Seq, SymShape, _dtype, handles


def _wrap(im, idx: Value, dim) -> Value:
    """Negative indices counted from the end of a dim of size ``dim``."""
    if idx.node is not None and idx.node.op == "full":
        v = idx.node.attrs["value"]
        return idx if v >= 0 else im.op("full", value=float(v + dim), shape=list(idx.type.shape),
                                        dtype=idx.type.dtype.value)
    n = im.like(dim, idx) if isinstance(dim, int) else None
    if n is None:
        raise FrontendError(f"{im.where}: negative indices into symbolic dim '{dim}' are not supported")
    return im.op("where", im.op("lt", idx, im.like(0, idx)), im.op("add", idx, n), idx)


def _const_index(im, i):
    """A constant index input with negatives already wrapped, as a tensor, or None."""
    v = im.env[im.node.input[i]]
    return v if isinstance(v, torch.Tensor) else None


@handles("Flatten")
def _flatten(im):
    """[d0..d(a-1)] x [da..] -> 2-D; ``axis`` ranges over [-rank, rank] (rank gives (numel, 1))."""
    x = im.t(0)
    r = x.type.rank
    a = im.attr("axis", 1)
    if not -r <= a <= r:
        raise FrontendError(f"{im.where}: attribute 'axis' = {a} is out of range for rank {r} (allowed: {-r}..{r})")
    a = a + r if a < 0 else a
    s = list(x.type.shape)
    return im.op("reshape", x, shape=[dims_product(s[:a]) if a else 1, dims_product(s[a:]) if a < r else 1])


@handles("Tile")
def _tile(im):
    x = im.t(0)
    return im.aten("repeat", x, repeats=im.ints(1, "Tile's repeats"))


@handles("Gather")
def _gather(im):
    v = im.env[im.node.input[0]]
    if isinstance(v, SymShape):
        idx = im.c(1, "Gather index into a shape")
        picked = [v[int(i)] for i in idx.reshape(-1).tolist()]
        return SymShape(picked) if idx.dim() else (picked[0] if isinstance(picked[0], int) else SymShape(picked))
    x = im.t(0)
    axis = im.axis(im.attr("axis", 0), x.type.rank)
    idx = _const_index(im, 1)
    if idx is not None and bool((idx < 0).any()):
        im.env[im.node.input[1]] = torch.where(idx < 0, idx + x.type.shape[axis], idx)
        return im.op("gather", x, im.t(1), axis=axis)
    if x.name in im.g.params:   # a lookup table (nn.Embedding): its ids are never negative, and one
        return im.op("gather", x, im.t(1), axis=axis)   # that were would fail in index_select, not silently
    return im.op("gather", x, _wrap(im, im.t(1), x.type.shape[axis]), axis=axis)


@handles("GatherElements")
def _gather_elements(im):
    x, idx = im.t(0), im.t(1)
    axis = im.axis(im.attr("axis", 0), x.type.rank)
    return im.aten("gather", x, _wrap(im, idx, x.type.shape[axis]), dim=axis)


_REDUCE = {"none": None, "add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@handles("ScatterElements", "Scatter")
def _scatter_elements(im):
    x, idx, upd = im.t(0), im.t(1), im.t(2)
    axis = im.axis(im.attr("axis", 0), x.type.rank)
    idx = _wrap(im, idx, x.type.shape[axis])
    red = im.attr("reduction", b"none").decode()
    if red not in _REDUCE:
        raise FrontendError(f"{im.where}: reduction '{red}' is not one of {', '.join(_REDUCE)}")
    if _REDUCE[red] is None:
        return im.aten("scatter.src", x, idx, upd, dim=axis)
    return im.aten("scatter_reduce.two", x, idx, upd, dim=axis, reduce=_REDUCE[red], include_self=True)


def _nd_index(im, x, idx, batch_dims):
    """Split GatherND/ScatterND's [..., k] index into per-dim index tensors (batch dims as aranges)."""
    k = idx.type.shape[-1]
    if not isinstance(k, int):
        raise FrontendError(f"{im.where}: the last dim of the indices must be static, got {idx.type}")
    lead = list(idx.type.shape[:-1])
    cols = []
    for b in range(batch_dims):
        n = x.type.shape[b]
        if not isinstance(n, int):
            raise FrontendError(f"{im.where}: batch dim {b} must be static, got {x.type}")
        shape = [1] * len(lead)
        shape[b] = n
        cols.append(im.b.const("batch_index", torch.arange(n, dtype=torch.int64).reshape(shape)))
    for j in range(k):
        col = im.op("reshape", im.op("slice", idx, axis=idx.type.rank - 1, start=j, end=j + 1, step=1), shape=lead)
        if col.type.dtype.value != "i64":
            col = im.op("cast", col, dtype="i64")
        cols.append(_wrap(im, col, x.type.shape[batch_dims + j]))
    return cols


@handles("GatherND")
def _gather_nd(im):
    x, idx = im.t(0), im.t(1)
    return im.aten("index.Tensor", x, *_nd_index(im, x, idx, im.attr("batch_dims", 0)))


@handles("ScatterND")
def _scatter_nd(im):
    x, idx, upd = im.t(0), im.t(1), im.t(2)
    red = im.attr("reduction", b"none").decode()
    if red not in ("none", "add"):
        im.unsupported(f"ScatterND with reduction '{red}'")
    return im.aten("index_put", x, upd, *_nd_index(im, x, idx, 0), accumulate=red == "add")


@handles("OneHot")
def _one_hot(im):
    idx = im.t(0)
    depth = int(im.c(1, "OneHot's depth").reshape(-1)[0].item())
    values = im.t(2)
    r = idx.type.rank + 1
    axis = im.axis(im.attr("axis", -1), r)
    if not idx.type.dtype.torch.is_floating_point:
        idx = im.op("cast", idx, dtype="i64")
    else:
        idx = im.op("cast", idx, dtype="i64")
    idx = _wrap(im, idx, depth)
    shape = list(idx.type.shape)
    shape.insert(axis, 1)
    idx = im.op("reshape", idx, shape=shape)
    ar = [1] * r
    ar[axis] = depth
    hot = im.op("eq", idx, im.b.const("one_hot_range", torch.arange(depth, dtype=torch.int64).reshape(ar)))
    off = im.op("reshape", im.op("slice", values, axis=0, start=0, end=1, step=1), shape=[])
    on = im.op("reshape", im.op("slice", values, axis=0, start=1, end=2, step=1), shape=[])
    return im.op("where", hot, on, off)


@handles("Trilu")
def _trilu(im):
    x = im.t(0)
    k = int(im.c(1, "Trilu's k").reshape(-1)[0].item()) if im.has(1) else 0
    h, w = x.type.shape[-2:]
    if not isinstance(h, int) or not isinstance(w, int):
        raise FrontendError(f"{im.where}: Trilu on symbolic dims {x.type} is not supported")
    ones = torch.ones(h, w, dtype=torch.bool)
    mask = torch.triu(ones, k) if im.attr("upper", 1) else torch.tril(ones, k)
    return im.op("where", im.b.const("trilu_mask", mask), x, im.like(0, x))


@handles("Size")
def _size(im):
    v = im.env[im.node.input[0]]
    shape = list(v.shape) if isinstance(v, torch.Tensor) else list(v.type.shape)
    if not all(isinstance(d, int) for d in shape):
        raise FrontendError(f"{im.where}: Size of a value with symbolic dims {shape} is not supported")
    return torch.tensor(int(torch.tensor(shape).prod().item()) if shape else 1, dtype=torch.int64)


@handles("EyeLike")
def _eye_like(im):
    x = im.t(0)
    if x.type.rank != 2 or not all(isinstance(d, int) for d in x.type.shape):
        raise FrontendError(f"{im.where}: EyeLike needs a static 2-D input, got {x.type}")
    dt = _dtype(im.attr("dtype"), im.where).torch if im.attr("dtype") is not None else x.type.dtype.torch
    return _eye(*x.type.shape, im.attr("k", 0), dt)


def _eye(h, w, k, dt):
    i = torch.arange(h).unsqueeze(1)
    j = torch.arange(w).unsqueeze(0)
    return (j - i == k).to(dt)


@handles("DepthToSpace", "SpaceToDepth")
def _depth_space(im):
    x = im.t(0)
    b = im.attr("blocksize")
    n, c, h, w = x.type.shape
    if im.node.op_type == "SpaceToDepth":
        y = im.op("reshape", x, shape=[n, c, h // b, b, w // b, b])
        y = im.op("transpose", y, perm=[0, 3, 5, 1, 2, 4])
        return im.op("reshape", y, shape=[n, c * b * b, h // b, w // b])
    if im.attr("mode", b"DCR") == b"DCR":
        y = im.op("reshape", x, shape=[n, b, b, c // (b * b), h, w])
        y = im.op("transpose", y, perm=[0, 3, 4, 1, 5, 2])
    else:
        y = im.op("reshape", x, shape=[n, c // (b * b), b, b, h, w])
        y = im.op("transpose", y, perm=[0, 1, 4, 2, 5, 3])
    return im.op("reshape", y, shape=[n, c // (b * b), h * b, w * b])


@handles("Slice")
def _slice(im):
    """ONNX Slice; a negative step is a flip followed by a positive-step slice (torch has none)."""
    v = im.env[im.node.input[0]]
    starts, ends = im.ints(1, "Slice's starts"), im.ints(2, "Slice's ends")
    axes = im.ints(3, "Slice's axes") or list(range(len(starts)))
    steps = im.ints(4, "Slice's steps") or [1] * len(starts)
    if isinstance(v, SymShape):
        if len(axes) != 1 or steps[0] != 1:
            raise FrontendError(f"{im.where}: unsupported slice of a symbolic shape")
        return SymShape(v[starts[0]:min(ends[0], len(v))])
    x = im.t(0)
    for a, s, e, st in zip(axes, starts, ends, steps):
        a = im.axis(a, x.type.rank, "axes")
        if st == 0:
            raise FrontendError(f"{im.where}: Slice step 0 on axis {a}")
        d = x.type.shape[a]
        if st < 0:
            if not isinstance(d, int):
                raise FrontendError(f"{im.where}: a negative-step Slice of symbolic dim '{d}' is not supported")
            picked = range(*slice(s, e, st).indices(d))
            x = im.aten("flip", x, dims=[a])
            if len(picked) == 0:
                x = im.op("slice", x, axis=a, start=0, end=0, step=1)
            else:
                first = d - 1 - picked[0]
                x = im.op("slice", x, axis=a, start=first, end=first + (-st) * (len(picked) - 1) + 1, step=-st)
            continue
        if isinstance(d, int) and isinstance(s, int) and isinstance(e, int):
            s, e = slice(s, e, st).indices(d)[:2]
            e = max(e, s)
        x = im.op("slice", x, axis=a, start=s, end=min(e, 2 ** 63 - 1) if isinstance(e, int) else e, step=st)
    return x


@handles("Concat")
def _concat(im):
    vals = [im.env[i] for i in im.node.input]
    if any(isinstance(v, SymShape) for v in vals):
        out = SymShape()
        for v in vals:
            if isinstance(v, Value):
                raise FrontendError(f"{im.where}: cannot concatenate a symbolic shape with computed values")
            out += list(v) if isinstance(v, SymShape) else [int(x) for x in v.reshape(-1).tolist()]
        return out
    xs = [im.t(i) for i in range(len(im.node.input))]
    return im.g.add_node("concat", xs, {"axis": im.axis(im.attr("axis"), xs[0].type.rank)}).output


# ---- sequences ---------------------------------------------------------------------------
class RuntimeSized:
    """A sequence element whose shape is data (a split by run-time sizes): the sequence's length
    is still known, but the element cannot be used as a tensor."""

    def __init__(self, why: str):
        self.why = why


def _seq(im, i) -> Seq:
    v = im.env[im.node.input[i]]
    if not isinstance(v, Seq):
        raise FrontendError(f"{im.where}: input '{im.node.input[i]}' is not a sequence")
    return v


def _elements(im, s) -> list:
    for x in s:
        if isinstance(x, RuntimeSized):
            raise FrontendError(f"{im.where}: a sequence element's shape is run-time data ({x.why})")
    return list(s)


def _position(im, i, n, insert=False):
    """An import-time sequence position (ONNX allows negative ones), or None if run-time."""
    v = im.env[im.node.input[i]]
    if not isinstance(v, torch.Tensor):
        return None
    p = int(v.reshape(-1)[0].item())
    lim = n + 1 if insert else n
    if not -n <= p < lim:
        raise FrontendError(f"{im.where}: position {p} is out of range for a sequence of {n}")
    return p + n if p < 0 else p


@handles("SequenceEmpty")
def _seq_empty(im):
    return Seq()


@handles("SequenceConstruct")
def _seq_construct(im):
    return Seq(im.t(i) for i in range(len(im.node.input)))


@handles("SequenceLength")
def _seq_length(im):
    return torch.tensor(len(_seq(im, 0)), dtype=torch.int64)


@handles("SequenceInsert")
def _seq_insert(im):
    s = Seq(_seq(im, 0))
    x = im.t(1)
    p = _position(im, 2, len(s), insert=True) if im.has(2) else len(s)
    if p is None:
        raise FrontendError(f"{im.where}: SequenceInsert needs a position known at import")
    s.insert(p, x)
    return s


@handles("SequenceErase")
def _seq_erase(im):
    s = Seq(_seq(im, 0))
    p = _position(im, 1, len(s)) if im.has(1) else len(s) - 1
    if p is None:
        raise FrontendError(f"{im.where}: SequenceErase needs a position known at import")
    del s[p]
    return s


@handles("SequenceAt")
def _seq_at(im):
    """At an import-time position: that element. At a run-time one: the elements must share one
    type, and the result is gathered from their stack."""
    s = _seq(im, 0)
    p = _position(im, 1, len(s))
    if p is not None:
        return _elements(im, [s[p]])[0]
    s = _elements(im, s)
    if len({x.type for x in s}) != 1:
        raise FrontendError(f"{im.where}: SequenceAt at a run-time position over elements of different "
                            f"types {sorted({str(x.type) for x in s})}")
    stacked = _stack(im, list(s), 0)
    pos = im.t(1)
    pos = im.op("reshape", pos, shape=[]) if pos.type.rank else pos
    if pos.type.dtype.value != "i64":
        pos = im.op("cast", pos, dtype="i64")
    return im.op("gather", stacked, _wrap(im, pos, len(s)), axis=0)


def _stack(im, xs, axis):
    shape = list(xs[0].type.shape)
    shape.insert(axis, 1)
    parts = [im.op("reshape", x, shape=shape) for x in xs]
    return im.g.add_node("concat", parts, {"axis": axis}).output


@handles("SplitToSequence")
def _split_to_seq(im):
    x = im.t(0)
    axis = im.axis(im.attr("axis", 0), x.type.rank)
    d = x.type.shape[axis]
    if im.has(1) and not isinstance(im.env[im.node.input[1]], torch.Tensor):
        sizes = im.t(1)
        if sizes.type.rank != 1 or not isinstance(sizes.type.shape[0], int):
            raise FrontendError(f"{im.where}: run-time split sizes need a static count, got {sizes.type}")
        return Seq(RuntimeSized(f"split by the run-time sizes '{im.node.input[1]}'")
                   for _ in range(sizes.type.shape[0]))
    if im.has(1):
        split = im.ints(1, "SplitToSequence's split")
        if len(split) == 1 and im.c(1, "split").dim() == 0:
            if not isinstance(d, int):
                raise FrontendError(f"{im.where}: cannot split symbolic dim '{d}' at import")
            k = split[0]
            split = [k] * (d // k) + ([d % k] if d % k else [])
        return Seq(im.g.add_node("split", [x], {"axis": axis, "sizes": split}).outputs)
    if not isinstance(d, int):
        raise FrontendError(f"{im.where}: cannot split symbolic dim '{d}' at import")
    parts = im.g.add_node("split", [x], {"axis": axis, "sizes": [1] * d}).outputs
    if im.attr("keepdims", 1):
        return Seq(parts)
    shape = [s for i, s in enumerate(x.type.shape) if i != axis]
    return Seq(im.op("reshape", p, shape=shape) for p in parts)


@handles("ConcatFromSequence")
def _concat_from_seq(im):
    s = _elements(im, _seq(im, 0))
    if not s:
        raise FrontendError(f"{im.where}: ConcatFromSequence of an empty sequence")
    r = s[0].type.rank
    if im.attr("new_axis", 0):
        return _stack(im, s, im.axis(im.attr("axis"), r + 1))
    return im.g.add_node("concat", s, {"axis": im.axis(im.attr("axis"), r)}).output
