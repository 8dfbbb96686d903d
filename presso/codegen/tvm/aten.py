"""TVM lowerings of the generic ``aten.*`` ops, one small function per ATen overload.

The ops come straight from torch's schemas (``presso/ir/aten_ops.py``): operands in schema order,
attributes under the schema's names. Each entry of the table maps an overload onto Relax ops
(``relax.op.*``, the way TVM's own ExportedProgram frontend maps it) or, where Relax has no op or
its semantics differ from ATen's, onto a tensor expression: elementwise math is one ``te.compute``
over the output shape with NumPy broadcasting, so the scalar formula is the whole lowering.

ATen's inferred output type is authoritative: a lowering whose result has another shape raises
``CodegenError`` (a lowering bug must never become wrong numbers), and a result of another dtype is
cast to the inferred one (ATen's own type promotion, e.g. ``sum(dtype=...)`` or int -> float math).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ...errors import CodegenError
from ...ir.types import DType
from .table import TVM_DTYPE, lowers

ATEN_LOWERED: list[str] = []


def aten(*names):
    """Register ``fn`` as the lowering of the ATen overloads ``names`` (IR names, ``aten.`` prefix
    added), wrapped in the output-type check."""
    def deco(fn):
        def checked(L, n, ins):
            return _check_outputs(L, n, fn(L, n, ins))
        checked.__name__ = fn.__name__
        full = [f"aten.{x}" for x in names]
        ATEN_LOWERED.extend(full)
        return lowers(*full)(checked)
    return deco


def _check_outputs(L, n, res):
    many = isinstance(res, (list, tuple))
    res = list(res) if many else [res]
    if len(res) != len(n.outputs):
        raise CodegenError(f"node '{n.name}' (op '{n.op}'): lowering gave {len(res)} results, ATen {len(n.outputs)}")
    out = []
    for v, r in zip(n.outputs, res):
        if r is None:      # an output the lowering does not compute: it must be unused
            _require_unused(L, n, v)
            out.append(None)
            continue
        si = r.ty
        want = L.shape(v.type)
        got = list(si.shape.values) if getattr(si, "shape", None) is not None else None
        if got is None or len(got) != len(want) or any(
                isinstance(w, int) and _const(g) is not None and _const(g) != w for w, g in zip(want, got)):
            raise CodegenError(f"node '{n.name}' (op '{n.op}'): lowered shape {got}, ATen infers {want}")
        dt = TVM_DTYPE[v.type.dtype]
        out.append(r if str(si.dtype) == dt else L.emit(L.rx.op.astype(r, dt)))
    return out if many else out[0]


def _pdt(e) -> str:
    """The dtype of a TIR expression (a tensor element or a computed value)."""
    d = getattr(e, "dtype", None)
    return str(d if d is not None else e.ty)


def _const(e):
    v = getattr(e, "value", None)
    return int(v) if v is not None else None


def _require_unused(L, n, v):
    if L.users.get(v) or v in L.g.outputs:
        raise CodegenError(f"node '{n.name}' (op '{n.op}'): result '{v.name}' is used but has no TVM lowering")


def _dt(v) -> str:
    return TVM_DTYPE[v.type.dtype]


def _out_dt(n, i=0) -> str:
    return TVM_DTYPE[n.outputs[i].type.dtype]


def _axis(n, key="dim", i=0):
    return n.attrs[key] % max(n.inputs[i].type.rank, 1)


def _axes(n, key="dim", i=0):
    """A dim list attribute as non-negative axes (None or empty: every axis)."""
    d = n.attrs.get(key)
    rank = n.inputs[i].type.rank
    if d is None or (isinstance(d, (list, tuple)) and len(d) == 0):
        return list(range(rank))
    d = [d] if isinstance(d, int) else d
    return sorted(a % max(rank, 1) for a in d)


def _result_dtype(*parts) -> str:
    """torch's promotion over tensors (presso Values) and Python scalars."""
    ts = [torch.empty([1] * max(p.type.rank, 1) if p.type.rank else [], dtype=p.type.dtype.torch, device="meta")
          for p in parts if not isinstance(p, (int, float, bool))]
    scalars = [p for p in parts if isinstance(p, (int, float, bool))]
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype) if t.dim() or not ts[0].dim() else dt
    for s in scalars:
        dt = torch.result_type(torch.empty([1], dtype=dt, device="meta"), s)
    return TVM_DTYPE[DType.from_torch(dt)]


# ---- elementwise math as one tensor expression ---------------------------------------------------
def _bcast_index(t, idx, rank):
    """Index ``t`` with output index ``idx`` under NumPy broadcasting (right-aligned, size-1 dims 0)."""
    r = len(t.shape)
    sub = idx[rank - r:] if r else ()
    return tuple(0 if _const(s) == 1 else i for s, i in zip(t.shape, sub))


class _K:
    """A Python scalar operand of ``_ew`` (bare ints are operand indices)."""

    def __init__(self, value):
        self.value = value


def _ew(L, n, fn, operands, dt, out_dt=None, name=None):
    """``out[i] = fn(*operand values at i)`` over the output shape; tensor operands (indices into
    ``n.inputs``) are cast to ``dt`` first, Python scalars become ``dt`` constants."""
    from tvm import te, tirx
    out_dt = out_dt or _out_dt(n)
    shape = L.shape(n.outputs[0].type)
    rank = len(shape)
    tensors = [L.cast(L.env[n.inputs[o]], n.inputs[o], dt) for o in operands if not isinstance(o, _K)]

    def f(*ts):
        def body(*i):
            it = iter(ts)
            args = [tirx.const(o.value, dt) if isinstance(o, _K) else t(*_bcast_index(t, i, rank))
                    for o in operands for t in ([None] if isinstance(o, _K) else [next(it)])]
            y = fn(*args)
            return y if _pdt(y) == out_dt else y.astype(out_dt)
        return te.compute(shape, body, name=name or "aten_ew")
    return L.emit_te(f, *tensors, name=(name or n.op.replace(".", "_")))


def _float_dt(n) -> str:
    """Math on floats: the output dtype when it is one, float32 otherwise (int -> float ops)."""
    dt = _out_dt(n)
    return dt if dt.startswith(("float", "bfloat")) else "float32"


def _t():
    from tvm import tirx
    return tirx


def _sel(c, a, b):
    return _t().Select(c, a, b)


def _nan_like(x):
    return _t().const(math.nan, _pdt(x))


def _sign(x):
    tx = _t()
    one, zero = tx.const(1, _pdt(x)), tx.const(0, _pdt(x))
    return _sel(x > zero, one, _sel(x < zero, -one, _sel(_eq(x, zero), zero, x)))


def _float_fmod(a, b):
    """C's fmod (LLVM has no fmod intrinsic TVM lowers): a - trunc(a / b) * b, in float64 so the
    quotient's truncation and the product are exact for float32 operands."""
    tx = _t()
    dt = _pdt(a)
    a64, b64 = a.astype("float64"), b.astype("float64")
    return (a64 - tx.trunc(a64 / b64) * b64).astype(dt)


def _fmod(a, b):
    tx = _t()
    return _float_fmod(a, b) if _pdt(a).startswith("float") else tx.truncmod(a, b)


def _remainder(a, b):
    tx = _t()
    if not _pdt(a).startswith("float"):
        return tx.floormod(a, b)
    m = _float_fmod(a, b)
    zero = tx.const(0, _pdt(a))
    return _sel(tx.all(_ne(m, zero), _xor(m < zero, b < zero)), m + b, m)


def _nan_max(a, b, pick_max=True):
    """torch.maximum / minimum: NaN if either is NaN."""
    tx = _t()
    m = tx.max(a, b) if pick_max else tx.min(a, b)
    if not _pdt(a).startswith("float"):
        return m
    return _sel(tx.isnan(a), a, _sel(tx.isnan(b), b, m))


def _fmax(a, b, pick_max=True):
    """torch.fmax / fmin: the other operand where one is NaN."""
    tx = _t()
    m = tx.max(a, b) if pick_max else tx.min(a, b)
    return _sel(tx.isnan(a), b, _sel(tx.isnan(b), a, m))


def _expm1(x):
    """exp(x) - 1 without cancellation near 0 (Kahan's formula)."""
    tx = _t()
    u = tx.exp(x)
    one = tx.const(1, _pdt(x))
    return _sel(_eq(u, one), x, _sel(_eq(u - one, -one), -one, (u - one) * x / tx.log(u)))


def _log1p(x):
    """log(1 + x) accurate near 0 (Goldberg's formula)."""
    tx = _t()
    one = tx.const(1, _pdt(x))
    u = x + one
    return _sel(_eq(u, one), x, tx.log(u) * x / (u - one))


def _erfc(x):
    return _t().const(1, _pdt(x)) - _t().erf(x)


def _round(x):
    return _t().nearbyint(x)


def _bool(x):
    return _ne(x, _t().const(0, _pdt(x))) if _pdt(x) != "bool" else x


def _xor(p, q):
    """Exclusive or of two predicates (LLVM rejects TVM's != on i1 vectors)."""
    tx = _t()
    return tx.Or(tx.And(p, tx.Not(q)), tx.And(tx.Not(p), q))


def _signbit(x):
    """The sign bit itself (set for -0.0 and negative NaNs, as torch.signbit)."""
    tx = _t()
    dt = _pdt(x)
    if not dt.startswith("float"):
        return x < tx.const(0, dt)
    bits = {"float64": "int64", "float32": "int32", "float16": "int16", "bfloat16": "int16"}[dt]
    return tx.reinterpret(bits, x) < tx.const(0, bits)


def _eq(a, b):
    return _t().EQ(a, b)


def _ne(a, b):
    return _t().NE(a, b)


_UNARY_FLOAT = {  # ATen op -> formula on floats (integer inputs are widened to the float output)
    "acos": lambda x: _t().acos(x), "asin": lambda x: _t().asin(x), "atan": lambda x: _t().atan(x),
    "acosh": lambda x: _t().acosh(x), "asinh": lambda x: _t().asinh(x), "atanh": lambda x: _t().atanh(x),
    "cos": lambda x: _t().cos(x), "sin": lambda x: _t().sin(x), "tan": lambda x: _t().tan(x),
    "cosh": lambda x: _t().cosh(x), "sinh": lambda x: _t().sinh(x), "tanh": lambda x: _t().tanh(x),
    "exp": lambda x: _t().exp(x), "exp2": lambda x: _t().exp2(x), "expm1": _expm1,
    "log": lambda x: _t().log(x), "log2": lambda x: _t().log2(x), "log10": lambda x: _t().log10(x),
    "log1p": _log1p, "sqrt": lambda x: _t().sqrt(x), "rsqrt": lambda x: _t().rsqrt(x),
    "erf": lambda x: _t().erf(x), "erfc": _erfc, "sigmoid": lambda x: _t().sigmoid(x),
    "reciprocal": lambda x: _t().const(1, _pdt(x)) / x,
    "deg2rad": lambda x: x * _t().const(math.pi / 180, _pdt(x)),
    "rad2deg": lambda x: x * _t().const(180 / math.pi, _pdt(x)),
}
_UNARY_SAME = {  # formula in the input's own dtype
    "abs": lambda x: _t().abs(x), "neg": lambda x: -x, "sign": _sign, "sgn": _sign,
    "ceil": lambda x: _t().ceil(x) if _pdt(x).startswith("float") else x,
    "floor": lambda x: _t().floor(x) if _pdt(x).startswith("float") else x,
    "trunc": lambda x: _t().trunc(x) if _pdt(x).startswith("float") else x,
    "round": lambda x: _round(x) if _pdt(x).startswith("float") else x,
    "frac": lambda x: x - _t().trunc(x), "square": lambda x: x * x, "positive": lambda x: x,
    "relu": lambda x: _t().max(x, _t().const(0, _pdt(x))),
}
_UNARY_BOOL = {  # predicates on the input's dtype
    "isnan": lambda x: _t().isnan(x) if _pdt(x).startswith("float") else _t().const(False, "bool"),
    "isinf": lambda x: _t().isinf(x) if _pdt(x).startswith("float") else _t().const(False, "bool"),
    "isfinite": lambda x: _t().isfinite(x) if _pdt(x).startswith("float") else _t().const(True, "bool"),
    "signbit": lambda x: _signbit(x),
    "logical_not": lambda x: _t().Not(_bool(x)),
}


def _unary_float(name):
    f = _UNARY_FLOAT[name]
    return lambda L, n, ins: _ew(L, n, f, [0], _float_dt(n))


def _unary_same(name):
    f = _UNARY_SAME[name]
    return lambda L, n, ins: _ew(L, n, f, [0], _dt(n.inputs[0]))


def _unary_bool(name):
    f = _UNARY_BOOL[name]
    return lambda L, n, ins: _ew(L, n, f, [0], _dt(n.inputs[0]), out_dt="bool")


for _name in _UNARY_FLOAT:
    aten(_name)(_unary_float(_name))
for _name in _UNARY_SAME:
    aten(_name)(_unary_same(_name))
for _name in _UNARY_BOOL:
    aten(_name)(_unary_bool(_name))


@aten("bitwise_not")
def _bitwise_not(L, n, ins):
    if n.inputs[0].type.dtype == DType.bool:
        return _ew(L, n, lambda x: _t().Not(x), [0], "bool")
    return _ew(L, n, lambda x: ~x, [0], _dt(n.inputs[0]))


@aten("round.decimals")
def _round_decimals(L, n, ins):
    k = n.attrs["decimals"]
    dt = _float_dt(n)

    def f(x):
        s = _t().const(10.0 ** abs(k), dt)
        return _round(x * s) / s if k >= 0 else _round(x / s) * s
    return _ew(L, n, f, [0], dt)


# binary ops: (formula, which dtype the formula computes in)
_BINARY = {
    "mul": (lambda a, b: a * b, "out"), "div": (lambda a, b: a / b, "out"),
    "atan2": (lambda a, b: _t().atan2(a, b), "float"), "hypot": (lambda a, b: _t().hypot(a, b), "float"),
    "copysign": (lambda a, b: _t().copysign(a, b), "float"), "nextafter": (lambda a, b: _t().nextafter(a, b), "out"),
    "fmod": (_fmod, "out"), "remainder": (_remainder, "out"),
    "maximum": (_nan_max, "out"), "minimum": (lambda a, b: _nan_max(a, b, False), "out"),
    "fmax": (_fmax, "out"), "fmin": (lambda a, b: _fmax(a, b, False), "out"),
    "pow": (lambda a, b: _t().power(a, b), "float"),
    "eq": (lambda a, b: _eq(a, b), "common"), "ne": (lambda a, b: _ne(a, b), "common"),
    "lt": (lambda a, b: a < b, "common"), "le": (lambda a, b: a <= b, "common"),
    "gt": (lambda a, b: a > b, "common"), "ge": (lambda a, b: a >= b, "common"),
    "logical_and": (lambda a, b: _t().all(_bool(a), _bool(b)), "common"),
    "logical_or": (lambda a, b: _t().any(_bool(a), _bool(b)), "common"),
    "logical_xor": (lambda a, b: _xor(_bool(a), _bool(b)), "common"),
    "bitwise_and": (lambda a, b: a & b, "out"), "bitwise_or": (lambda a, b: a | b, "out"),
    "bitwise_xor": (lambda a, b: a ^ b, "out"),
    "logaddexp": (lambda a, b: _logaddexp(a, b), "float"),
}


def _logaddexp(a, b):
    tx = _t()
    m = tx.max(a, b)
    return _sel(tx.isinf(m), m, m + _log1p(tx.exp(-tx.abs(a - b))))


def _binary(op, scalar_key=None, scalar_first=False):
    """A binary overload; ``scalar_key`` names the attribute that is the second (or, with
    ``scalar_first``, the first) operand when it is a Scalar overload."""
    fn, kind = _BINARY[op]

    def lower_(L, n, ins):
        if scalar_key is None:
            parts = [0, 1]
        else:
            s = _K(n.attrs[scalar_key])
            parts = [s, 0] if scalar_first else [0, s]
        vals = [p.value if isinstance(p, _K) else n.inputs[p] for p in parts]
        dt = {"out": _out_dt(n), "float": _float_dt(n), "common": _result_dtype(*vals)}[kind]
        if dt == "bool" and op in ("bitwise_and", "bitwise_or", "bitwise_xor"):
            f = {"bitwise_and": _BINARY["logical_and"][0], "bitwise_or": _BINARY["logical_or"][0],
                 "bitwise_xor": _BINARY["logical_xor"][0]}[op]
        elif op == "pow" and not dt.startswith("float"):
            raise CodegenError(f"node '{n.name}' (op '{n.op}'): integer pow has no TVM lowering")
        else:
            f = fn
        return _ew(L, n, f, parts, dt)
    return lower_


for _op in (o for o in _BINARY if o != "pow"):
    aten(_op if _op in ("atan2", "hypot", "nextafter", "maximum", "minimum", "fmax", "fmin", "logaddexp",
                        "logical_and", "logical_or", "logical_xor") else f"{_op}.Tensor")(_binary(_op))
for _op in ("mul", "div", "fmod", "remainder", "eq", "ne", "lt", "le", "gt", "ge", "bitwise_and", "bitwise_or",
            "bitwise_xor"):
    aten(f"{_op}.Scalar")(_binary(_op, "other"))
aten("pow.Tensor_Tensor")(_binary("pow"))
aten("pow.Tensor_Scalar")(_binary("pow", "exponent"))
aten("pow.Scalar")(_binary("pow", "self", scalar_first=True))


def _alpha_op(sign, reverse=False):
    """add / sub / rsub with ``alpha``: a + sign * alpha * b (operands swapped for rsub)."""
    def lower_(L, n, ins):
        alpha = n.attrs.get("alpha", 1)
        other = n.attrs.get("other") if len(n.inputs) == 1 else 1
        parts = [0, 1] if len(n.inputs) == 2 else [0, _K(other)]
        dt = _out_dt(n)
        if dt == "bool":
            return _ew(L, n, lambda a, b: _t().any(a, b), parts, "bool")

        def f(a, b):
            if reverse:
                a, b = b, a
                return a - b * _t().const(alpha, dt) if alpha != 1 else a - b
            bb = b * _t().const(alpha, dt) if alpha != 1 else b
            return a + bb if sign > 0 else a - bb
        return _ew(L, n, f, parts, dt)
    return lower_


aten("add.Tensor", "add.Scalar")(_alpha_op(1))
aten("sub.Tensor", "sub.Scalar")(_alpha_op(-1))
aten("rsub.Tensor", "rsub.Scalar")(_alpha_op(-1, reverse=True))


@aten("div.Tensor_mode", "div.Scalar_mode")
def _div_mode(L, n, ins):
    mode = n.attrs["rounding_mode"]
    parts = [0, 1] if len(n.inputs) == 2 else [0, _K(n.attrs["other"])]
    dt = _out_dt(n)
    tx = _t()
    if dt.startswith("float"):
        g = {None: lambda q: q, "trunc": tx.trunc, "floor": tx.floor}[mode]
        return _ew(L, n, lambda a, b: g(a / b), parts, dt)
    g = {"trunc": tx.truncdiv, "floor": tx.floordiv}.get(mode)
    if g is None:
        raise CodegenError(f"node '{n.name}': integer true division gives a float, ATen infers {dt}")
    return _ew(L, n, g, parts, dt)


@aten("floor_divide", "floor_divide.Scalar")
def _floor_divide(L, n, ins):
    parts = [0, 1] if len(n.inputs) == 2 else [0, _K(n.attrs["other"])]
    dt = _out_dt(n)
    f = (lambda a, b: _t().floor(a / b)) if dt.startswith("float") else _t().floordiv
    return _ew(L, n, f, parts, dt)


@aten("bitwise_left_shift.Tensor", "bitwise_right_shift.Tensor")
def _shift(L, n, ins):
    left = "left" in n.op
    return _ew(L, n, (lambda a, b: a << b) if left else (lambda a, b: a >> b), [0, 1], _out_dt(n))


@aten("xlogy.Tensor")
def _xlogy(L, n, ins):
    tx = _t()

    def f(x, y):
        zero = tx.const(0, _pdt(x))
        return _sel(tx.isnan(y), y, _sel(_eq(x, zero), zero, x * tx.log(y)))
    return _ew(L, n, f, [0, 1], _float_dt(n))


@aten("ldexp.Tensor")
def _ldexp(L, n, ins):
    return _ew(L, n, lambda a, b: a * _t().exp2(b), [0, 1], _float_dt(n))


@aten("where.self")
def _where(L, n, ins):
    dt = _out_dt(n)
    cond = L.cast(ins[0], n.inputs[0], "bool")
    return L.emit(L.rx.op.where(cond, L.cast(ins[1], n.inputs[1], dt), L.cast(ins[2], n.inputs[2], dt)))


@aten("clamp", "clamp_min", "clamp_max", "hardtanh")
def _clamp(L, n, ins):
    lo = n.attrs.get("min", n.attrs.get("min_val"))
    hi = n.attrs.get("max", n.attrs.get("max_val"))
    dt = _out_dt(n)
    tx = _t()

    def f(x):
        y = x
        if lo is not None:
            y = _sel(y < tx.const(lo, dt), tx.const(lo, dt), y)
        if hi is not None:
            y = _sel(y > tx.const(hi, dt), tx.const(hi, dt), y)
        return y            # a NaN input compares false and stays NaN, as in torch
    return _ew(L, n, f, [0], dt)


@aten("clamp.Tensor")
def _clamp_tensor(L, n, ins):
    x, lo, hi = n.inputs
    dt = _out_dt(n)
    parts = [0] + [i for i, v in ((1, lo), (2, hi)) if v is not None]

    def f(a, *bounds):
        it = iter(bounds)
        y = a
        if lo is not None:
            y = _nan_max(y, next(it))
        if hi is not None:
            y = _nan_max(y, next(it), False)
        return y
    return _ew(L, n, f, parts, dt)


def _activation(fn):
    return lambda L, n, ins: _ew(L, n, lambda x: fn(x, n.attrs), [0], _float_dt(n))


def _elu(x, a):
    tx = _t()
    c = lambda v: tx.const(v, _pdt(x))  # noqa: E731
    neg = c(a["alpha"]) * c(a["scale"]) * _expm1(x * c(a["input_scale"]))
    return _sel(x > c(0), x * c(a["scale"]), neg)


def _leaky(x, a):
    c = _t().const(a["negative_slope"], _pdt(x))
    return _sel(x > _t().const(0, _pdt(x)), x, x * c)


def _softplus(x, a):
    tx = _t()
    b, th = tx.const(a["beta"], _pdt(x)), tx.const(a["threshold"], _pdt(x))
    return _sel(x * b > th, x, _log1p(tx.exp(x * b)) / b)


def _hardsigmoid(x, a):
    tx = _t()
    return tx.min(tx.max(x / tx.const(6, _pdt(x)) + tx.const(0.5, _pdt(x)), tx.const(0, _pdt(x))),
                  tx.const(1, _pdt(x)))


def _gelu(x, a):
    tx = _t()
    c = lambda v: tx.const(v, _pdt(x))  # noqa: E731
    if a["approximate"] == "tanh":
        return c(0.5) * x * (c(1) + tx.tanh(c(math.sqrt(2 / math.pi)) * (x + c(0.044715) * x * x * x)))
    return c(0.5) * x * (c(1) + tx.erf(x * c(1 / math.sqrt(2))))


_ACTIVATIONS = {
    "elu": _elu, "leaky_relu": _leaky, "softplus": _softplus, "hardsigmoid": _hardsigmoid, "gelu": _gelu,
    "hardswish": lambda x, a: x * _hardsigmoid(x, a),
    "silu": lambda x, a: x * _t().sigmoid(x),
    "mish": lambda x, a: x * _t().tanh(_softplus(x, {"beta": 1.0, "threshold": 20.0})),
    "threshold": lambda x, a: _sel(x > _t().const(a["threshold"], _pdt(x)), x, _t().const(a["value"], _pdt(x))),
    "logit": lambda x, a: _logit(x, a["eps"]),
}


def _logit(x, eps):
    tx = _t()
    if eps is not None:
        x = tx.min(tx.max(x, tx.const(eps, _pdt(x))), tx.const(1 - eps, _pdt(x)))
    return tx.log(x / (tx.const(1, _pdt(x)) - x))


for _name, _fn in _ACTIVATIONS.items():
    aten(_name)(_activation(_fn))


@aten("masked_fill.Scalar", "masked_fill.Tensor")
def _masked_fill(L, n, ins):
    dt = _out_dt(n)
    parts = [0, 1, _K(n.attrs["value"])] if len(n.inputs) == 2 else [0, 1, 2]
    return _ew(L, n, lambda x, m, v: _sel(_bool(m), v, x), parts, dt)


@aten("nan_to_num")
def _nan_to_num(L, n, ins):
    dt = _out_dt(n)
    fin = np.finfo(dt) if dt.startswith("float") else None
    a = n.attrs
    tx = _t()
    if fin is None:
        return L.emit(L.rx.op.astype(ins[0], dt))
    nan = 0.0 if a["nan"] is None else a["nan"]
    pinf = float(fin.max) if a["posinf"] is None else a["posinf"]
    ninf = float(fin.min) if a["neginf"] is None else a["neginf"]

    def f(x):
        c = lambda v: tx.const(v, dt)  # noqa: E731
        return _sel(tx.isnan(x), c(nan), _sel(_eq(x, c(math.inf)), c(pinf), _sel(_eq(x, c(-math.inf)), c(ninf), x)))
    return _ew(L, n, f, [0], dt)


@aten("lerp.Scalar", "lerp.Tensor")
def _lerp(L, n, ins):
    parts = [0, 1, 2] if len(n.inputs) == 3 else [0, 1, _K(n.attrs["weight"])]
    tx = _t()

    def f(a, b, w):
        half, one = tx.const(0.5, _pdt(w)), tx.const(1, _pdt(w))
        return _sel(tx.abs(w) < half, a + w * (b - a), b - (b - a) * (one - w))
    return _ew(L, n, f, parts, _out_dt(n))


@aten("addcmul", "addcdiv")
def _addc(L, n, ins):
    dt = _out_dt(n)
    v = n.attrs["value"]
    mul = n.op == "aten.addcmul"
    return _ew(L, n, lambda s, a, b, c: s + c * (a * b if mul else a / b), [0, 1, 2, _K(v)], dt)


# ---- dtype, copies and creation -----------------------------------------------------------------
@aten("_to_copy", "clone", "alias", "lift_fresh_copy", "contiguous", "detach")
def _copy_like(L, n, ins):
    return L.cast(ins[0], n.inputs[0], _out_dt(n))


@aten("copy")
def _copy(L, n, ins):
    src = L.cast(ins[1], n.inputs[1], _out_dt(n))
    return L.emit(L.rx.op.broadcast_to(src, L.shape(n.output.type)))


def _full_of(L, n, value):
    dt = _out_dt(n)
    t = n.output.type
    if t.is_static:
        return L.rx.const(np.full(t.shape, value, dtype="bool" if dt == "bool" else dt), dt)
    return L.emit(L.rx.op.full(L.shape(t), L.rx.const(value, dt), dt))


@aten("full", "full_like", "new_full", "fill.Scalar")
def _full(L, n, ins):
    return _full_of(L, n, n.attrs.get("fill_value", n.attrs.get("value")))


@aten("scalar_tensor")
def _scalar_tensor(L, n, ins):
    return _full_of(L, n, n.attrs["s"])


@aten("zeros", "zeros_like", "new_zeros", "empty.memory_format", "empty_like", "new_empty", "empty_strided",
      "new_empty_strided", "empty_permuted")
def _zeros(L, n, ins):
    return _full_of(L, n, 0)   # empty: uninitialised in ATen, zeros here


@aten("ones", "ones_like", "new_ones")
def _ones(L, n, ins):
    return _full_of(L, n, 1)


@aten("arange", "arange.start", "arange.start_step")
def _arange(L, n, ins):
    a = n.attrs
    start, step = a.get("start", 0), a.get("step", 1)
    return L.emit(L.rx.op.arange(start, L.dim(a["end"]) if isinstance(a["end"], str) else a["end"], step,
                                 _out_dt(n)))


@aten("eye", "eye.m")
def _eye(L, n, ins):
    t = n.output.type
    dt = _out_dt(n)
    return L.rx.const(np.eye(*t.shape, dtype="bool" if dt == "bool" else dt), dt)


# ---- reductions ---------------------------------------------------------------------------------
def _reduce(relax_fn, widen=False):
    def lower_(L, n, ins):
        dt = _out_dt(n)
        x = L.cast(ins[0], n.inputs[0], dt) if widen or dt != _dt(n.inputs[0]) else ins[0]
        axes = _axes(n) if "dim" in n.attrs else None
        return L.emit(relax_fn(L)(x, axis=axes, keepdims=n.attrs.get("keepdim", False)))
    return lower_


aten("sum", "sum.dim_IntList")(_reduce(lambda L: L.rx.op.sum, widen=True))
aten("mean", "mean.dim")(_reduce(lambda L: L.rx.op.mean, widen=True))
aten("prod", "prod.dim_int")(_reduce(lambda L: L.rx.op.prod, widen=True))
aten("amax", "max")(_reduce(lambda L: L.rx.op.max))
aten("amin", "min")(_reduce(lambda L: L.rx.op.min))


@aten("any", "any.dim", "any.dims", "all", "all.dim", "all.dims")
def _any_all(L, n, ins):
    rx = L.rx
    x = n.inputs[0]
    b = L.cast(ins[0], x, "bool") if x.type.dtype != DType.bool else ins[0]
    i8 = L.emit(rx.op.astype(b, "int8"))
    f = rx.op.max if ".any" in n.op or n.op == "aten.any" else rx.op.min
    axes = _axes(n) if "dim" in n.attrs else None
    r = L.emit(f(i8, axis=axes, keepdims=n.attrs.get("keepdim", False)))
    return L.emit(rx.op.astype(r, "bool"))


@aten("argmax", "argmin")
def _argmax(L, n, ins):
    if n.inputs[0].type.rank == 0:         # a 0-d tensor's one element (Relax cannot reduce 0 dims)
        return L.rx.const(np.zeros((), "int64"), "int64")
    f = L.rx.op.argmax if n.op == "aten.argmax" else L.rx.op.argmin
    d = n.attrs["dim"]
    axis = None if d is None else d % max(n.inputs[0].type.rank, 1)
    return L.emit(f(ins[0], axis=axis, keepdims=n.attrs["keepdim"]))


@aten("max.dim", "min.dim")
def _max_dim(L, n, ins):
    rx = L.rx
    axis, keep = _axis(n), n.attrs["keepdim"]
    mx = n.op == "aten.max.dim"
    vals = L.emit((rx.op.max if mx else rx.op.min)(ins[0], axis=axis, keepdims=keep))
    idx = L.emit((rx.op.argmax if mx else rx.op.argmin)(ins[0], axis=axis, keepdims=keep))
    return [vals, idx]


def _numel_static(L, n, axes):
    shape = n.inputs[0].type.shape
    m = 1
    for a in axes:
        if not isinstance(shape[a], int):
            raise CodegenError(f"node '{n.name}' (op '{n.op}'): a variance over a symbolic dim has no TVM lowering")
        m *= shape[a]
    return m


def _variance(L, n, ins):
    """(var, mean) with Bessel's ``correction`` over the reduced dims."""
    rx = L.rx
    axes = _axes(n)
    dt = _float_dt(n)
    x = L.cast(ins[0], n.inputs[0], dt)
    keep = n.attrs["keepdim"]
    corr = n.attrs.get("correction")
    corr = 1 if corr is None else corr
    count = _numel_static(L, n, axes)
    m = L.emit(rx.op.mean(x, axis=axes, keepdims=True))
    d = L.emit(rx.op.subtract(x, m))
    s = L.emit(rx.op.sum(L.emit(rx.op.multiply(d, d)), axis=axes, keepdims=keep))
    var = L.emit(rx.op.divide(s, rx.const(max(count - corr, 0), dt)))
    return var, (m if keep else L.emit(rx.op.squeeze(m, axes)))


@aten("var.correction", "var.dim")
def _var(L, n, ins):
    return _variance(L, n, ins)[0]


@aten("std.correction", "std.dim")
def _std(L, n, ins):
    return L.emit(L.rx.op.sqrt(_variance(L, n, ins)[0]))


@aten("var_mean.correction", "var_mean.dim")
def _var_mean(L, n, ins):
    return list(_variance(L, n, ins))


@aten("std_mean.correction", "std_mean.dim")
def _std_mean(L, n, ins):
    v, m = _variance(L, n, ins)
    return [L.emit(L.rx.op.sqrt(v)), m]


@aten("logsumexp")
def _logsumexp(L, n, ins):
    rx = L.rx
    axes, keep = _axes(n), n.attrs["keepdim"]
    x = L.cast(ins[0], n.inputs[0], _float_dt(n))
    m = L.emit(rx.op.max(x, axis=axes, keepdims=True))
    safe = L.emit(rx.op.where(L.emit(rx.op.isinf(m)), L.emit(rx.op.zeros_like(m)), m))
    s = L.emit(rx.op.sum(L.emit(rx.op.exp(L.emit(rx.op.subtract(x, safe)))), axis=axes, keepdims=keep))
    mm = safe if keep else L.emit(rx.op.squeeze(safe, axes))
    return L.emit(rx.op.add(L.emit(rx.op.log(s)), mm))


@aten("linalg_vector_norm")
def _vector_norm(L, n, ins):
    rx = L.rx
    p = float(n.attrs["ord"])
    axes, keep = _axes(n), n.attrs["keepdim"]
    x = L.cast(ins[0], n.inputs[0], _out_dt(n))
    a = L.emit(rx.op.abs(x))
    if p == math.inf:
        return L.emit(rx.op.max(a, axis=axes, keepdims=keep))
    if p == -math.inf:
        return L.emit(rx.op.min(a, axis=axes, keepdims=keep))
    if p == 0:
        nz = L.emit(rx.op.astype(L.emit(rx.op.not_equal(x, rx.const(0, _out_dt(n)))), _out_dt(n)))
        return L.emit(rx.op.sum(nz, axis=axes, keepdims=keep))
    if p == 1:
        return L.emit(rx.op.sum(a, axis=axes, keepdims=keep))
    if p == 2:
        return L.emit(rx.op.sqrt(L.emit(rx.op.sum(L.emit(rx.op.multiply(a, a)), axis=axes, keepdims=keep))))
    c = rx.const(p, _out_dt(n))
    s = L.emit(rx.op.sum(L.emit(rx.op.power(a, c)), axis=axes, keepdims=keep))
    return L.emit(rx.op.power(s, rx.const(1.0 / p, _out_dt(n))))


@aten("cumsum", "cumprod")
def _cumulative(L, n, ins):
    f = L.rx.op.cumsum if n.op == "aten.cumsum" else L.rx.op.cumprod
    x = L.cast(ins[0], n.inputs[0], _out_dt(n))
    if n.inputs[0].type.rank == 0:
        return x
    return L.emit(f(x, axis=_axis(n), dtype=_out_dt(n)))


@aten("_softmax", "_log_softmax")
def _softmax(L, n, ins):
    f = L.rx.op.nn.softmax if n.op == "aten._softmax" else L.rx.op.nn.log_softmax
    x = L.cast(ins[0], n.inputs[0], _out_dt(n))
    if n.inputs[0].type.rank == 0:
        return L.emit(L.rx.op.zeros_like(x)) if "log" in n.op else L.emit(L.rx.op.ones_like(x))
    return L.emit(f(x, axis=_axis(n)))


# ---- linear algebra -----------------------------------------------------------------------------
def _scaled(L, e, s, dt):
    return e if s == 1 else L.emit(L.rx.op.multiply(e, L.rx.const(s, dt)))


def _mm(L, n, a, b):
    dt = _out_dt(n)
    return L.emit(L.rx.op.matmul(L.cast(L.env[a], a, dt), L.cast(L.env[b], b, dt)))


@aten("mm", "bmm", "mv", "dot", "matmul")
def _matmul(L, n, ins):
    return _mm(L, n, n.inputs[0], n.inputs[1])


@aten("addmm", "addmv", "baddbmm")
def _addmm(L, n, ins):
    dt = _out_dt(n)
    beta, alpha = n.attrs["beta"], n.attrs["alpha"]
    prod = _scaled(L, _mm(L, n, n.inputs[1], n.inputs[2]), alpha, dt)
    if beta == 0:
        return prod
    return L.emit(L.rx.op.add(_scaled(L, L.cast(ins[0], n.inputs[0], dt), beta, dt), prod))


@aten("addbmm")
def _addbmm(L, n, ins):
    dt = _out_dt(n)
    beta, alpha = n.attrs["beta"], n.attrs["alpha"]
    prod = L.emit(L.rx.op.sum(_mm(L, n, n.inputs[1], n.inputs[2]), axis=[0]))
    prod = _scaled(L, prod, alpha, dt)
    if beta == 0:
        return prod
    return L.emit(L.rx.op.add(_scaled(L, L.cast(ins[0], n.inputs[0], dt), beta, dt), prod))


@aten("addr")
def _addr(L, n, ins):
    dt = _out_dt(n)
    beta, alpha = n.attrs["beta"], n.attrs["alpha"]
    outer = L.emit(L.rx.op.outer(L.cast(ins[1], n.inputs[1], dt), L.cast(ins[2], n.inputs[2], dt)))
    outer = _scaled(L, outer, alpha, dt)
    if beta == 0:
        return outer
    return L.emit(L.rx.op.add(_scaled(L, L.cast(ins[0], n.inputs[0], dt), beta, dt), outer))


# ---- indexing -----------------------------------------------------------------------------------
@aten("gather")
def _gather(L, n, ins):
    if n.inputs[0].type.rank == 0:
        return ins[0]
    return L.emit(L.rx.op.gather_elements(ins[0], ins[1], axis=_axis(n)))


@aten("index_select")
def _index_select(L, n, ins):
    if n.inputs[0].type.rank == 0:
        return ins[0]
    idx = ins[1] if n.inputs[1].type.rank == 1 else L.emit(L.rx.op.reshape(ins[1], [1]))
    return L.emit(L.rx.op.take(ins[0], idx, axis=_axis(n), mode="wrap"))


@aten("embedding")
def _embedding(L, n, ins):
    return L.emit(L.rx.op.take(ins[0], ins[1], axis=0, mode="wrap"))


@aten("index.Tensor")
def _index(L, n, ins):
    """Advanced indexing with integer index tensors: their broadcast shape replaces the indexed dims
    (in place when they are consecutive, in front otherwise, as NumPy)."""
    x, idx = n.inputs[0], list(n.inputs[1:])
    if any(v is not None and v.type.dtype in (DType.bool, DType.u8) for v in idx):
        raise CodegenError(f"node '{n.name}' (op '{n.op}'): boolean-mask indexing has a data-dependent shape; "
                           "no TVM lowering")
    pos = [i for i, v in enumerate(idx) if v is not None]
    b = max(idx[p].type.rank for p in pos)
    consecutive = pos == list(range(pos[0], pos[-1] + 1))
    first = pos[0] if consecutive else 0
    shape = L.shape(n.output.type)
    rank = x.type.rank
    xs = L.shape(x.type)

    def f(data, *its):
        from tvm import te, tirx
        ix = dict(zip(pos, its))

        def body(*o):
            bidx = o[first:first + b]
            rest = list(o[:first]) + list(o[first + b:])
            src, r = [], iter(rest)
            for d in range(rank):
                if d in ix:
                    t = ix[d]
                    v = t[_bcast_index(t, bidx, b)].astype("int64")
                    src.append(tirx.Select(v < 0, v + xs[d], v))
                else:
                    src.append(next(r))
            return data[tuple(src)]
        return te.compute(shape, body, name="index")
    return L.emit_te(f, ins[0], *[ins[1 + p] for p in pos], name="index")


def _scatter_src(L, n, data, index, src, reduction):
    rx = L.rx
    ishape = L.shape(index.type)
    upd = L.env[src]
    if L.shape(src.type) != ishape:
        upd = L.emit(rx.op.strided_slice(upd, list(range(len(ishape))), [0] * len(ishape), ishape))
    upd = L.cast(upd, src, _out_dt(n))
    return L.emit(rx.op.scatter_elements(data, L.env[index], upd, axis=_axis(n), reduction=reduction))


@aten("scatter.src", "scatter_add")
def _scatter(L, n, ins):
    red = "add" if n.op == "aten.scatter_add" else "update"
    return _scatter_src(L, n, ins[0], n.inputs[1], n.inputs[2], red)


@aten("scatter.value")
def _scatter_value(L, n, ins):
    rx = L.rx
    dt = _out_dt(n)
    upd = L.emit(rx.op.full(L.shape(n.inputs[1].type), rx.const(n.attrs["value"], dt), dt))
    return L.emit(rx.op.scatter_elements(ins[0], ins[1], upd, axis=_axis(n), reduction="update"))


@aten("scatter_reduce.two")
def _scatter_reduce(L, n, ins):
    red = {"sum": "add", "prod": "mul", "amax": "max", "amin": "min", "mean": "mean"}[n.attrs["reduce"]]
    if not n.attrs["include_self"]:
        raise CodegenError(f"node '{n.name}' (op '{n.op}'): include_self=False has no TVM lowering")
    return _scatter_src(L, n, ins[0], n.inputs[1], n.inputs[2], red)


# ---- layout -------------------------------------------------------------------------------------
@aten("view", "_unsafe_view", "reshape", "view_copy", "squeeze", "squeeze.dim", "squeeze.dims", "unsqueeze",
      "flatten.using_ints", "unflatten.int")
def _reshape(L, n, ins):
    return L.emit(L.rx.op.reshape(ins[0], L.shape(n.output.type)))


@aten("permute", "permute_copy")
def _permute(L, n, ins):
    rank = n.inputs[0].type.rank
    return L.emit(L.rx.op.permute_dims(ins[0], [d % rank for d in n.attrs["dims"]]))


@aten("transpose.int")
def _transpose(L, n, ins):
    rank = n.inputs[0].type.rank
    perm = list(range(rank))
    a, b = n.attrs["dim0"] % rank, n.attrs["dim1"] % rank
    perm[a], perm[b] = perm[b], perm[a]
    return L.emit(L.rx.op.permute_dims(ins[0], perm))


@aten("expand", "expand_copy")
def _expand(L, n, ins):
    return L.emit(L.rx.op.broadcast_to(ins[0], L.shape(n.output.type)))


@aten("cat")
def _cat(L, n, ins):
    dt = _out_dt(n)
    parts = [L.cast(e, v, dt) for e, v in zip(ins, n.inputs) if not (v.type.rank == 1 and v.type.shape[0] == 0)]
    axis = n.attrs["dim"] % n.output.type.rank
    return parts[0] if len(parts) == 1 else L.emit(L.rx.op.concat(parts, axis=axis))


@aten("stack")
def _stack(L, n, ins):
    axis = n.attrs["dim"] % n.output.type.rank
    parts = [L.emit(L.rx.op.expand_dims(L.cast(e, v, _out_dt(n)), axis)) for e, v in zip(ins, n.inputs)]
    return L.emit(L.rx.op.concat(parts, axis=axis))


@aten("split_with_sizes", "split.Tensor", "split_with_sizes_copy", "split_copy.Tensor", "unbind.int", "unbind_copy.int")
def _split(L, n, ins):
    rx = L.rx
    axis = _axis(n)
    sizes = [v.type.shape[axis] if v.type.rank == n.inputs[0].type.rank else 1 for v in n.outputs]
    cuts = list(np.cumsum(sizes[:-1]).tolist())
    parts = L.emit(rx.op.split(ins[0], cuts, axis=axis)) if len(sizes) > 1 else None
    outs = [L.emit(rx.TupleGetItem(parts, i)) for i in range(len(sizes))] if parts is not None else [ins[0]]
    return [L.emit(rx.op.reshape(o, L.shape(v.type))) for o, v in zip(outs, n.outputs)]


def _norm_range(start, end, step, size):
    start = 0 if start is None else start
    end = size if end is None else end
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    return min(max(start, 0), size), min(max(end, 0), size), step


@aten("slice.Tensor", "slice_copy.Tensor", "narrow", "narrow_copy")
def _slice(L, n, ins):
    x = n.inputs[0]
    axis = _axis(n)
    size = x.type.shape[axis]
    a = n.attrs
    if "length" in a:
        start, end, step = a["start"], a["start"] + a["length"], 1
    else:
        start, end, step = a["start"], a["end"], a["step"]
    if not all(isinstance(v, int) or v is None for v in (start, end, size)):
        raise CodegenError(f"node '{n.name}' (op '{n.op}'): a slice with symbolic bounds has no TVM lowering here")
    start, end, step = _norm_range(start, end, step, size)
    if end <= start:
        return L.rx.const(np.zeros([d for d in n.output.type.shape], dtype=_dt(x)), _dt(x))
    return L.emit(L.rx.op.strided_slice(ins[0], [axis], [start], [end], [step]))


@aten("select.int", "select_copy.int")
def _select(L, n, ins):
    x = n.inputs[0]
    axis = _axis(n)
    i = n.attrs["index"]
    i = i + x.type.shape[axis] if i < 0 else i
    s = L.emit(L.rx.op.strided_slice(ins[0], [axis], [i], [i + 1]))
    return L.emit(L.rx.op.reshape(s, L.shape(n.output.type)))


@aten("flip")
def _flip(L, n, ins):
    y = ins[0]
    for d in _axes(n, "dims") if n.attrs["dims"] else []:
        y = L.emit(L.rx.op.flip(y, d))
    return y


@aten("roll")
def _roll(L, n, ins):
    x = n.inputs[0]
    shifts, dims = list(n.attrs["shifts"]), list(n.attrs["dims"])
    rx = L.rx
    if not dims:
        flat = L.emit(rx.op.reshape(ins[0], [-1]))
        rolled = _roll_te(L, flat, [x.type.numel() if x.type.is_static else -1], shifts, [0])
        return L.emit(rx.op.reshape(rolled, L.shape(x.type)))
    return _roll_te(L, ins[0], L.shape(x.type), shifts, [d % x.type.rank for d in dims])


def _roll_te(L, e, shape, shifts, dims):
    def f(t):
        from tvm import te
        sh = {}
        for s, d in zip(shifts, dims):
            sh[d] = sh.get(d, 0) + s

        def body(*i):
            return t[tuple((i[d] - sh[d] % shape[d] + shape[d]) % shape[d] if d in sh else i[d]
                           for d in range(len(shape)))]
        return te.compute(shape, body, name="roll")
    return L.emit_te(f, e, name="roll")


@aten("repeat")
def _repeat(L, n, ins):
    return L.emit(L.rx.op.tile(ins[0], list(n.attrs["repeats"])))


@aten("tril", "triu")
def _tril(L, n, ins):
    f = L.rx.op.tril if n.op == "aten.tril" else L.rx.op.triu
    return L.emit(f(ins[0], n.attrs["diagonal"]))


@aten("diagonal", "diagonal_copy")
def _diagonal(L, n, ins):
    x = n.inputs[0]
    rank = x.type.rank
    off, d1, d2 = n.attrs["offset"], n.attrs["dim1"] % rank, n.attrs["dim2"] % rank
    shape = L.shape(n.output.type)

    def f(t):
        from tvm import te

        def body(*o):
            rest, k = list(o[:-1]), o[-1]
            src, r = [], iter(rest)
            for d in range(rank):
                if d == d1:
                    src.append(k + max(-off, 0))
                elif d == d2:
                    src.append(k + max(off, 0))
                else:
                    src.append(next(r))
            return t[tuple(src)]
        return te.compute(shape, body, name="diagonal")
    return L.emit_te(f, ins[0], name="diagonal")


@aten("sort", "sort.stable")
def _sort(L, n, ins):
    rx = L.rx
    x = n.inputs[0]
    if x.type.rank == 0:
        return [ins[0], rx.const(np.zeros((), "int64"), "int64")]
    axis, desc = _axis(n), n.attrs["descending"]
    idx = L.emit(rx.op.argsort(ins[0], axis=axis, descending=desc, dtype="int64"))
    return [L.emit(rx.op.gather_elements(ins[0], idx, axis=axis)), idx]


@aten("topk")
def _topk(L, n, ins):
    rx = L.rx
    r = L.emit(rx.op.topk(ins[0], k=n.attrs["k"], axis=_axis(n), ret_type="both", largest=n.attrs["largest"],
                          dtype="int64"))
    return [L.emit(rx.TupleGetItem(r, 0)), L.emit(rx.TupleGetItem(r, 1))]


def _pad_te(L, n, ins, src_index):
    """``out[i] = x[src(i)]`` with ``src_index(j, size) -> (index, in_bounds)`` per padded dim; ATen's
    pad list pairs (before, after) starting from the last dim."""
    x = n.inputs[0]
    pad = list(n.attrs["pad"] if "pad" in n.attrs else n.attrs["padding"])
    rank = x.type.rank
    before = {rank - 1 - k: pad[2 * k] for k in range(len(pad) // 2)}
    xs = L.shape(x.type)
    shape = L.shape(n.output.type)
    value = n.attrs.get("value", 0)
    dt = _dt(x)

    def f(t):
        from tvm import te, tirx

        def body(*o):
            idx, ok = [], []
            for d in range(rank):
                if d in before:
                    j, inside = src_index(o[d] - before[d], xs[d])
                    idx.append(j)
                    if inside is not None:
                        ok.append(inside)
                else:
                    idx.append(o[d])
            v = t[tuple(idx)]
            return tirx.Select(tirx.all(*ok), v, tirx.const(value, dt)) if ok else v
        return te.compute(shape, body, name="pad")
    return L.emit_te(f, ins[0], name="pad")


def _constant_src(j, size):
    from tvm import tirx
    inside = tirx.all(j >= 0, j < size)
    return tirx.min(tirx.max(j, 0), size - 1), inside


def _reflect_src(j, size):
    from tvm import tirx
    j = tirx.abs(j)
    return (size - 1) - tirx.abs((size - 1) - j), None


def _replicate_src(j, size):
    from tvm import tirx
    return tirx.min(tirx.max(j, 0), size - 1), None


aten("constant_pad_nd")(lambda L, n, ins: _pad_te(L, n, ins, _constant_src))
aten("reflection_pad1d", "reflection_pad2d", "reflection_pad3d")(lambda L, n, ins: _pad_te(L, n, ins, _reflect_src))
aten("replication_pad1d", "replication_pad2d", "replication_pad3d")(
    lambda L, n, ins: _pad_te(L, n, ins, _replicate_src))


# ---- convolution, pooling, resizing, norms --------------------------------------------------------
_CONV = {(1, False): "conv1d", (2, False): "conv2d", (3, False): "conv3d",
         (1, True): "conv1d_transpose", (2, True): "conv2d_transpose", (3, True): "conv3d_transpose"}


@aten("convolution")
def _convolution(L, n, ins):
    rx = L.rx
    a = n.attrs
    sp = n.inputs[0].type.rank - 2
    name = _CONV.get((sp, bool(a["transposed"])))
    f = getattr(rx.op.nn, name, None) if name else None
    if f is None:
        raise CodegenError(f"node '{n.name}' (op '{n.op}'): {sp}-d {'transposed ' * a['transposed']}"
                           "convolution has no TVM lowering")
    kw = dict(strides=list(a["stride"]), padding=list(a["padding"]), dilation=list(a["dilation"]), groups=a["groups"])
    if a["transposed"]:
        kw["output_padding"] = list(a["output_padding"])
    y = L.emit(f(ins[0], ins[1], **kw))
    if ins[2] is not None:
        y = L.emit(rx.op.add(y, L.emit(rx.op.reshape(ins[2], [1, -1] + [1] * sp))))
    return y


def _pool_args(n, sp):
    a = n.attrs
    k = list(a["kernel_size"]) * (sp if len(a["kernel_size"]) == 1 else 1)
    s = list(a["stride"]) or k
    s = s * (sp if len(s) == 1 else 1)
    p = list(a["padding"]) * (sp if len(a["padding"]) == 1 else 1)
    return k, s, p


@aten("max_pool2d_with_indices", "max_pool3d_with_indices", "max_pool1d", "max_pool2d", "max_pool3d")
def _max_pool(L, n, ins):
    sp = n.inputs[0].type.rank - 2
    batched = sp == len(n.attrs["kernel_size"]) or len(n.attrs["kernel_size"]) == 1
    if not batched:
        raise CodegenError(f"node '{n.name}' (op '{n.op}'): unbatched pooling has no TVM lowering")
    k, s, p = _pool_args(n, sp)
    d = list(n.attrs["dilation"]) * (sp if len(n.attrs["dilation"]) == 1 else 1)
    f = getattr(L.rx.op.nn, f"max_pool{sp}d")
    y = L.emit(f(ins[0], pool_size=k, strides=s, padding=p, dilation=d, ceil_mode=n.attrs["ceil_mode"]))
    return [y] + [None] * (len(n.outputs) - 1)


@aten("avg_pool1d", "avg_pool2d", "avg_pool3d")
def _avg_pool(L, n, ins):
    sp = n.inputs[0].type.rank - 2
    if n.attrs.get("divisor_override") is not None:
        raise CodegenError(f"node '{n.name}' (op '{n.op}'): divisor_override has no TVM lowering")
    k, s, p = _pool_args(n, sp)
    f = getattr(L.rx.op.nn, f"avg_pool{sp}d")
    return L.emit(f(ins[0], pool_size=k, strides=s, padding=p, ceil_mode=n.attrs["ceil_mode"],
                    count_include_pad=n.attrs["count_include_pad"]))


@aten("adaptive_avg_pool1d", "_adaptive_avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool3d",
      "adaptive_avg_pool3d")
def _adaptive_avg(L, n, ins):
    sp = n.inputs[0].type.rank - 2
    f = getattr(L.rx.op.nn, f"adaptive_avg_pool{sp}d")
    return L.emit(f(ins[0], output_size=list(n.attrs["output_size"])))


@aten("upsample_nearest2d.vec", "upsample_nearest2d", "upsample_bilinear2d.vec", "upsample_bilinear2d",
      "_upsample_nearest_exact2d.vec", "_upsample_nearest_exact2d")
def _upsample2d(L, n, ins):
    if n.attrs.get("scale_factors") or n.attrs.get("scales_h") is not None:
        raise CodegenError(f"node '{n.name}' (op '{n.op}'): resizing by scale factors has no TVM lowering "
                           "(ATen maps source pixels by the factor, not the size ratio)")
    size = list(n.output.type.shape[2:])
    if "bilinear" in n.op:
        mode = "align_corners" if n.attrs["align_corners"] else "half_pixel"
        return L.emit(L.rx.op.image.resize2d(ins[0], size, method="linear", coordinate_transformation_mode=mode))
    exact = "exact" in n.op
    return L.emit(L.rx.op.image.resize2d(ins[0], size, method="nearest_neighbor",
                                         coordinate_transformation_mode="half_pixel" if exact else "asymmetric",
                                         rounding_method="round_prefer_ceil" if exact else "floor"))


@aten("native_layer_norm")
def _native_layer_norm(L, n, ins):
    rx = L.rx
    x = n.inputs[0]
    nd = len(n.attrs["normalized_shape"])
    axes = list(range(x.type.rank - nd, x.type.rank))
    dt = _dt(x)
    eps = n.attrs["eps"]
    m = L.emit(rx.op.mean(ins[0], axis=axes, keepdims=True))
    d = L.emit(rx.op.subtract(ins[0], m))
    var = L.emit(rx.op.mean(L.emit(rx.op.multiply(d, d)), axis=axes, keepdims=True))
    rstd = L.emit(rx.op.rsqrt(L.emit(rx.op.add(var, rx.const(eps, dt)))))
    y = L.emit(rx.op.multiply(d, rstd))
    if ins[1] is not None:
        y = L.emit(rx.op.multiply(y, ins[1]))
    if ins[2] is not None:
        y = L.emit(rx.op.add(y, ins[2]))
    return [y, m, rstd]


@aten("native_group_norm")
def _native_group_norm(L, n, ins):
    rx = L.rx
    x = n.inputs[0]
    nb, c, g = n.attrs["N"], n.attrs["C"], n.attrs["group"]
    dt = _dt(x)
    xs = L.shape(x.type)
    grouped = L.emit(rx.op.reshape(ins[0], [nb, g, -1]))
    m = L.emit(rx.op.mean(grouped, axis=[2], keepdims=True))
    d = L.emit(rx.op.subtract(grouped, m))
    var = L.emit(rx.op.mean(L.emit(rx.op.multiply(d, d)), axis=[2], keepdims=True))
    rstd = L.emit(rx.op.rsqrt(L.emit(rx.op.add(var, rx.const(n.attrs["eps"], dt)))))
    y = L.emit(rx.op.reshape(L.emit(rx.op.multiply(d, rstd)), xs))
    cshape = [1, c] + [1] * (len(xs) - 2)
    if ins[1] is not None:
        y = L.emit(rx.op.multiply(y, L.emit(rx.op.reshape(ins[1], cshape))))
    if ins[2] is not None:
        y = L.emit(rx.op.add(y, L.emit(rx.op.reshape(ins[2], cshape))))
    return [y, L.emit(rx.op.reshape(m, [nb, g])), L.emit(rx.op.reshape(rstd, [nb, g]))]


def _batch_norm_apply(L, n, x, mean, var, weight, bias, eps):
    rx = L.rx
    rank = n.inputs[0].type.rank
    cshape = [1, -1] + [1] * (rank - 2)
    dt = _dt(n.inputs[0])
    rstd = L.emit(rx.op.rsqrt(L.emit(rx.op.add(var, rx.const(eps, dt)))))
    y = L.emit(rx.op.multiply(L.emit(rx.op.subtract(x, L.emit(rx.op.reshape(mean, cshape)))),
                              L.emit(rx.op.reshape(rstd, cshape))))
    if weight is not None:
        y = L.emit(rx.op.multiply(y, L.emit(rx.op.reshape(weight, cshape))))
    if bias is not None:
        y = L.emit(rx.op.add(y, L.emit(rx.op.reshape(bias, cshape))))
    return y, rstd


@aten("_native_batch_norm_legit_no_training")
def _batch_norm_eval(L, n, ins):
    y, _ = _batch_norm_apply(L, n, ins[0], ins[3], ins[4], ins[1], ins[2], n.attrs["eps"])
    empty = L.rx.const(np.zeros((0,), _dt(n.inputs[0])), _dt(n.inputs[0]))
    return [y, empty, empty]


# ---- the table, for the docs and tests ----------------------------------------------------------
def lowered_aten_ops() -> list[str]:
    """Every ``aten.*`` op the TVM targets lower natively."""
    return sorted(set(ATEN_LOWERED))
