"""quantize: weight-only int8/int4 (per-channel or group-wise, symmetric or asymmetric, RTN or
GPTQ), W8A8 with dynamic per-token activations, and an optional Hadamard rotation.

Storage is real: int4 codes are packed two per byte (type ``i4``/``u4``), scales are fp16, zero
points u8; a ``dequantize`` node feeds the layer's ``linear`` (kernels fuse the two). Codes are
computed against the fp16-rounded scales, so what is stored is exactly what was optimized.

* ``method="gptq"``: GPTQ with the calibration Hessian (H = E[x x^T], damped), block-wise
  error feedback, optional ``act_order`` (columns by decreasing Hessian diagonal, static groups).
* ``rotate="hadamard"``: y = x W^T = (x H)(W H)^T with H a blockwise orthogonal Hadamard matrix:
  the weight is rotated before quantization and a ``hadamard`` node rotates the activations
  online (one per distinct input), spreading outliers (QuaRot / Quamba).
* ``activations="int8"``: W8A8 — ``quantize_per_token`` + ``linear_int8`` (int8 x int8 with
  integer accumulation), weights per-channel symmetric int8. ``activations="int7"``: the same with
  7-bit activation codes (W8A7), which the ``llvm`` target multiplies with AVX2 integer dot
  products (u8 x s8, vpmaddubsw): 8-bit codes could saturate its int16 pair sums.
* ``smooth=alpha`` (with quantized activations; SmoothQuant): where the linears' shared input
  comes from an affine norm read by nothing else, per input channel j the activation range moves
  into the weights: x' = x / s, W' = W s with s_j = max|x_j|^alpha / max|W_:j|^(1-alpha) over the
  calibration set; 1/s folds into the norm's weight (and bias), so it costs nothing at run time.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import PipelineError
from ..ir.graph import Graph, Node, Value
from ..ir.ops import hadamard_matrix, pack_int4
from ..ir.types import DType, TensorType
from .calibrate import normalize_samples
from .compress_common import (calibration_stats, dense_linears, derive, origin, output_error, record,
                              replace_linear)
from .sequential import calibrate_sequentially
from .dce import dce
from .registry import Option, register_pass
from .int_codes import check_int4_fits, dequant, encode, num_groups, qparams, rtn  # noqa: F401 (re-exported)
from .quantize_embedding import looked_up_params, quantize_embeddings, selector
from .progress import progress


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped Hessian's inverse as its upper Cholesky factor (GPTQ / SparseGPT), and the mask of
    dead input channels. A channel no calibration input reached (all-zero calibration included)
    has no Hessian information: a unit diagonal and no coupling make it rounded (or pruned) as
    plain rounding (magnitude) would, never zeroed, so degenerate calibration never wipes a layer."""
    H = hessian.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), dead


def obs_sweep(W: torch.Tensor, Hinv: torch.Tensor, column, block: int = 128) -> None:
    """Optimal Brain Surgeon's column sweep shared by GPTQ and SparseGPT: columns are fixed in
    order, ``column(j, W1, i)`` giving column j's new values (W1: the current block as updated so
    far, i: j's place in it); each column's error is fed back into the columns not yet fixed
    through the inverse Hessian's Cholesky factor, lazily per block. Updates ``W`` in place."""
    rows, cols = W.shape
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=W.dtype), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = column(i1 + i, W1, i)
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, symmetric: bool, act_order: bool,
         damp: float = 0.01, block: int = 128):
    """GPTQ (Frantar et al.): quantize columns in order, feeding each column's error back into the
    columns not yet quantized (``obs_sweep``). ``act_order``: columns by decreasing Hessian
    diagonal, with static groups (scales from the original weights)."""
    W = w.double().clone()
    rows, cols = W.shape
    perm = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(cols)
    Hinv, _ = inverse_hessian_factor(hessian[perm][:, perm], damp)
    ngroups = num_groups(cols, group)
    scales = torch.zeros(rows, ngroups, dtype=torch.float64)
    zeros = None if symmetric else torch.zeros(rows, ngroups, dtype=torch.float64)

    def set_group(gi, cols_of_group):
        s, z = qparams(cols_of_group, bits, symmetric)
        scales[:, gi] = s
        if zeros is not None:
            zeros[:, gi] = z

    if act_order:
        for gi in range(ngroups):
            set_group(gi, W[:, gi * group:(gi + 1) * group])
    W = W[:, perm]
    codes = torch.zeros_like(W)

    def column(j, W1, i):
        col = int(perm[j])
        gi = col // group
        if not act_order and col % group == 0:   # the group's columns as updated so far
            width = min(group, cols - col)
            ahead = W1[:, i:i + width]
            if ahead.shape[1] < width:
                ahead = torch.cat([ahead, W[:, j + ahead.shape[1]:j + width]], 1)
            set_group(gi, ahead)
        q, dq = encode(W1[:, i:i + 1], scales[:, gi], None if zeros is None else zeros[:, gi], bits)
        codes[:, j] = q[:, 0]
        return dq[:, 0]

    obs_sweep(W, Hinv, column, block)
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out, scales, zeros


def hadamard_block(cols: int, cap: int = 512) -> int:
    """Largest power of two dividing ``cols`` (at most ``cap``)."""
    return min(cols & -cols, cap)


def rotate_cols(w: torch.Tensor, block: int) -> torch.Tensor:
    h = hadamard_matrix(block, torch.float64)
    rows, cols = w.shape
    return (w.double().reshape(rows, cols // block, block) @ h).reshape(rows, cols)


def rotate_gram(gram: torch.Tensor, block: int) -> torch.Tensor:
    """H^T G H for the blockwise-diagonal Hadamard H (H symmetric)."""
    n = gram.shape[0]
    hb = torch.block_diag(*[hadamard_matrix(block, torch.float64)] * (n // block))
    return hb @ gram @ hb


@register_pass("quantize", lossy=True, options={
    "weights": Option(str, "int8", choices=("int8", "int4"), help="weight bits"),
    "group_size": Option(int, 0, check=lambda g: g >= 0, allowed=">= 0 (0 = one group per output channel)"),
    "symmetric": Option(bool, True, help="signed codes, no zero point"),
    "method": Option(str, "rtn", choices=("rtn", "gptq", "awq", "awq+gptq")),
    "act_order": Option(bool, False, help="GPTQ: quantize columns by decreasing Hessian diagonal"),
    "damp": Option(float, 0.01, check=lambda d: 0 < d < 1, allowed="in (0, 1)", help="GPTQ Hessian damping"),
    "activations": Option(str, "none", choices=("none", "int8", "int7"),
                          help="int8: W8A8 with per-token activations; int7: W8A7 (AVX2 integer dot products)"),
    "rotate": Option(str, "none", choices=("none", "hadamard")),
    "skip": Option(str, "", help="regex of weight names to leave unquantized"),
    "only": Option(str, "", help="regex: quantize only the weights (and embedding tables) whose name matches"),
    "embeddings": Option(str, "none", choices=("none", "int8", "int4"),
                         help="embedding tables (and an LM head tied to one) at these bits; see quantize_embedding"),
    "smooth": Option(float, 0.0, check=lambda a: 0 <= a <= 1, allowed="in [0, 1] (0 = off)",
                     help="SmoothQuant migration strength for quantized activations"),
    "sequential": Option(bool, True, help="calibrate each layer on the outputs of the layers before it as "
                                          "quantized (else all layers on the float model)"),
})
def quantize(g: Graph, ctx, weights, group_size, symmetric, method, act_order, damp, activations, rotate, skip,
             smooth, sequential, only, embeddings):
    """Quantize linear weights; see the module docstring."""
    bits = 8 if weights == "int8" else 4
    if activations != "none" and (bits != 8 or group_size != 0 or not symmetric):
        raise PipelineError(f"pass 'quantize': activations={activations} (W8A{activations[3:]}) needs weights=int8, "
                            "group_size=0 and symmetric=true")
    if activations != "none" and method != "rtn" and method != "gptq":
        raise PipelineError(f"pass 'quantize': method={method} scales weights per input channel, which "
                            f"activations={activations} does not take; use smooth= (SmoothQuant) instead")
    keep = selector("quantize", skip, only, g)
    layers = [l for l in dense_linears(g) if keep(l.weight.name)]
    sparse = [n for n in g.nodes if n.op == "linear" and _nm_values(g, n) is not None
              and keep(_nm_values(g, n).name)]
    for l in layers:  # validate everything before changing anything
        _check_group(l.node, l.shape[1], group_size, bits)
    for n in sparse:
        _check_group(n, _nm_values(g, n).type.shape[1], group_size, bits)
    if smooth and activations == "none":
        raise PipelineError("pass 'quantize': smooth= moves activation outliers into the weights, so it needs "
                            "activations=int8 or int7")
    quantize_embeddings(g, embeddings, group_size, symmetric, keep)
    needs_stats = method != "rtn" or smooth > 0
    what = f"quantize{{method={method}}}" if not smooth else "quantize{smooth}"
    calib = _LayerQuantizer(g, bits, group_size, symmetric, method, act_order, damp, activations, rotate, smooth)
    by_node = {l.node: l for l in layers}
    compress = lambda x, nodes, stats: calib.quantize_group(x, [by_node[n] for n in nodes], stats)  # noqa: E731
    samples = normalize_samples(getattr(ctx, "calibration", None))
    if needs_stats and not samples:
        calibration_stats(g, ctx, [], need=True, what=what)     # raises: this method needs calibration
    if needs_stats and sequential:
        calibrate_sequentially(g, samples, [l.node for l in layers], compress,
                               progress=getattr(ctx, "progress", True), desc=what)
    else:
        stats = calibration_stats(g, ctx, [l.node for l in layers], need=False, what=what) if needs_stats else None
        groups = progress(list(_by_input(layers).items()), getattr(ctx, "progress", True) and method != "rtn",
                          desc=what, unit="layer group")
        for x, group in groups:
            calib.quantize_group(x, group, stats and _shared(stats, group))
    for n in sparse:
        _quantize_nm_values(g, n, bits, group_size, symmetric)
    return dce(g)


def _by_input(layers) -> dict:
    out: dict = {}
    for l in layers:
        out.setdefault(l.node.inputs[0], []).append(l)
    return out


def _shared(stats: dict, group) -> object:
    """The statistics of a group of linears reading one input (identical for each of them)."""
    return stats[group[0].node.name]


class _LayerQuantizer:
    """Quantizes the linears that read one activation, with that activation's statistics: the
    input-side transforms (SmoothQuant, AWQ scales, Hadamard rotation) are shared by the group,
    then every weight is rounded (RTN) or quantized with GPTQ on the group's Hessian."""

    def __init__(self, g, bits, group_size, symmetric, method, act_order, damp, activations, rotate, smooth):
        self.g, self.bits, self.group_size, self.symmetric = g, bits, group_size, symmetric
        self.method, self.act_order, self.damp = method, act_order, damp
        self.activations, self.rotate, self.smooth = activations, rotate, smooth
        self.rotated: dict = {}
        self.token_codes: dict = {}    # one quantize_per_token per activation (q/k/v projections share theirs)

    def quantize_group(self, x, layers, stats) -> Optional[dict]:
        """Returns ``{x: f}`` when the group's input is now produced scaled (see
        ``calibrate_sequentially``)."""
        g = self.g
        gram = stats.gram if stats is not None else None
        scaled = {}
        if self.smooth:
            scaled = _smooth(g, layers, stats, self.smooth)
        elif self.method.startswith("awq"):
            scaled = awq_scales(g, layers, stats, self.bits, self.group_size, self.symmetric)
        for l in layers:
            w = l.tensor
            rows, cols = l.shape
            group = self.group_size or cols
            lgram = gram
            if l.node in scaled:
                sc = scaled[l.node]
                w = w * sc.to(w.dtype)
                lgram = gram / torch.outer(sc, sc) if gram is not None else None
            xin = x
            if self.rotate == "hadamard":
                block = hadamard_block(cols)
                w = rotate_cols(w, block)
                lgram = rotate_gram(lgram, block) if lgram is not None else None
                key = (x, block)
                if key not in self.rotated:
                    self.rotated[key] = g.op("hadamard", x, block=block, before=l.node)
                xin = self.rotated[key]
            if self.method in ("gptq", "awq+gptq"):
                codes, scales, zeros = gptq(w, lgram / stats.rows, self.bits, group, self.symmetric, self.act_order,
                                            self.damp)
            else:
                codes, scales, zeros = rtn(w, self.bits, group, self.symmetric)
            w_hat = dequant(codes, scales, zeros, group)
            err = output_error(w, w_hat, lgram)
            if self.activations != "none":
                out = _emit_w8a8(g, l.node, xin, l.weight.name, codes, scales, 7 if self.activations == "int7" else 8,
                                 self.token_codes)
            else:
                wd = _emit_weight(g, l.node, l.weight.name, codes, scales, zeros, self.bits, group,
                                  l.weight.type.dtype)
                out = g.op("linear", xin, wd, l.node.inputs[2], before=l.node)
            replace_linear(g, l.node, out)
            record(g, l.weight.name, bytes_before=_bytes_before(g, l.weight), bits=self.bits, group_size=group,
                   symmetric=self.symmetric, method=self.method, rotate=self.rotate, activations=self.activations,
                   rel_error=err, error_basis="calibration" if lgram is not None else "weights",
                   awq=l.node in scaled and self.method.startswith("awq"))
        if scaled:      # the norm now yields x / s: calibration values of x computed before follow
            s = next(iter(scaled.values()))
            return {x: lambda t: (t.double() / s).to(t.dtype)}
        return None


def dequantize_layers(g: Graph) -> dict[str, dict]:
    """For passes that transform float weights (lowrank, sparsify) running after quantize: replace
    each weight-only-quantized layer's ``dequantize`` by a float param of its dequantized values
    and return the settings (by original layer) to re-quantize the transformed weights with."""
    from ..ir.registry import get_op
    settings = {}
    tables = looked_up_params(g)      # a tied head's codes stay: its table is looked up packed
    for n in list(g.nodes):
        d = n.inputs[1].node if n.op == "linear" and n.inputs[1] is not None else None
        if d is None or d.op != "dequantize" or not all(v is None or v.kind == "param" for v in d.inputs) \
                or d.inputs[0].name in tables:
            continue
        w = get_op("dequantize").run([None if v is None else g.params[v.name].data for v in d.inputs], d.attrs)[0]
        name = g.fresh_name(origin(g, d.inputs[0].name) + ".dq")
        p = g.add_param(name, w)
        derive(g, name, d.inputs[0].name)
        g.replace_uses(d.output, p)
        st = settings.setdefault(origin(g, name), {"bits": d.attrs["bits"], "group_size": d.attrs["group_size"],
                                                   "symmetric": d.inputs[2] is None, "restore": {}})
        st["restore"][name] = (list(d.inputs), dict(d.attrs))  # untouched layers get their codes back
    return settings


def requantize_layers(g: Graph, settings: dict[str, dict], pass_name: str = "a later pass") -> None:
    """Quantize (RTN) the float weights derived from layers in ``settings`` with their settings
    (a group size that does not divide a derived weight's input dim leaves a shorter last group).
    Codes an earlier calibrated method (GPTQ, AWQ) chose are replaced by RTN codes here: a
    warning names the layers, so that a pipeline never silently undoes an earlier pass."""
    if not settings:
        return
    redone = []
    for l in dense_linears(g):
        st = settings.get(origin(g, l.weight.name))
        if st is None:
            continue
        if l.weight.name in st["restore"]:  # the pass left this layer alone: keep its original codes
            ins, attrs = st["restore"][l.weight.name]
            g.replace_uses(l.weight, g.op("dequantize", *ins, before=l.node, **attrs))
            continue
        cols = l.shape[1]
        group = st["group_size"]
        if st["bits"] == 4 and cols % 2:
            continue
        method = g.meta.get("compression", {}).get(origin(g, l.weight.name), {}).get("method", "rtn")
        if method != "rtn":
            redone.append((origin(g, l.weight.name), method))
            record(g, l.weight.name, method="rtn")
        codes, scales, zeros = rtn(l.tensor, st["bits"], group, st["symmetric"])
        wd = _emit_weight(g, l.node, l.weight.name, codes, scales, zeros, st["bits"], group, l.weight.type.dtype)
        replace_linear(g, l.node, g.op("linear", l.node.inputs[0], wd, l.node.inputs[2], before=l.node))
    for n in [n for n in g.nodes if n.op == "linear" and _nm_values(g, n) is not None]:
        st = settings.get(origin(g, _nm_values(g, n).name))
        if st is not None:
            layer = origin(g, _nm_values(g, n).name)
            method = g.meta.get("compression", {}).get(layer, {}).get("method", "rtn")
            if method != "rtn":
                redone.append((layer, method))
            cols = _nm_values(g, n).type.shape[1]
            _quantize_nm_values(g, n, st["bits"], st["group_size"] if cols % st["group_size"] == 0 else 0,
                                st["symmetric"])
    if redone:
        import warnings
        methods = sorted({m for _, m in redone})
        warnings.warn(f"{pass_name} changed the weights of {len(redone)} layer(s) quantized with "
                      f"{'/'.join(methods)} (e.g. {redone[0][0]}); they were re-quantized with RTN. Run quantize "
                      "after it to keep calibrated codes.", stacklevel=3)


def _check_group(node: Node, cols: int, group_size: int, bits: int) -> None:
    check_int4_fits(cols, group_size, bits, f"layer %{node.name} has an odd input dim {cols}", "int4")


def _bytes_before(g: Graph, weight: Value) -> int:
    return g.meta.get("compression", {}).get(weight.name, {}).get("bytes_before", weight.type.nbytes())


def _store_codes(g: Graph, name: str, codes: torch.Tensor, bits: int, signed: bool) -> Value:
    rows, cols = codes.shape
    if bits == 4:
        dt = DType.i4 if signed else DType.u4
        data = pack_int4(codes.to(torch.int16))
    else:
        dt = DType.i8 if signed else DType.u8
        data = codes.to(torch.int8 if signed else torch.uint8)
    return g.add_param(name, data.contiguous(), TensorType((rows, cols), dt))


def _emit_weight(g, node, wname, codes, scales, zeros, bits, group, dtype) -> Value:
    qn, sn = g.fresh_name(wname + ".q"), g.fresh_name(wname + ".scales")
    q = _store_codes(g, qn, codes, bits, signed=zeros is None)
    s = g.add_param(sn, scales.to(torch.float16).contiguous())
    names = [qn, sn]
    z = None
    if zeros is not None:
        zn = g.fresh_name(wname + ".zeros")
        z = g.add_param(zn, zeros.to(torch.uint8).contiguous())
        names.append(zn)
    for n in names:
        derive(g, n, wname)
    return g.op("dequantize", q, s, z, bits=bits, group_size=group, dtype=dtype.value, before=node)


def _foldable_norm_params(g: Graph, layers) -> Optional[list]:
    """The affine params of the norm producing the linears' shared input, when that norm feeds
    only these linears (so dividing its output per channel costs nothing at run time)."""
    users = g.users()
    x = layers[0].node.inputs[0]
    norm = x.node
    if norm is None or norm.op not in ("layer_norm", "rms_norm") or norm.attrs.get("ndim") != 1:
        return None
    affine = [v for v in norm.inputs[1:] if v is not None]
    readers = [u for u in users.get(x, []) if u.outputs and any(users.get(o) or o in g.outputs for o in u.outputs)]
    if (len(readers) != len(layers) or not affine
            or not all(v.kind == "param" and len(users.get(v, [])) == 1 for v in affine)):
        return None
    return affine


def _fold_into_norm(g: Graph, affine: list, s: torch.Tensor, suffix: str) -> None:
    """x' = x / s per channel, folded into the norm's weight (and bias)."""
    for v in affine:
        data = g.params[v.name].data
        new = g.add_param(g.fresh_name(v.name + suffix), (data.double() / s).to(data.dtype))
        derive(g, new.name, v.name)
        g.replace_uses(v, new)


def _smooth(g: Graph, layers, stats, alpha: float) -> dict:
    """SmoothQuant (see the module docstring): per linear node, the per-input-channel factor s its
    weight is multiplied by; the norm producing the input is rewired to params divided by s."""
    affine = _foldable_norm_params(g, layers)
    if affine is None:
        return {}
    act = stats.amax.clamp_min(1e-5)
    wmax = torch.stack([l.tensor.double().abs().amax(0) for l in layers]).amax(0).clamp_min(1e-5)
    s = (act ** alpha / wmax ** (1 - alpha)).clamp(1e-4, 1e4)
    _fold_into_norm(g, affine, s, ".smoothed")
    return {l.node: s for l in layers}


AWQ_GRID = 20


def awq_scales(g: Graph, layers, stats, bits: int, group_size: int, symmetric: bool) -> dict:
    """AWQ (Lin et al.): salient input channels — large mean |x| — are scaled up before rounding
    (W' = W diag(s), x' = x / s), so their weights lose less to the grid. s = mean|x|^alpha with
    alpha searched on a grid to minimise the group's output error ||(W' - W) X||^2, computed
    exactly from the calibration Gram matrix (alpha = 0 is plain rounding, so the search never
    does worse than RTN on the calibration data). Applied where 1/s folds into the producing norm."""
    affine = _foldable_norm_params(g, layers)
    if affine is None or stats is None:
        return {}
    gram = stats.gram.float()
    mean = stats.abs_mean.float().clamp_min(1e-8)
    ws = [l.tensor.float() for l in layers]
    best, best_s = None, None
    for k in range(AWQ_GRID):
        alpha = k / AWQ_GRID
        s = mean ** alpha
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w in ws:
            group = group_size or w.shape[1]
            codes, scales, zeros = rtn(w * s, bits, group, symmetric)
            d = dequant(codes, scales, zeros, group).float() / s - w
            err += float(((d @ gram) * d).sum())
        if best is None or err < best:
            best, best_s = err, s.double()
    if bool((best_s == 1).all()):
        return {}
    _fold_into_norm(g, affine, best_s, ".awq")
    return {l.node: best_s for l in layers}


def _emit_w8a8(g, node, x, wname, codes, scales, act_bits: int, token_codes: dict) -> Value:
    qn, sn = g.fresh_name(wname + ".q"), g.fresh_name(wname + ".scales")
    q = _store_codes(g, qn, codes, 8, signed=True)
    s = g.add_param(sn, scales.reshape(-1).to(torch.float32).contiguous())
    derive(g, qn, wname)
    derive(g, sn, wname)
    if x not in token_codes:
        token_codes[x] = g.add_node("quantize_per_token", [x], {"bits": act_bits}, before=node).outputs
    xq = token_codes[x]
    y = g.op("linear_int8", xq[0], xq[1], q, s, node.inputs[2], before=node)
    return y if node.output.type.dtype == DType.f32 else g.op("cast", y, dtype=node.output.type.dtype.value, before=node)


def _nm_values(g: Graph, n: Node) -> Optional[Value]:
    """The float ``values`` param of an N:M weight feeding ``n``, if any."""
    d = n.inputs[1].node if n.inputs[1] is not None else None
    if d is None or d.op != "densify_nm":
        return None
    v = d.inputs[0]
    return v if v.kind == "param" and v.type.dtype.is_float else None


def _quantize_nm_values(g: Graph, n: Node, bits: int, group_size: int, symmetric: bool) -> None:
    """Quantize the kept values of an N:M weight (RTN: their columns are not the layer's inputs).
    Their kernels take whole groups only: a group size that does not divide the kept values falls
    back to one group per row, with a warning."""
    dn = n.inputs[1].node
    v = dn.inputs[0]
    cols = v.type.shape[1]
    group = group_size or cols
    if cols % group:
        import warnings
        warnings.warn(f"quantize: group_size={group_size} does not divide the {cols} kept values per row of the "
                      f"N:M weight of %{n.name}; its values are quantized per output channel", stacklevel=2)
        group = cols
    codes, scales, zeros = rtn(g.params[v.name].data, bits, group, symmetric)
    dv = _emit_weight(g, dn, v.name, codes, scales, zeros, bits, group, v.type.dtype)
    g.replace_uses(dn.output, g.op("densify_nm", dv, dn.inputs[1], before=dn, **dn.attrs))
    record(g, v.name, bits=bits, group_size=group, symmetric=symmetric, method="rtn")
