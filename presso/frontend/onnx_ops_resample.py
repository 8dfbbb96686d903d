"""ONNX Resize (and Upsample, which the version converter turns into it), TopK, quantization and
the opset-23 RMSNormalization.

Resize is separable: each resized axis is resampled on its own, by gathering source rows from an
index table computed at import (the ONNX spec's coordinate transformation and rounding, in
float64) and, for linear/cubic modes, summing the gathered rows with per-row weights. So every
``coordinate_transformation_mode`` and ``nearest_mode`` is exact, not approximated by the few
modes torch's upsampling kernels implement.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import FrontendError
from .onnx_table import _dtype, handles


def _source_coords(mode, out_len, in_len, scale, roi_lo=0.0, roi_hi=1.0):
    o = np.arange(out_len, dtype=np.float64)
    if mode == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if out_len > 1 else np.zeros_like(o)
    if mode == "align_corners":
        return o * (in_len - 1) / (out_len - 1) if out_len > 1 else np.zeros_like(o)
    if mode == "asymmetric":
        return o / scale
    if mode == "tf_half_pixel_for_nn":
        return (o + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adj = out_len / (scale * in_len)
        center = in_len / 2
        return center * (1 - adj) + (o + 0.5) / scale - 0.5
    if mode == "tf_crop_and_resize":
        if out_len > 1:
            return roi_lo * (in_len - 1) + o * (roi_hi - roi_lo) * (in_len - 1) / (out_len - 1)
        return np.full_like(o, 0.5 * (roi_lo + roi_hi) * (in_len - 1))
    raise ValueError(mode)


def _nearest(x, mode):
    if mode == "round_prefer_floor":
        return np.where(x - np.floor(x) == 0.5, np.floor(x), np.round(x))
    if mode == "round_prefer_ceil":
        return np.where(x - np.floor(x) == 0.5, np.ceil(x), np.round(x))
    if mode == "floor":
        return np.floor(x)
    if mode == "ceil":
        return np.ceil(x)
    raise ValueError(mode)


def _cubic_weights(t, a):
    """The 4 cubic-convolution weights for fractional offset t (taps at -1, 0, 1, 2)."""
    def w(d):
        d = np.abs(d)
        return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                        np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))
    return [w(t + 1), w(t), w(1 - t), w(2 - t)]


def _taps(im, mode, coords, in_len):
    """[(index table, weight table or None), ...] whose weighted sum resamples one axis."""
    if mode == "nearest":
        idx = np.clip(_nearest(coords, im.attr("nearest_mode", b"round_prefer_floor").decode()), 0, in_len - 1)
        return [(idx.astype(np.int64), None)]
    if mode == "linear":
        c = np.clip(coords, 0, in_len - 1)
        lo = np.floor(c)
        t = c - lo
        hi = np.minimum(lo + 1, in_len - 1)
        return [(lo.astype(np.int64), 1 - t), (hi.astype(np.int64), t)]
    a = im.attr("cubic_coeff_a", -0.75)
    base = np.floor(coords)
    t = coords - base
    ws = _cubic_weights(t, a)
    taps = [base + k for k in (-1, 0, 1, 2)]
    if im.attr("exclude_outside", 0):
        ws = [np.where((p >= 0) & (p <= in_len - 1), w, 0.0) for p, w in zip(taps, ws)]
        total = sum(ws)
        ws = [w / total for w in ws]
    return [(np.clip(p, 0, in_len - 1).astype(np.int64), w) for p, w in zip(taps, ws)]


def _resample_axis(im, x, axis, taps):
    shape = [1] * x.type.rank
    out = None
    for k, (idx, w) in enumerate(taps):
        g = im.op("gather", x, im.b.const(f"resize_index{axis}_{k}", torch.from_numpy(idx)), axis=axis)
        if w is not None:
            shape[axis] = len(w)
            wt = torch.from_numpy(w.reshape(shape)).to(x.type.dtype.torch)
            g = im.op("mul", g, im.b.const(f"resize_weight{axis}_{k}", wt))
        out = g if out is None else im.op("add", out, g)
    return out


@handles("Resize")
def _resize(im):
    x = im.t(0)
    r = x.type.rank
    shape = list(x.type.shape)
    mode = im.attr("mode", b"nearest").decode()
    ctm = im.attr("coordinate_transformation_mode", b"half_pixel").decode()
    if mode not in ("nearest", "linear", "cubic"):
        raise FrontendError(f"{im.where}: Resize mode '{mode}' is not one of nearest, linear, cubic")
    if im.attr("antialias", 0):
        im.unsupported("Resize with antialias=1")
    if im.attr("keep_aspect_ratio_policy", b"stretch") != b"stretch":
        im.unsupported("Resize with keep_aspect_ratio_policy other than 'stretch'")
    axes = [im.axis(a, r, "axes") for a in im.attr("axes", list(range(r)))]
    roi = im.c(1, "Resize's roi") if im.has(1) else None
    scales = im.c(2, "Resize's scales") if im.has(2) else None
    sizes = im.ints(3, "Resize's sizes") if im.has(3) else None
    scales = [float(s) for s in scales.reshape(-1).tolist()] if scales is not None and scales.numel() else None
    if not all(isinstance(shape[a], int) for a in axes):
        raise FrontendError(f"{im.where}: Resize of symbolic dims {x.type} is not supported")
    if sizes:
        outs = dict(zip(axes, sizes))
        sc = {a: outs[a] / shape[a] for a in axes}
    elif scales:
        sc = dict(zip(axes, scales))
        outs = {a: int(math.floor(shape[a] * sc[a])) for a in axes}
    else:
        raise FrontendError(f"{im.where}: Resize needs scales or sizes")
    rois = roi.reshape(-1).double().tolist() if roi is not None and roi.numel() else None
    for k, a in enumerate(axes):
        if outs[a] == shape[a] and sc[a] == 1.0 and ctm != "tf_crop_and_resize":
            continue
        lo, hi = (rois[k], rois[k + len(axes)]) if rois and ctm == "tf_crop_and_resize" else (0.0, 1.0)
        try:
            coords = _source_coords(ctm, outs[a], shape[a], sc[a], lo, hi)
            taps = _taps(im, mode, coords, shape[a])
        except ValueError as e:
            raise FrontendError(f"{im.where}: unknown Resize mode value {e}") from None
        if ctm == "tf_crop_and_resize":
            im.unsupported("Resize with coordinate_transformation_mode tf_crop_and_resize")
        x = _resample_axis(im, x, a, taps)
    return x


@handles("TopK")
def _topk(im):
    x = im.t(0)
    k = int(im.ints(1, "TopK's k")[0])
    axis = im.axis(im.attr("axis", -1), x.type.rank)
    vals, idx = im.aten_n("topk", x, k=k, dim=axis, largest=bool(im.attr("largest", 1)),
                          sorted=bool(im.attr("sorted", 1)))
    return [vals, idx]


@handles("CastLike")
def _cast_like(im):
    x, like = im.t(0), im.t(1)
    return x if x.type.dtype == like.type.dtype else im.op("cast", x, dtype=like.type.dtype.value)


def _per_axis(im, v, x, axis):
    """A per-tensor (0-d / 1-element) or per-axis (1-D) quantization parameter, broadcastable to x."""
    if v.type.rank == 1 and v.type.shape[0] != 1:
        shape = [1] * x.type.rank
        shape[axis] = v.type.shape[0]
        return im.op("reshape", v, shape=shape)
    return v


@handles("DequantizeLinear")
def _dequantize_linear(im):
    x, scale = im.t(0), im.t(1)
    if im.attr("block_size", 0):
        im.unsupported("DequantizeLinear with block_size")
    axis = im.axis(im.attr("axis", 1), max(x.type.rank, 1)) if x.type.rank else 0
    scale = _per_axis(im, scale, x, axis)
    xf = im.op("cast", x, dtype=scale.type.dtype.value)
    if im.has(2):
        zp = im.op("cast", _per_axis(im, im.t(2), x, axis), dtype=scale.type.dtype.value)
        xf = im.op("sub", xf, zp)
    return im.op("mul", xf, scale)


_QRANGE = {"u8": (0, 255), "i8": (-128, 127), "u16": (0, 65535), "i16": (-32768, 32767), "i32": (-2 ** 31, 2 ** 31 - 1)}


@handles("QuantizeLinear")
def _quantize_linear(im):
    """q = saturate(round_half_even(x / scale) + zero_point), in the zero point's type (u8 without)."""
    x, scale = im.t(0), im.t(1)
    if im.attr("block_size", 0):
        im.unsupported("QuantizeLinear with block_size")
    axis = im.axis(im.attr("axis", 1), max(x.type.rank, 1)) if x.type.rank else 0
    scale = _per_axis(im, scale, x, axis)
    out_dt = im.t(2).type.dtype.value if im.has(2) else (
        _dtype(im.attr("output_dtype"), im.where).value if im.attr("output_dtype") else "u8")
    if out_dt not in _QRANGE:
        im.unsupported(f"QuantizeLinear to {out_dt}")
    q = im.aten("round", im.op("div", x, scale if scale.type.dtype == x.type.dtype else
                               im.op("cast", scale, dtype=x.type.dtype.value)))
    if im.has(2):
        q = im.op("add", q, im.op("cast", _per_axis(im, im.t(2), x, axis), dtype=x.type.dtype.value))
    lo, hi = _QRANGE[out_dt]
    q = im.aten("hardtanh", q, min_val=float(lo), max_val=float(hi))
    return im.op("cast", q, dtype=out_dt)


@handles("RMSNormalization")
def _rms_norm(im):
    x = im.t(0)
    axis = im.axis(im.attr("axis", -1), x.type.rank)
    return im.op("rms_norm", x, im.t(1), eps=float(im.attr("epsilon", 1e-5)), ndim=x.type.rank - axis)


@handles("LpNormalization")
def _lp_norm(im):
    x = im.t(0)
    axis = im.axis(im.attr("axis", -1), x.type.rank)
    p = im.attr("p", 2)
    if p not in (1, 2):
        raise FrontendError(f"{im.where}: LpNormalization p = {p} (allowed: 1, 2)")
    if p == 1:
        n = im.aten("sum.dim_IntList", im.op("abs", x), dim=[axis], keepdim=True)
    else:
        n = im.op("sqrt", im.aten("sum.dim_IntList", im.op("mul", x, x), dim=[axis], keepdim=True))
    return im.op("div", x, n)
