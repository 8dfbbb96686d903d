"""ONNX elementwise math, activations and reductions, mapped onto presso's ops and the generic
``aten.*`` ops. Each activation is written as ONNX defines it (Softplus = log(exp(x) + 1), Selu =
gamma * elu(x, alpha), ...), so numbers agree with onnxruntime to float rounding.
"""
from __future__ import annotations

from ..errors import FrontendError
from .onnx_table import handles

# ONNX op -> generic ATen op with the same elementwise semantics.
_ATEN_UNARY = {"Floor": "floor", "Ceil": "ceil", "Round": "round", "Sign": "sign", "IsNaN": "isnan",
               "Tan": "tan", "Asin": "asin", "Acos": "acos", "Atan": "atan", "Sinh": "sinh", "Cosh": "cosh",
               "Asinh": "asinh", "Acosh": "acosh", "Atanh": "atanh", "BitwiseNot": "bitwise_not"}
_ATEN_BINARY = {"Xor": "logical_xor", "BitwiseAnd": "bitwise_and.Tensor", "BitwiseOr": "bitwise_or.Tensor",
                "BitwiseXor": "bitwise_xor.Tensor"}

for _o, _a in _ATEN_UNARY.items():
    handles(_o)((lambda a: lambda im: im.aten(a, im.t(0)))(_a))
for _o, _a in _ATEN_BINARY.items():
    handles(_o)((lambda a: lambda im: im.aten(a, im.t(0), im.t(1)))(_a))


@handles("Div")
def _div(im):
    """ONNX integer Div truncates toward zero (as C does); presso's ``div`` is true division."""
    a, b = im.t(0), im.t(1)
    if a.type.dtype.torch.is_floating_point:
        return im.op("div", a, b)
    return im.aten("div.Tensor_mode", a, b, rounding_mode="trunc")


@handles("Pow")
def _pow(im):
    """Pow's result has the base's type even when the exponent's differs."""
    a, b = im.t(0), im.t(1)
    out = im.op("pow", a, b)
    return out if out.type.dtype == a.type.dtype else im.op("cast", out, dtype=a.type.dtype.value)


@handles("Mod")
def _mod(im):
    """fmod=1: C fmod (sign of the dividend); fmod=0: integer modulo with the divisor's sign."""
    op = "fmod.Tensor" if im.attr("fmod", 0) else "remainder.Tensor"
    return im.aten(op, im.t(0), im.t(1))


@handles("IsInf")
def _isinf(im):
    x = im.t(0)
    pos, neg = im.attr("detect_positive", 1), im.attr("detect_negative", 1)
    inf = im.aten("isinf", x)
    if pos and neg:
        return inf
    if not pos and not neg:
        return im.op("logical_and", inf, im.op("logical_not", inf))
    sign = im.op("gt" if pos else "lt", x, im.like(0, x))
    return im.op("logical_and", inf, sign)


@handles("Sum", "Mean")
def _sum(im):
    xs = [im.t(i) for i in range(len(im.node.input))]
    out = xs[0]
    for x in xs[1:]:
        out = im.op("add", out, x)
    if im.node.op_type == "Mean" and len(xs) > 1:
        out = im.op("div", out, im.like(len(xs), out))
    return out


# ---- activations -------------------------------------------------------------------------
@handles("LeakyRelu")
def _leaky_relu(im):
    return im.aten("leaky_relu", im.t(0), negative_slope=float(im.attr("alpha", 0.01)))


@handles("Elu")
def _elu(im):
    return im.aten("elu", im.t(0), alpha=float(im.attr("alpha", 1.0)))


@handles("Selu")
def _selu(im):
    return im.aten("elu", im.t(0), alpha=float(im.attr("alpha", 1.67326319217681884765625)),
                   scale=float(im.attr("gamma", 1.05070102214813232421875)))


@handles("Celu")
def _celu(im):
    alpha = float(im.attr("alpha", 1.0))
    return im.aten("elu", im.t(0), alpha=alpha, input_scale=1.0 / alpha)


@handles("ThresholdedRelu")
def _thresholded_relu(im):
    x = im.t(0)
    return im.op("where", im.op("gt", x, im.like(im.attr("alpha", 1.0), x)), x, im.like(0, x))


def _hard_sigmoid(im, x, alpha, beta):
    y = im.op("add", im.op("mul", x, im.like(alpha, x)), im.like(beta, x))
    return im.aten("hardtanh", y, min_val=0.0, max_val=1.0)


@handles("HardSigmoid")
def _hardsigmoid(im):
    return _hard_sigmoid(im, im.t(0), im.attr("alpha", 0.2), im.attr("beta", 0.5))


@handles("HardSwish")
def _hardswish(im):
    x = im.t(0)
    return im.op("mul", x, _hard_sigmoid(im, x, 1.0 / 6, 0.5))


def _softplus(im, x):
    return im.op("log", im.op("add", im.op("exp", x), im.like(1, x)))


@handles("Softplus")
def _softplus_h(im):
    return _softplus(im, im.t(0))


@handles("Softsign")
def _softsign(im):
    x = im.t(0)
    return im.op("div", x, im.op("add", im.op("abs", x), im.like(1, x)))


@handles("Mish")
def _mish(im):
    x = im.t(0)
    return im.op("mul", x, im.op("tanh", _softplus(im, x)))


@handles("PRelu")
def _prelu(im):
    """Slope broadcasts to x numpy-style; a 1-D slope of x's channel count that does not (opset < 7
    models: one slope per channel) is laid along dim 1."""
    x, slope = im.t(0), im.t(1)
    if slope.type.rank == 1 and x.type.rank > 2 and slope.type.shape[0] == x.type.shape[1] \
            and slope.type.shape[0] not in (1, x.type.shape[-1]):
        slope = im.op("reshape", slope, shape=[slope.type.shape[0]] + [1] * (x.type.rank - 2))
    return im.op("where", im.op("lt", x, im.like(0, x)), im.op("mul", x, slope), x)


@handles("Shrink")
def _shrink(im):
    x = im.t(0)
    lambd, bias = im.attr("lambd", 0.5), im.attr("bias", 0.0)
    zero = im.like(0, x)
    hi = im.op("where", im.op("gt", x, im.like(lambd, x)), im.op("sub", x, im.like(bias, x)), zero)
    return im.op("where", im.op("lt", x, im.like(-lambd, x)), im.op("add", x, im.like(bias, x)), hi)


@handles("LogSoftmax")
def _log_softmax(im):
    x = im.t(0)
    return im.aten("_log_softmax", x, dim=im.axis(im.attr("axis", -1), x.type.rank), half_to_float=False)


@handles("Hardmax")
def _hardmax(im):
    """1 at the first maximum along ``axis``, 0 elsewhere."""
    x = im.t(0)
    axis = im.axis(im.attr("axis", -1), x.type.rank)
    idx = im.aten("argmax", x, dim=axis, keepdim=True)
    zeros = im.op("mul", x, im.like(0, x))
    ones = im.op("add", im.aten("slice.Tensor", zeros, dim=axis, start=0, end=1), im.like(1, x))
    return im.aten("scatter.src", zeros, idx, ones, dim=axis)


# ---- reductions --------------------------------------------------------------------------
def _reduce_axes(im, x):
    """(axes, keepdim) of a Reduce* node, or None when it reduces nothing (noop_with_empty_axes)."""
    axes = im.attr("axes")
    if axes is None:
        axes = im.ints(1, "axes")
    if not axes:
        if im.attr("noop_with_empty_axes", 0):
            return None
        axes = list(range(x.type.rank))
    return sorted({im.axis(a, x.type.rank, "axes") for a in axes}), bool(im.attr("keepdims", 1))


@handles("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
         "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
def _reduce(im):
    x = im.t(0)
    red = _reduce_axes(im, x)
    if red is None:
        return x
    axes, keep = red
    op = im.node.op_type
    if x.type.rank == 0:
        return x
    if op in ("ReduceMean", "ReduceSum", "ReduceMax") and x.type.dtype.torch.is_floating_point:
        return im.op({"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max"}[op],
                     x, axes=axes, keepdim=keep)
    dt = x.type.dtype.value

    def total(v):
        return im.aten("sum.dim_IntList", v, dim=axes, keepdim=keep, dtype=dt)

    if op == "ReduceSum":
        return total(x)
    if op == "ReduceMean":
        return im.aten("mean.dim", x, dim=axes, keepdim=keep)
    if op in ("ReduceMax", "ReduceMin"):
        return im.aten("amax" if op == "ReduceMax" else "amin", x, dim=axes, keepdim=keep)
    if op == "ReduceProd":
        out = x
        for a in reversed(axes):
            out = im.aten("prod.dim_int", out, dim=a, keepdim=keep, dtype=dt)
        return out
    if op == "ReduceL1":
        return total(im.op("abs", x))
    if op == "ReduceSumSquare":
        return total(im.op("mul", x, x))
    if op == "ReduceL2":
        return im.op("sqrt", total(im.op("mul", x, x)))
    if op == "ReduceLogSum":
        return im.op("log", total(x))
    m = im.aten("amax", x, dim=axes, keepdim=True)   # log-sum-exp shifted by the max, as ONNX's reference
    out = im.op("add", im.op("log", total_keep(im, im.op("exp", im.op("sub", x, m)), axes)), m)
    return out if keep else im.op("reshape", out, shape=[d for i, d in enumerate(out.type.shape) if i not in axes])


def total_keep(im, v, axes):
    return im.aten("sum.dim_IntList", v, dim=axes, keepdim=True, dtype=v.type.dtype.value)


@handles("ArgMax", "ArgMin")
def _argmax(im):
    x = im.t(0)
    axis = im.axis(im.attr("axis", 0), x.type.rank)
    keep = bool(im.attr("keepdims", 1))
    op = "argmax" if im.node.op_type == "ArgMax" else "argmin"
    if not im.attr("select_last_index", 0):
        return im.aten(op, x, dim=axis, keepdim=keep)
    n = x.type.shape[axis]
    if not isinstance(n, int):
        raise FrontendError(f"{im.where}: select_last_index over symbolic dim '{n}' is not supported")
    idx = im.aten(op, im.aten("flip", x, dims=[axis]), dim=axis, keepdim=keep)
    return im.op("sub", im.like(n - 1, idx), idx)


@handles("CumSum")
def _cumsum(im):
    """exclusive: shift by one along the axis (pad a zero in front, drop the last) before summing."""
    x = im.t(0)
    axis = im.axis(int(im.ints(1, "CumSum's axis")[0]), x.type.rank)
    rev = im.attr("reverse", 0)
    if rev:
        x = im.aten("flip", x, dims=[axis])
    if im.attr("exclusive", 0):
        pad = [0, 0] * (x.type.rank - 1 - axis) + [1, 0]
        x = im.aten("constant_pad_nd", x, pad=pad, value=0)
        x = im.op("slice", x, axis=axis, start=0, end=x.type.shape[axis] - 1 if isinstance(x.type.shape[axis], int)
                  else -1, step=1)
    out = im.aten("cumsum", x, dim=axis, dtype=x.type.dtype.value)
    return im.aten("flip", out, dims=[axis]) if rev else out
