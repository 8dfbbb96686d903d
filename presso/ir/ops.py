"""Every presso op, declared once: operands, attributes, reference implementation (torch), and
FLOP counts for the heavy ones. Type inference comes from the reference on meta tensors unless an
op gives its own rule (ops whose types the reference cannot express, such as packed int4).

Adding an op = adding one ``defop`` here (see docs/architecture.md).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import IRError
from .expr import ATTR_OF, Arg, Const, Expr, operands
from .expr import parse as parse_expr
from .registry import Attr, defop, get_op
from .types import DType, TensorType

INT64_MAX = 2 ** 63 - 1


def _numel_flops(ins, outs, attrs, b):
    return sum(o.numel(b) for o in outs)


# Type inference runs the reference on meta tensors, which accept what the real kernels refuse
# (an out-of-range dim, operands of different dtypes): these checks give ops their real rules.
def _check_axis(op: str, axis: int, t: TensorType, what: str = "axis") -> None:
    rank = max(t.rank, 1)     # a 0-d tensor takes axis 0 or -1, as torch
    if not -rank <= axis < rank:
        raise IRError(f"{op}: {what} {axis} is out of range for {t} (allowed: {-rank}..{rank - 1})")


def _axis_verify(op: str):
    def verify(types, attrs):
        if types and types[0] is not None:
            _check_axis(op, attrs["axis"], types[0])
    return verify


def _axes_verify(op: str):
    def verify(types, attrs):
        for a in attrs["axes"]:
            _check_axis(op, a, types[0], "axes entry")
    return verify


def _same_dtype(op: str, names: tuple):
    """The named operands (``None`` = absent) must share one dtype, as the real kernels need."""
    def verify(types, attrs):
        present = [(n, t) for n, t in zip(names, types) if t is not None]
        if len({t.dtype for _, t in present}) > 1:
            got = ", ".join(f"{n}: {t}" for n, t in present)
            raise IRError(f"{op}: operands must have one dtype, got {got}")
    return verify


# ---- elementwise -------------------------------------------------------------------------
_ARITHMETIC_FLOATS = (DType.f64, DType.f32, DType.f16, DType.bf16)
_COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or"}


def broadcast_shapes(a: tuple, b: tuple) -> Optional[tuple]:
    """NumPy broadcasting of two shapes whose dims are ints or symbols; ``None`` if it cannot be decided
    here (two different symbols, or sizes that do not broadcast: the meta kernel then says why)."""
    out = []
    for i in range(max(len(a), len(b))):
        x = a[len(a) - 1 - i] if i < len(a) else 1
        y = b[len(b) - 1 - i] if i < len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(reversed(out))


def _binary_infer(name):
    """Closed form for same-dtype floating operands, the common case. Torch's meta kernels for these ops
    are Python and their first call imports torch._dynamo (~1 s); other dtypes go to the meta kernel,
    which knows torch's promotion rules."""
    def infer(types, attrs):
        a, b = types
        if a.dtype != b.dtype or a.dtype not in _ARITHMETIC_FLOATS:
            return None
        shape = broadcast_shapes(tuple(a.shape), tuple(b.shape))
        if shape is None:
            return None
        return [TensorType(shape, DType.bool if name in _COMPARISONS else a.dtype)]
    return infer


def _unary_infer(name):
    """Closed form for floating operands (see ``_binary_infer``); integer inputs go to the meta kernel."""
    def infer(types, attrs):
        (x,) = types
        if x.dtype not in _ARITHMETIC_FLOATS:
            return None
        return [TensorType(tuple(x.shape), DType.bool if name == "logical_not" else x.dtype)]
    return infer


def _binary(name, fn):
    defop(name, ["a", "b"], category="elementwise", infer=_binary_infer(name), flops=_numel_flops)(fn)


for _name, _fn in {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum,
    "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
    "logical_and": torch.logical_and, "logical_or": torch.logical_or,
}.items():
    _binary(_name, (lambda f: lambda a, b: f(a, b))(_fn))

for _name, _fn in {
    "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal, "tanh": torch.tanh, "erf": torch.erf,
    "sigmoid": torch.sigmoid, "relu": torch.relu, "silu": F.silu, "sin": torch.sin, "cos": torch.cos,
    "logical_not": torch.logical_not,
}.items():
    defop(_name, ["x"], category="elementwise", infer=_unary_infer(_name),
          flops=_numel_flops)((lambda f: lambda x: f(x))(_fn))


@defop("gelu", ["x"], {"approximate": Attr("str", "none", choices=("none", "tanh"))}, "elementwise", flops=_numel_flops)
def gelu(x, approximate):
    return F.gelu(x, approximate=approximate)


@defop("where", ["cond", "a", "b"], category="elementwise", flops=_numel_flops)
def where(cond, a, b):
    return torch.where(cond, a, b)


@defop("cast", ["x"], {"dtype": Attr("dtype")}, "elementwise")
def cast(x, dtype):
    return x.to(DType[dtype].torch)


# ---- constants ---------------------------------------------------------------------------
@defop("full", [], {"value": Attr("float"), "shape": Attr("shape", []), "dtype": Attr("dtype", "f32")}, "constant")
def full(value, shape, dtype):
    """A tensor filled with one value (scalars in arithmetic are 0-d ``full`` nodes)."""
    return torch.full(shape, value, dtype=DType[dtype].torch)


@defop("arange", [], {"start": Attr("int", 0), "end": Attr("dim"), "step": Attr("int", 1),
                      "dtype": Attr("dtype", "i64")}, "constant")
def arange(start, end, step, dtype):
    return torch.arange(start, end, step, dtype=DType[dtype].torch)


# ---- reductions and softmax --------------------------------------------------------------
_RED = {"axes": Attr("ints"), "keepdim": Attr("bool", False)}


@defop("reduce_sum", ["x"], _RED, "reduce", verify=_axes_verify("reduce_sum"))
def reduce_sum(x, axes, keepdim):
    return x.sum(dim=axes, keepdim=keepdim) if axes else x.sum()


@defop("reduce_mean", ["x"], _RED, "reduce", verify=_axes_verify("reduce_mean"))
def reduce_mean(x, axes, keepdim):
    return x.mean(dim=axes, keepdim=keepdim) if axes else x.mean()


@defop("reduce_max", ["x"], _RED, "reduce", verify=_axes_verify("reduce_max"))
def reduce_max(x, axes, keepdim):
    return x.amax(dim=axes, keepdim=keepdim) if axes else x.amax()


@defop("softmax", ["x"], {"axis": Attr("int", -1)}, "reduce", verify=_axis_verify("softmax"),
       flops=lambda i, o, a, b: 5 * o[0].numel(b))
def softmax(x, axis):
    return torch.softmax(x, axis)


# ---- linear algebra ----------------------------------------------------------------------
def _linear_flops(ins, outs, attrs, b):
    return 2 * outs[0].numel(b) * ins[0].concrete_shape(b)[-1]


def _linear_infer(types, attrs):
    """Closed form: the meta kernel of ``mm`` is Python and its first call imports torch._dynamo (~1 s)."""
    x, w, bias = types
    if len(w.shape) != 2 or len(x.shape) < 1:
        raise IRError(f"linear: weight must be 2-D (out, in) and x at least 1-D, got {w} and {x}")
    if x.shape[-1] != w.shape[1]:
        raise IRError(f"linear: x's last dim {x.shape[-1]} does not match weight's in_features {w.shape[1]}")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise IRError(f"linear: bias must have shape ({w.shape[0]},), got {bias}")
    return [TensorType(tuple(x.shape[:-1]) + (w.shape[0],), x.dtype)]


@defop("linear", ["x", "weight", "bias?"], category="linear", verify=_same_dtype("linear", ("x", "weight", "bias")),
       infer=_linear_infer, flops=_linear_flops)
def linear(x, weight, bias=None):
    """y = x @ weight.T + bias, weight is (out_features, in_features)."""
    return F.linear(x, weight, bias)


def _matmul_infer(types, attrs):
    """Closed form for operands of rank >= 2 (batch dims broadcast); vectors go to the meta kernel."""
    a, b = types
    if len(a.shape) < 2 or len(b.shape) < 2:
        return None
    if a.shape[-1] != b.shape[-2]:
        raise IRError(f"matmul: inner dims differ: {a} @ {b}")
    batch = broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2]))
    if batch is None:
        return None
    return [TensorType(batch + (a.shape[-2], b.shape[-1]), a.dtype)]


@defop("matmul", ["a", "b"], category="linear", verify=_same_dtype("matmul", ("a", "b")), infer=_matmul_infer,
       flops=_linear_flops)
def matmul(a, b):
    return torch.matmul(a, b)


def _conv_flops(ins, outs, attrs, b):
    w = ins[1].concrete_shape(b)
    return 2 * outs[0].numel(b) * math.prod(w[1:])


@defop("conv2d", ["x", "weight", "bias?"], {"stride": Attr("ints", [1, 1]), "padding": Attr("ints", [0, 0]),
                                           "dilation": Attr("ints", [1, 1]), "groups": Attr("int", 1)},
       "linear", verify=_same_dtype("conv2d", ("x", "weight", "bias")), flops=_conv_flops)
def conv2d(x, weight, bias, stride, padding, dilation, groups):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


_POOL = {"kernel": Attr("ints"), "stride": Attr("ints"), "padding": Attr("ints", [0, 0])}


@defop("max_pool2d", ["x"], _POOL, "reduce")
def max_pool2d(x, kernel, stride, padding):
    return F.max_pool2d(x, kernel, stride, padding)


@defop("avg_pool2d", ["x"], _POOL, "reduce")
def avg_pool2d(x, kernel, stride, padding):
    return F.avg_pool2d(x, kernel, stride, padding)


# ---- normalization -----------------------------------------------------------------------
@defop("layer_norm", ["x", "weight?", "bias?"], {"eps": Attr("float", 1e-5), "ndim": Attr("int", 1)}, "norm",
       flops=lambda i, o, a, b: 8 * o[0].numel(b))
def layer_norm(x, weight, bias, eps, ndim):
    """LayerNorm over the last ``ndim`` dims."""
    return F.layer_norm(x, x.shape[-ndim:], weight, bias, eps)


@defop("rms_norm", ["x", "weight?"], {"eps": Attr("float", 1e-6), "ndim": Attr("int", 1)}, "norm",
       flops=lambda i, o, a, b: 5 * o[0].numel(b))
def rms_norm(x, weight, eps, ndim):
    """x / sqrt(mean(x^2) + eps) * weight, over the last ``ndim`` dims, computed in fp32."""
    dims = tuple(range(-ndim, 0))
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype)
    return y * weight if weight is not None else y


# ---- attention ---------------------------------------------------------------------------
def _attn_verify(types, attrs):
    q, k, v = types[:3]
    if q.rank < 3 or k.rank != q.rank or v.rank != q.rank:
        raise IRError(f"attention: q, k, v must have the same rank >= 3 ([..., heads, seq, dim]), got {q}, {k}, {v}")
    _same_dtype("attention", ("q", "k", "v"))([q, k, v], attrs)
    hq, hk = q.shape[-3], k.shape[-3]
    if isinstance(hq, int) and isinstance(hk, int) and hq % hk:
        raise IRError(f"attention: query heads ({hq}) must be a multiple of key/value heads ({hk})")
    cap = attrs.get("softcap")
    if cap is not None and not cap > 0:
        raise IRError(f"attention: softcap must be > 0 (scores are capped to (-softcap, softcap)), got {cap}")


def _attn_flops(ins, outs, attrs, b):
    q, k = ins[0].concrete_shape(b), ins[1].concrete_shape(b)
    return 4 * math.prod(q) * k[-2]


_SOFTCAP = Attr("float", None, optional=True)


def softcapped_attention(q, k, v, mask, causal, scale, softcap):
    """Attention whose scores are soft-capped before the mask (Gemma 2): s = q k^T * scale, then
    softcap * tanh(s / softcap), then the mask, then softmax (in fp32, as HF's eager attention)
    times v. ``mask`` is additive or boolean (True = keep)."""
    if q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    s = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    s = torch.tanh(s / softcap) * softcap
    if causal:
        L, S = s.shape[-2], s.shape[-1]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


@defop("attention", ["q", "k", "v", "mask?"], {"causal": Attr("bool", False), "scale": Attr("float", None, optional=True),
                                              "softcap": _SOFTCAP},
       "attention", verify=_attn_verify, flops=_attn_flops)
def attention(q, k, v, mask, causal, scale, softcap):
    """softmax(q k^T * scale + mask) v over [..., heads, seq, dim]; fewer k/v heads = GQA.
    ``causal`` masks keys after the query's position (top-left aligned, as torch's SDPA);
    ``softcap`` caps the scaled scores to (-softcap, softcap) with tanh before the mask."""
    if softcap is not None:
        return softcapped_attention(q, k, v, mask, causal, scale, softcap)
    gqa = q.shape[-3] != k.shape[-3]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def _cache_update_infer(types, attrs):
    cache, new, pos = types
    axis = attrs["axis"]
    _check_axis("cache_update", axis, cache)
    if cache.rank != new.rank or pos.dtype != DType.i64 or pos.rank != 1:
        raise IRError(f"cache_update: need cache and new entries of one rank and i64[n] positions, got {cache}, {new}, {pos}")
    if [d for i, d in enumerate(cache.shape) if i != axis] != [d for i, d in enumerate(new.shape) if i != axis]:
        raise IRError(f"cache_update: {new} does not fit cache {cache} outside axis {axis}")
    return [cache]


@defop("cache_update", ["cache", "new", "positions"], {"axis": Attr("int")}, "state", infer=_cache_update_infer)
def cache_update(cache, new, positions, axis):
    """Write ``new`` into the preallocated ``cache`` at ``positions`` along ``axis`` (the KV cache
    is explicit state: the updated cache is a result the runtime feeds back next step)."""
    return cache.index_copy(axis, positions, new.to(cache.dtype))


def _attn_cached_infer(types, attrs):
    q, k, v, pos = types[:4]
    _attn_verify([q, k, v], attrs)
    starts = types[4] if len(types) > 4 else None
    if starts is not None and (starts.dtype != DType.i64 or starts.rank != 1):
        raise IRError(f"attention_cached: starts must be i64[batch], got {starts}")
    return [TensorType(tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype)]


@defop("attention_cached", ["q", "k", "v", "positions", "starts?"], {"scale": Attr("float", None, optional=True),
                                                                       "softcap": _SOFTCAP}, "attention",
       infer=_attn_cached_infer, flops=_attn_flops)
def attention_cached(q, k, v, positions, starts, scale, softcap):
    """Causal attention of new queries (at absolute ``positions``) over a KV cache: query i sees
    cached keys 0..positions[i]; cache slots past the newest position are never read. With
    ``starts`` (i64[batch], a left-padded batch) sequence b's queries see only slots from
    starts[b] on (a pad's query, before its start, sees its own slot)."""
    n = int(positions.max()) + 1
    k, v = k[..., :n, :], v[..., :n, :]
    slots = torch.arange(n, device=q.device)
    mask = slots[None, :] <= positions[:, None]
    if starts is not None:
        first = torch.minimum(starts[:, None], positions[None, :])                   # [batch, seq]
        mask = (mask[None] & (slots[None, None, :] >= first[..., None]))[:, None]    # [batch, 1, seq, n]
    if softcap is not None:
        return softcapped_attention(q, k, v, mask, False, scale, softcap)
    gqa = q.shape[-3] != k.shape[-3]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@defop("rotary", ["x", "cos", "sin"], category="elementwise", flops=lambda i, o, a, b: 3 * o[0].numel(b))
def rotary(x, cos, sin):
    """RoPE, half-split convention: x * cos + rotate_half(x) * sin."""
    return x * cos + rotate_half(x) * sin


# ---- layout ------------------------------------------------------------------------------
@defop("reshape", ["x"], {"shape": Attr("shape")}, "layout")
def reshape(x, shape):
    return x.reshape(shape)


@defop("transpose", ["x"], {"perm": Attr("ints")}, "layout")
def transpose(x, perm):
    return x.permute(perm)


@defop("expand", ["x"], {"shape": Attr("shape")}, "layout")
def expand(x, shape):
    return x.expand(shape)


def _slice_infer(types, attrs):
    x = types[0]
    axis, start, end, step = attrs["axis"], attrs["start"], attrs["end"], attrs["step"]
    if not -x.rank <= axis < x.rank:
        raise IRError(f"slice: axis {axis} out of range for {x}")
    dim = x.shape[axis]
    if isinstance(dim, int) and isinstance(start, int) and isinstance(end, int):
        size = len(range(*slice(start, end, step).indices(dim)))
    elif start == 0 and step == 1 and (end == dim or (isinstance(end, int) and end >= INT64_MAX)):
        size = dim
    elif start == 0 and step == 1 and isinstance(end, str):
        size = end  # slicing a table to a symbolic length: the model guarantees end <= dim
    elif isinstance(start, int) and isinstance(end, int) and step == 1 and 0 <= start < end < INT64_MAX:
        size = end - start  # a fixed window of a symbolic dim (the frontend checked dim >= end)
    elif isinstance(start, int) and start < 0 and step == 1 and isinstance(end, int) and end >= INT64_MAX:
        size = -start  # the last -start entries
    else:
        raise IRError(f"slice: cannot type slice [{start}:{end}:{step}] of dim '{dim}'")
    shape = list(x.shape)
    shape[axis] = size
    return [TensorType(tuple(shape), x.dtype)]


@defop("slice", ["x"], {"axis": Attr("int"), "start": Attr("dim", 0), "end": Attr("dim", INT64_MAX),
                        "step": Attr("int", 1)}, "layout", infer=_slice_infer)
def slice_(x, axis, start, end, step):
    idx = [slice(None)] * x.dim()
    idx[axis] = slice(start, end, step)
    return x[tuple(idx)]


@defop("concat", ["xs*"], {"axis": Attr("int")}, "layout", verify=_axis_verify("concat"))
def concat(xs, axis):
    return torch.cat(xs, dim=axis)


@defop("split", ["x"], {"axis": Attr("int"), "sizes": Attr("ints")}, "layout", verify=_axis_verify("split"))
def split(x, axis, sizes):
    return tuple(torch.split(x, sizes, dim=axis))


def _gather_verify(types, attrs):
    _check_axis("gather", attrs["axis"], types[0])
    if types[1].dtype not in (DType.i64, DType.i32):
        raise IRError(f"gather: index must be i64 or i32, got {types[1]}")


@defop("gather", ["x", "index"], {"axis": Attr("int", 0)}, "layout", verify=_gather_verify)
def gather(x, index, axis):
    """ONNX Gather / embedding lookup: out = x.shape[:axis] + index.shape + x.shape[axis+1:]."""
    axis = axis % x.dim()
    flat = torch.index_select(x, axis, index.reshape(-1))
    return flat.reshape(x.shape[:axis] + index.shape + x.shape[axis + 1:])


# ---- compressed storage -----------------------------------------------------------------
# Compressed weights are typed params read by a "weight producer" op (dequantize, densify_nm)
# whose result feeds an ordinary ``linear``: the reference runtime densifies on the fly, kernels
# fuse producer and consumer.
def _dequant_infer(types, attrs):
    q, scales, zeros = types
    bits, gs = attrs["bits"], attrs["group_size"]
    want = {4: (DType.i4, DType.u4), 8: (DType.i8, DType.u8)}[bits]
    if q.dtype not in want:
        raise IRError(f"dequantize: bits={bits} needs packed weights of type {want[0]} or {want[1]}, got {q.dtype}")
    if (zeros is None) != (q.dtype in (DType.i4, DType.i8)):
        raise IRError(f"dequantize: signed ({want[0]}) weights take no zeros, unsigned ({want[1]}) weights need them")
    if q.rank != 2 or not isinstance(q.shape[1], int) or gs < 1:
        raise IRError(f"dequantize: needs a static 2-D weight and group_size >= 1, got {q} and {gs}")
    groups = -(-q.shape[1] // gs)    # the last group may be shorter
    if list(scales.shape) != [q.shape[0], groups]:
        raise IRError(f"dequantize: scales must be [{q.shape[0]}, {groups}], got {scales}")
    return [TensorType(q.shape, DType[attrs["dtype"]])]


@defop("dequantize", ["q", "scales", "zeros?"], {"bits": Attr("int", choices=(4, 8)), "group_size": Attr("int"),
                                                "dtype": Attr("dtype", "f32")}, "compressed", infer=_dequant_infer)
def dequantize(q, scales, zeros, bits, group_size, dtype):
    """Group-wise dequantization of a (rows, cols) integer matrix, groups of ``group_size`` along
    cols (the last one shorter where ``group_size`` does not divide cols):
    w = (q - zeros) * scales. 4-bit storage is unpacked here (low nibble first)."""
    if bits == 4:
        q = unpack_int4(q, signed=zeros is None)
    cols = q.shape[1]
    w = q.to(torch.float32)
    if zeros is not None:
        w = w - zeros.to(torch.float32).repeat_interleave(group_size, 1)[:, :cols]
    w = w * scales.to(torch.float32).repeat_interleave(group_size, 1)[:, :cols]
    return w.to(DType[dtype].torch)


def _gather_dequant_infer(types, attrs):
    index, q, scales, zeros = types
    if index.dtype not in (DType.i64, DType.i32, DType.i16, DType.i8, DType.u8):
        raise IRError(f"gather_dequantize: index must be an integer tensor, got {index}")
    (table,) = _dequant_infer([q, scales, zeros], attrs)
    return [TensorType(tuple(index.shape) + (table.shape[1],), table.dtype)]


@defop("gather_dequantize", ["index", "q", "scales", "zeros?"],
       {"bits": Attr("int", choices=(4, 8)), "group_size": Attr("int"), "dtype": Attr("dtype", "f32")},
       "compressed", infer=_gather_dequant_infer)
def gather_dequantize(index, q, scales, zeros, bits, group_size, dtype):
    """Embedding lookup in a group-wise quantized table: ``dequantize(q, scales, zeros)[index]``,
    dequantizing only the rows looked up (out = index.shape + [cols]). The table's storage is the
    one a ``dequantize`` of the same params reads, so a tied LM head shares it."""
    rows = index.reshape(-1)
    pick = (lambda t: None if t is None else t.index_select(0, rows))
    w = dequantize(pick(q), pick(scales), pick(zeros), bits, group_size, dtype)
    return w.reshape(*index.shape, w.shape[-1])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int values in [-8, 7] (signed) or [0, 15] two per byte along the last dim."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor, signed: bool) -> torch.Tensor:
    lo, hi = p & 0xF, p >> 4
    out = torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2).to(torch.int16)
    return torch.where(out > 7, out - 16, out).to(torch.int8) if signed else out.to(torch.uint8)


def _densify_infer(types, attrs):
    values, index = types
    n, m = attrs["n"], attrs["m"]
    if not 0 < n <= m:
        raise IRError(f"densify_nm: need 0 < n <= m, got {n}:{m}")
    if index.dtype not in (DType.u4, DType.u8) or list(index.shape) != list(values.shape):
        raise IRError(f"densify_nm: index must be u4/u8 with the shape of values {values}, got {index}")
    if values.rank != 2 or not isinstance(values.shape[1], int) or values.shape[1] % n:
        raise IRError(f"densify_nm: values {values} must hold n={n} entries per group")
    return [TensorType((values.shape[0], values.shape[1] // n * m), values.dtype)]


@defop("densify_nm", ["values", "index"], {"n": Attr("int"), "m": Attr("int")}, "compressed", infer=_densify_infer)
def densify_nm(values, index, n, m):
    """N:M structured sparsity: each group of m inputs keeps n values; ``index`` holds each kept
    value's position inside its group (4-bit when packed). Rebuilds the dense (rows, cols) matrix."""
    rows = values.shape[0]
    if index.dtype == torch.uint8 and index.shape[-1] * 2 == values.shape[-1]:
        index = unpack_int4(index, signed=False)
    groups = values.shape[1] // n
    dense = torch.zeros(rows, groups, m, dtype=values.dtype, device=values.device)
    dense.scatter_(2, index.to(torch.int64).reshape(rows, groups, n), values.reshape(rows, groups, n))
    return dense.reshape(rows, groups * m)


def hadamard_matrix(n: int, dtype=torch.float32) -> torch.Tensor:
    """The normalized (orthogonal, symmetric) Sylvester Hadamard matrix of size n = 2^k."""
    if n < 1 or n & (n - 1):
        raise IRError(f"hadamard: block size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / h.shape[0] ** 0.5).to(dtype)


def _hadamard_verify(types, attrs):
    b = attrs["block"]
    d = types[0].shape[-1] if types[0].rank else None
    if b < 1 or b & (b - 1) or not isinstance(d, int) or d % b:
        raise IRError(f"hadamard: block {b} must be a power of two dividing the last dim of {types[0]}")


@defop("hadamard", ["x"], {"block": Attr("int")}, "elementwise", verify=_hadamard_verify,
       flops=lambda i, o, a, b: o[0].numel(b) * max(a["block"].bit_length() - 1, 1))
def hadamard(x, block):
    """Blockwise orthogonal Hadamard rotation of the last dim (QuaRot/Quamba outlier suppression)."""
    h = hadamard_matrix(block, x.dtype).to(x.device)
    return (x.reshape(*x.shape[:-1], x.shape[-1] // block, block) @ h).reshape(x.shape)


def _qtoken_infer(types, attrs):
    x = types[0]
    return [TensorType(x.shape, DType.i8), TensorType(tuple(x.shape[:-1]) + (1,), DType.f32)]


@defop("quantize_per_token", ["x"], {"bits": Attr("int", 8, choices=(7, 8))}, "compressed", infer=_qtoken_infer)
def quantize_per_token(x, bits):
    """Dynamic symmetric quantization of activations, one scale per token (row), codes in
    [-(2^(bits-1) - 1), 2^(bits-1) - 1] stored as i8. 7 bits: code + 64 fits u7, so an x86 AVX2
    kernel can multiply it as u8 against s8 weights (vpmaddubsw) without int16 saturation."""
    qmax = float(2 ** (bits - 1) - 1)
    s = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-8) / qmax
    return torch.clamp(torch.round(x.float() / s), -qmax, qmax).to(torch.int8), s


def _lin8_infer(types, attrs):
    xq, xs, wq, ws, bias = types
    if xq.dtype != DType.i8 or wq.dtype != DType.i8:
        raise IRError(f"linear_int8: activations and weights must be i8, got {xq.dtype} and {wq.dtype}")
    return [TensorType(tuple(xq.shape[:-1]) + (wq.shape[0],), DType.f32)]


@defop("linear_int8", ["xq", "x_scale", "wq", "w_scale", "bias?"], {}, "linear", infer=_lin8_infer,
       flops=lambda i, o, a, b: 2 * o[0].numel(b) * i[0].concrete_shape(b)[-1])
def linear_int8(xq, x_scale, wq, w_scale, bias):
    """W8A8: int8 x int8 with exact integer accumulation, then per-token x per-channel scaling."""
    acc = xq.to(torch.float64) @ wq.to(torch.float64).T
    y = (acc * x_scale.to(torch.float64) * w_scale.to(torch.float64).reshape(-1)).to(torch.float32)
    return y + bias if bias is not None else y


# ---- fused regions ------------------------------------------------------------------------
def _fused_verify(types, attrs):
    used = operands(parse_expr(attrs["expr"]))
    if used and max(used) >= len(types):
        raise IRError(f"fused_elementwise: expr {attrs['expr']!r} reads %{max(used)} but has {len(types)} operand(s)")


@defop("fused_elementwise", ["xs*"], {"expr": Attr("str")}, "elementwise", verify=_fused_verify,
       flops=_numel_flops)
def fused_elementwise(xs, expr):
    """A region of elementwise ops made one kernel by the ``fuse`` pass; ``expr`` is the region as
    an expression over its operands (see ``presso.ir.expr``). The reference evaluates op by op."""
    return evaluate_expr(parse_expr(expr), xs)


def evaluate_expr(e: Expr, xs, device=None) -> torch.Tensor:
    """An expression's reference value: each op's registry implementation, in tree order."""
    if isinstance(e, Arg):
        return xs[e.index]
    if isinstance(e, Const):
        dev = device if device is not None else (xs[0].device if xs else None)
        return torch.tensor(e.value, dtype=DType[e.dtype].torch, device=dev)
    args = [evaluate_expr(a, xs, device) for a in e.args]
    attrs = {ATTR_OF[e.op]: e.attr} if e.op in ATTR_OF else {}
    return get_op(e.op).ref(*args, **attrs)


# ---- KV-cache quantization ------------------------------------------------------------------
def kv_packed_width(width: int, bits: int, group_size: int) -> int:
    """Bytes per token of ``kv_quantize``: the codes (``bits`` each) then one f16 scale per group."""
    return width * bits // 8 + 2 * (width // group_size)


def _kvq_check(width, bits, group_size):
    if not isinstance(width, int) or group_size < 1 or width % group_size or (bits == 4 and group_size % 2):
        raise IRError(f"kv_quantize: group_size={group_size} must divide the last dim {width} (and be even for 4 bits)")


def _kvq_infer(types, attrs):
    x = types[0]
    width = x.shape[-1] if x.rank else None
    _kvq_check(width, attrs["bits"], attrs["group_size"])
    return [TensorType(tuple(x.shape[:-1]) + (kv_packed_width(width, attrs["bits"], attrs["group_size"]),), DType.u8)]


@defop("kv_quantize", ["x"], {"bits": Attr("int", 4, choices=(4, 8)), "group_size": Attr("int", 32)}, "compressed",
       infer=_kvq_infer)
def kv_quantize(x, bits, group_size):
    """Per-token, per-group symmetric quantization of what a KV cache stores (K/V, or Palu's latent):
    every ``group_size`` values of the last dim share an f16 scale. One u8 row per token holds the
    codes (two per byte at 4 bits) followed by the scales' bytes, so the cache is this one buffer."""
    lead, width = x.shape[:-1], x.shape[-1]
    qmax = 2 ** (bits - 1) - 1
    xg = x.float().reshape(*lead, width // group_size, group_size)
    s = (xg.abs().amax(-1, keepdim=True) / (qmax + 0.5)).clamp_min(1e-8).half()
    q = torch.clamp(torch.round(xg / s.float()), -qmax - 1, qmax).to(torch.int8).reshape(*lead, width)
    codes = pack_int4(q) if bits == 4 else q.view(torch.uint8)
    return torch.cat((codes, s.reshape(*lead, -1).contiguous().view(torch.uint8)), -1)


def _kvdq_infer(types, attrs):
    p, width = types[0], attrs["width"]
    _kvq_check(width, attrs["bits"], attrs["group_size"])
    if p.dtype != DType.u8 or p.shape[-1] != kv_packed_width(width, attrs["bits"], attrs["group_size"]):
        raise IRError(f"kv_dequantize: input {p} is not the u8 rows kv_quantize makes of width {width}, "
                      f"bits {attrs['bits']}, group_size {attrs['group_size']}")
    return [TensorType(tuple(p.shape[:-1]) + (width,), DType[attrs["dtype"]])]


@defop("kv_dequantize", ["packed"], {"bits": Attr("int", 4, choices=(4, 8)), "group_size": Attr("int", 32),
                                     "width": Attr("int"), "dtype": Attr("dtype", "f32")}, "compressed",
       infer=_kvdq_infer)
def kv_dequantize(packed, bits, group_size, width, dtype):
    """The inverse of ``kv_quantize``: codes times their group's f16 scale, ``width`` values per token."""
    lead = packed.shape[:-1]
    nc = width * bits // 8
    codes = packed[..., :nc]
    q = unpack_int4(codes, signed=True) if bits == 4 else codes.contiguous().view(torch.int8)
    s = packed[..., nc:].contiguous().view(torch.float16).float()
    out = q.float().reshape(*lead, width // group_size, group_size) * s.unsqueeze(-1)
    return out.reshape(*lead, width).to(DType[dtype].torch)
