"""ONNX convolutions, pools, normalizations, Gemm, LRN and Pad.

2-D convolutions stay presso's ``conv2d`` (what the passes match); 1-D/3-D and transposed ones are
``aten.convolution``. Padding torch cannot express in the op itself (asymmetric, SAME_*, more than
half a kernel) is applied first with ``aten.constant_pad_nd`` or, for a transposed convolution,
cut from the result, so every case is computed exactly as ONNX defines it.
"""
from __future__ import annotations

import math

import torch

from ..errors import FrontendError
from ..ir.types import dims_product
from .onnx_table import handles


def _spatial(im, x, n):
    shape = x.type.shape[2:]
    if len(shape) != n or not all(isinstance(d, int) for d in shape):
        if im.attr("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
            raise FrontendError(f"{im.where}: auto_pad SAME_* needs static spatial dims, got {x.type}")
    return list(shape)


def _pads(im, x, kernel, strides, dilations):
    """ONNX ``pads`` as (begin, end) lists, resolving auto_pad."""
    n = len(kernel)
    auto = im.attr("auto_pad", b"NOTSET")
    if auto in (b"SAME_UPPER", b"SAME_LOWER"):
        sizes = _spatial(im, x, n)
        begin, end = [], []
        for d, k, s, dl in zip(sizes, kernel, strides, dilations):
            total = max(0, (math.ceil(d / s) - 1) * s + (k - 1) * dl + 1 - d)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == b"SAME_UPPER" else big)
            end.append(big if auto == b"SAME_UPPER" else small)
        return begin, end
    if auto == b"VALID":
        return [0] * n, [0] * n
    if auto != b"NOTSET":
        raise FrontendError(f"{im.where}: auto_pad {auto.decode()!r} is not one of NOTSET, SAME_UPPER, "
                            "SAME_LOWER, VALID")
    pads = list(im.attr("pads", [0] * (2 * n)))
    return pads[:n], pads[n:]


def pad_nd(im, x, begin, end, value=0.0):
    """Pad the trailing ``len(begin)`` dims (negative = crop) with a constant."""
    if not any(begin) and not any(end):
        return x
    pad = []
    for b, e in zip(reversed(begin), reversed(end)):
        pad += [b, e]
    return im.aten("constant_pad_nd", x, pad=pad, value=value)


@handles("Conv")
def _conv(im):
    x, w = im.t(0), im.t(1)
    n = w.type.rank - 2
    if n not in (1, 2, 3):
        im.unsupported(f"Conv with {n} spatial dims (1, 2 or 3 are supported)")
    kernel = list(w.type.shape[2:])
    strides = list(im.attr("strides", [1] * n))
    dil = list(im.attr("dilations", [1] * n))
    begin, end = _pads(im, x, kernel, strides, dil)
    if begin != end:
        x, begin = pad_nd(im, x, begin, end), [0] * n
    groups = im.attr("group", 1)
    if n == 2:
        return im.op("conv2d", x, w, im.t(2), stride=strides, padding=begin, dilation=dil, groups=groups)
    return im.aten("convolution", x, w, im.t(2), stride=strides, padding=begin, dilation=dil, transposed=False,
                   output_padding=[0] * n, groups=groups)


@handles("ConvTranspose")
def _conv_transpose(im):
    x, w = im.t(0), im.t(1)
    n = w.type.rank - 2
    if n not in (1, 2, 3):
        im.unsupported(f"ConvTranspose with {n} spatial dims (1, 2 or 3 are supported)")
    kernel = list(w.type.shape[2:])
    strides = list(im.attr("strides", [1] * n))
    dil = list(im.attr("dilations", [1] * n))
    out_pad = list(im.attr("output_padding", [0] * n))
    out_shape = im.attr("output_shape")
    auto = im.attr("auto_pad", b"NOTSET")
    if out_shape is not None or auto in (b"SAME_UPPER", b"SAME_LOWER"):
        sizes = _spatial(im, x, n)
        want = list(out_shape)[-n:] if out_shape is not None else [d * s for d, s in zip(sizes, strides)]
        begin, end = [], []
        for d, k, s, dl, op, o in zip(sizes, kernel, strides, dil, out_pad, want):
            total = s * (d - 1) + op + (k - 1) * dl + 1 - o
            if total < 0:   # a larger output than the kernel covers: extra zero rows at the end
                out_pad[len(begin)] = op - total
                total = 0
            small, big = total // 2, total - total // 2   # the ONNX spec: SAME_UPPER puts the odd one last
            begin.append(small if auto == b"SAME_UPPER" else big)
            end.append(big if auto == b"SAME_UPPER" else small)
    else:
        pads = list(im.attr("pads", [0] * (2 * n)))
        begin, end = pads[:n], pads[n:]
    sym = begin == end
    y = im.aten("convolution", x, w, im.t(2), stride=strides, padding=begin if sym else [0] * n, dilation=dil,
                transposed=True, output_padding=out_pad, groups=im.attr("group", 1))
    if not sym:
        y = pad_nd(im, y, [-b for b in begin], [-e for e in end])
    return y


# ---- pools -------------------------------------------------------------------------------
def _to_2d(im, x):
    """[N, C, L] -> [N, C, 1, L] so that 1-D pools run as 2-D ones."""
    s = list(x.type.shape)
    return im.op("reshape", x, shape=s[:2] + [1] + s[2:])


@handles("MaxPool", "AveragePool", "LpPool")
def _pool(im):
    x = im.t(0)
    op = im.node.op_type
    kernel = list(im.attr("kernel_shape"))
    n = len(kernel)
    if n not in (1, 2, 3) or x.type.rank != n + 2:
        im.unsupported(f"{op} with {n} spatial dims on a rank-{x.type.rank} input (1, 2 or 3 are supported)")
    strides = list(im.attr("strides", [1] * n))
    dil = list(im.attr("dilations", [1] * n))
    begin, end = _pads(im, x, kernel, strides, dil)
    ceil = bool(im.attr("ceil_mode", 0))
    if op == "MaxPool" and im.attr("storage_order", 0) and len(im.node.output) > 1 and im.node.output[1]:
        im.unsupported("MaxPool with storage_order=1 indices")
    one_d = n == 1
    if one_d:
        x = _to_2d(im, x)
        kernel, strides, dil, begin, end = [1] + kernel, [1] + strides, [1] + dil, [0] + begin, [0] + end
    nd = len(kernel)
    if op == "LpPool":
        p = im.attr("p", 2)
        if any(d != 1 for d in dil):
            im.unsupported("LpPool with dilations")
        xp = pad_nd(im, im.op("pow", im.op("abs", x), im.like(p, x)), begin, end)
        pool = "avg_pool2d" if nd == 2 else "avg_pool3d"
        s = im.aten(pool, xp, kernel_size=kernel, stride=strides, ceil_mode=ceil)
        s = im.op("mul", s, im.like(math.prod(kernel), s))
        out = im.op("pow", s, im.like(1.0 / p, s))
    elif op == "MaxPool":
        fits = begin == end and all(2 * b <= k for b, k in zip(begin, kernel))
        if not fits:
            x = pad_nd(im, x, begin, end, value=float("-inf") if x.type.dtype.torch.is_floating_point
                       else int(torch.iinfo(x.type.dtype.torch).min))
            begin = [0] * nd
        plain = nd == 2 and not ceil and all(d == 1 for d in dil) and not one_d
        if plain and not (len(im.node.output) > 1 and im.node.output[1]):
            return [im.op("max_pool2d", x, kernel=kernel, stride=strides, padding=begin), None]
        name = "max_pool2d_with_indices" if nd == 2 else "max_pool3d_with_indices"
        out, idx = im.aten_n(name, x, kernel_size=kernel, stride=strides, padding=begin, dilation=dil, ceil_mode=ceil)
        if len(im.node.output) > 1 and im.node.output[1]:
            if not fits or one_d:
                im.unsupported("MaxPool's Indices output with padding torch cannot express, or on 1-D input")
            idx = _flat_indices(im, idx, x)
            return [out, idx]
    else:
        if any(d != 1 for d in dil):
            im.unsupported("AveragePool with dilations")
        include = bool(im.attr("count_include_pad", 0))
        pool = "avg_pool2d" if nd == 2 else "avg_pool3d"
        fits = begin == end and all(2 * b <= k for b, k in zip(begin, kernel))
        if fits and nd == 2 and not ceil and not one_d and (include or not any(begin)):
            return im.op("avg_pool2d", x, kernel=kernel, stride=strides, padding=begin)
        if fits:
            out = im.aten(pool, x, kernel_size=kernel, stride=strides, padding=begin, ceil_mode=ceil,
                          count_include_pad=include)
        else:
            xp = pad_nd(im, x, begin, end)
            out = im.aten(pool, xp, kernel_size=kernel, stride=strides, ceil_mode=ceil)
            if not include:    # average over the real elements only: sum / count
                ones = im.op("add", im.op("mul", x, im.like(0, x)), im.like(1, x))
                cnt = im.aten(pool, pad_nd(im, ones, begin, end), kernel_size=kernel, stride=strides, ceil_mode=ceil)
                out = im.op("div", out, cnt)
    if one_d:
        s = list(out.type.shape)
        out = im.op("reshape", out, shape=s[:2] + s[3:])
    return [out, None] if op == "MaxPool" else out


def _flat_indices(im, idx, x):
    """torch's per-plane indices -> ONNX's indices into the flattened input tensor."""
    nc, plane = x.type.shape[:2], x.type.shape[2:]
    if not all(isinstance(d, int) for d in list(nc) + list(plane)):
        im.unsupported("MaxPool's Indices output with symbolic dims")
    off = torch.arange(nc[0] * nc[1], dtype=torch.int64).reshape(nc[0], nc[1], *[1] * len(plane)) * math.prod(plane)
    return im.op("add", idx, im.b.const("pool_offsets", off))


@handles("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(im):
    x = im.t(0)
    axes = list(range(2, x.type.rank))
    if im.node.op_type == "GlobalAveragePool":
        return im.op("reduce_mean", x, axes=axes, keepdim=True)
    return im.aten("amax", x, dim=axes, keepdim=True)


@handles("GlobalLpPool")
def _global_lp(im):
    x = im.t(0)
    p = im.attr("p", 2)
    s = im.aten("sum.dim_IntList", im.op("pow", im.op("abs", x), im.like(p, x)), dim=list(range(2, x.type.rank)),
                keepdim=True)
    return im.op("pow", s, im.like(1.0 / p, s))


# ---- normalizations ----------------------------------------------------------------------
@handles("BatchNormalization")
def _batch_norm(im):
    if im.attr("training_mode", 0):
        im.unsupported("BatchNormalization with training_mode=1")
    x = im.t(0)
    out = im.aten_n("_native_batch_norm_legit_no_training", x, im.t(1), im.t(2), im.t(3), im.t(4),
                    momentum=float(im.attr("momentum", 0.9)), eps=float(im.attr("epsilon", 1e-5)))[0]
    return [out] + [None] * (len(im.node.output) - 1)


def _group_norm(im, x, scale, bias, groups, eps):
    n, c = x.type.shape[:2]
    hw = dims_product(x.type.shape[2:]) if x.type.rank > 2 else 1
    return im.aten_n("native_group_norm", x, scale, bias, N=n, C=c, HxW=hw, group=groups, eps=float(eps))[0]


@handles("InstanceNormalization")
def _instance_norm(im):
    x = im.t(0)
    return _group_norm(im, x, im.t(1), im.t(2), x.type.shape[1], im.attr("epsilon", 1e-5))


@handles("GroupNormalization")
def _group_norm_h(im):
    """Opset 18 gives scale/bias per group, opset 21 per channel; per group is spread to channels."""
    x, scale, bias = im.t(0), im.t(1), im.t(2)
    g = im.attr("num_groups")
    c = x.type.shape[1]
    if scale.type.shape[0] != c:
        per = c // g
        scale = im.op("reshape", im.op("expand", im.op("reshape", scale, shape=[g, 1]), shape=[g, per]), shape=[c])
        bias = im.op("reshape", im.op("expand", im.op("reshape", bias, shape=[g, 1]), shape=[g, per]), shape=[c])
    return _group_norm(im, x, scale, bias, g, im.attr("epsilon", 1e-5))


@handles("MeanVarianceNormalization")
def _mvn(im):
    x = im.t(0)
    axes = sorted(im.axis(a, x.type.rank, "axes") for a in im.attr("axes", [0, 2, 3]))
    mean = im.op("reduce_mean", x, axes=axes, keepdim=True)
    d = im.op("sub", x, mean)
    var = im.op("reduce_mean", im.op("mul", d, d), axes=axes, keepdim=True)
    return im.op("div", d, im.op("sqrt", im.op("add", var, im.like(1e-9, var))))


@handles("LRN")
def _lrn(im):
    """y = x / (bias + alpha/size * sum of x^2 over a window of ``size`` channels)^beta; the window
    sum is an average pool over the channel axis of [N, 1, C, rest] (count includes the zero pad)."""
    x = im.t(0)
    size = im.attr("size")
    alpha, beta, bias = im.attr("alpha", 1e-4), im.attr("beta", 0.75), im.attr("bias", 1.0)
    s = list(x.type.shape)
    rest = dims_product(s[2:]) if len(s) > 2 else 1
    sq = im.op("reshape", im.op("mul", x, x), shape=[s[0], 1, s[1], rest])
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = im.aten("constant_pad_nd", sq, pad=[0, 0, lo, hi], value=0.0)
    avg = im.aten("avg_pool2d", sq, kernel_size=[size, 1], stride=[1, 1])
    avg = im.op("reshape", avg, shape=s)
    den = im.op("pow", im.op("add", im.op("mul", avg, im.like(alpha, x)), im.like(bias, x)), im.like(beta, x))
    return im.op("div", x, den)


# ---- Gemm --------------------------------------------------------------------------------
@handles("Gemm")
def _gemm(im):
    """alpha * A' B' + beta * C; with alpha = beta = 1 and B transposed it is presso's ``linear``."""
    a, b, c = im.t(0), im.t(1), im.t(2)
    alpha, beta = float(im.attr("alpha", 1.0)), float(im.attr("beta", 1.0))
    if im.attr("transA", 0):
        a = im.op("transpose", a, perm=[1, 0])
    if im.attr("transB", 0):
        if alpha == 1.0 and beta == 1.0:
            return im.op("linear", a, b, c)
        out = im.op("linear", a, b, None)
    else:
        out = im.op("matmul", a, b)
    if alpha != 1.0:
        out = im.op("mul", out, im.like(alpha, out))
    if c is None or beta == 0.0:
        return out
    if beta != 1.0:
        c = im.op("mul", c, im.like(beta, c))
    return im.op("add", out, c)


# ---- Pad ---------------------------------------------------------------------------------
@handles("Pad")
def _pad(im):
    x = im.t(0)
    r = x.type.rank
    mode = im.attr("mode", b"constant").decode()
    pads = im.attr("pads")
    if pads is None:
        pads = im.ints(1, "Pad's pads")
    pads = list(pads)
    axes = im.ints(3, "Pad's axes") if im.has(3) else list(range(r))
    axes = [im.axis(a, r, "axes") for a in axes]
    begin, end = [0] * r, [0] * r
    for k, a in enumerate(axes):
        begin[a], end[a] = pads[k], pads[k + len(axes)]
    if mode == "constant":
        value = im.attr("value", 0.0)
        if im.has(2):
            value = im.c(2, "Pad's constant_value").reshape(-1)[0].item()
        return pad_nd(im, x, begin, end, value=value)
    if mode not in ("reflect", "edge", "wrap"):
        raise FrontendError(f"{im.where}: Pad mode '{mode}' is not one of constant, reflect, edge, wrap")
    crop_b, crop_e = [min(b, 0) for b in begin], [min(e, 0) for e in end]
    x = pad_nd(im, x, crop_b, crop_e)
    for a in range(r):
        b, e = max(begin[a], 0), max(end[a], 0)
        if not b and not e:
            continue
        d = x.type.shape[a]
        if not isinstance(d, int):
            raise FrontendError(f"{im.where}: Pad mode '{mode}' on symbolic dim '{d}' is not supported")
        parts = []
        if b:
            parts.append(_pad_part(im, x, a, d, b, mode, front=True))
        parts.append(x)
        if e:
            parts.append(_pad_part(im, x, a, d, e, mode, front=False))
        x = im.g.add_node("concat", parts, {"axis": a}).output
    return x


def _pad_part(im, x, a, d, n, mode, front):
    def sl(start, stop):
        return im.op("slice", x, axis=a, start=start, end=stop, step=1)
    if mode == "edge":
        edge = sl(0, 1) if front else sl(d - 1, d)
        shape = list(edge.type.shape)
        shape[a] = n
        return im.op("expand", edge, shape=shape)
    if mode == "wrap":
        if n > d:
            raise FrontendError(f"{im.where}: Pad mode 'wrap' by {n} on a dim of size {d}")
        return sl(d - n, d) if front else sl(0, n)
    if n >= d:
        raise FrontendError(f"{im.where}: Pad mode 'reflect' by {n} needs a dim larger than that, got {d}")
    part = sl(1, n + 1) if front else sl(d - 1 - n, d - 1)
    return im.aten("flip", part, dims=[a])
