"""sparsify: N:M structured sparsity (2:4, 4:8, 1:4, ...) of linear weights.

Each group of M consecutive inputs of an output row keeps its N best weights, scored by
``method="magnitude"`` (|W|) or ``method="wanda"`` (|W| * ||x_j||, Wanda, from calibration).
Storage is compressed: the kept values (rows x cols*N/M) and each value's position in its group
(4-bit, packed, when M <= 16), read by a ``densify_nm`` node feeding the layer's ``linear``.

``pattern="auto"`` chooses per layer among ``levels`` (or dense) under a global ``density``
budget by measured sensitivity (ELSA's layer-wise N:M selection): with calibration data, the
change of the *model's* outputs when only that layer takes that level; without, the relative
weight error.
"""
from __future__ import annotations

import re

import torch

from ..errors import PipelineError
from ..ir.graph import Graph
from ..ir.ops import pack_int4
from ..ir.types import DType, TensorType
from .compress_common import (Linear, calibration_stats, dense_linears, derive, greedy_allocate, model_sensitivity,
                              output_error, record, replace_linear, skip_pattern)
from .calibrate import normalize_samples
from .dce import dce
from .registry import Option, register_pass
from .sequential import calibrate_sequentially


def parse_nm(text: str, option: str = "pattern") -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise PipelineError(f"pass 'sparsify': option '{option}' must look like 'N:M' (e.g. 2:4), got {text!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n <= mm:
        raise PipelineError(f"pass 'sparsify': option '{option}' {text!r}: need 0 < N <= M (N={n}, M={mm})")
    if mm > 256:
        raise PipelineError(f"pass 'sparsify': option '{option}' {text!r}: M must be <= 256")
    return n, mm


def nm_prune(w: torch.Tensor, score: torch.Tensor, n: int, m: int):
    """Keep the n highest-scoring entries of every group of m along each row.
    Returns (values [rows, cols*n/m], index [rows, cols*n/m] in 0..m-1, pruned dense weight)."""
    rows, cols = w.shape
    s = score.reshape(rows, cols // m, m)
    idx = s.topk(n, dim=-1).indices.sort(dim=-1).values
    vals = w.reshape(rows, cols // m, m).gather(-1, idx)
    dense = torch.zeros_like(w).reshape(rows, cols // m, m).scatter_(-1, idx, vals).reshape(rows, cols)
    return vals.reshape(rows, -1), idx.reshape(rows, -1), dense


def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, n: int, m: int, damp: float = 0.01):
    """SparseGPT (Frantar & Alistarh) for N:M: each group of m columns keeps, per row, the n
    weights whose removal would cost the most (w^2 / [H^-1]_jj^2, the OBS saliency); columns are
    then fixed in order and each pruned weight's error is fed back into the columns not yet fixed
    (``obs_sweep``), so the kept weights absorb what the pruned ones did. Returns like ``nm_prune``."""
    from .quantize import inverse_hessian_factor, obs_sweep
    W = w.double().clone()
    rows, cols = W.shape
    Hinv, _ = inverse_hessian_factor(hessian, damp)
    block = m * max(1, 128 // m)
    keep = torch.zeros(rows, cols, dtype=torch.bool)

    def column(j, W1, i):
        if j % m == 0:
            d = Hinv.diagonal()[j:j + m]
            saliency = W1[:, i:i + m] ** 2 / d[None, :] ** 2
            keep[:, j:j + m].scatter_(1, saliency.topk(n, dim=1).indices, True)
        return W1[:, i] * keep[:, j]

    obs_sweep(W, Hinv, column, block)
    return nm_prune(W, keep.double(), n, m)


def scores(lin: Linear, method: str, stats) -> torch.Tensor:
    w = lin.tensor.abs().double()
    if method == "wanda":
        return w * stats[lin.node.name].sq_norm.clamp_min(0).sqrt()[None, :]
    return w


@register_pass("sparsify", lossy=True, options={
    "pattern": Option(str, "2:4", help="'N:M' or 'auto'"),
    "method": Option(str, "magnitude", choices=("magnitude", "wanda", "sparsegpt")),
    "levels": Option(str, "1:4;2:4;4:8", help="auto: the N:M levels a layer may take, ';'-separated"),
    "density": Option(float, 0.5, check=lambda d: 0 < d <= 1, allowed="in (0, 1]",
                      help="auto: fraction of the eligible weights kept overall"),
    "skip": Option(str, "", help="regex of weight names to leave dense"),
    "sequential": Option(bool, True, help="wanda / sparsegpt: calibrate each layer on the outputs of the "
                                          "layers before it as pruned"),
})
def sparsify(g: Graph, ctx, pattern: str, method: str, levels: str, density: float, skip: str, sequential: bool):
    """Prune linear weights to N:M; see the module docstring."""
    from .quantize import dequantize_layers, requantize_layers
    requant = dequantize_layers(g)  # running after quantize: transform the float values, then re-quantize
    auto = pattern == "auto"
    level_list = [parse_nm(x, "levels") for x in levels.split(";") if x.strip()] if auto else [parse_nm(pattern)]
    skip_re = skip_pattern(g, skip, "sparsify")
    layers = [l for l in dense_linears(g) if not (skip_re and skip_re.search(l.weight.name))]
    if not auto:
        n, m = level_list[0]
        for l in layers:  # validate everything before changing anything
            if l.shape[1] % m:
                raise PipelineError(f"pass 'sparsify': pattern {n}:{m} needs the input dim of layer %{l.node.name} "
                                    f"({l.shape[1]}) to be a multiple of {m}; skip it with skip=<regex>")
    if auto and method == "sparsegpt":
        raise PipelineError("pass 'sparsify': method=sparsegpt takes a fixed pattern (e.g. pattern=2:4), not auto")
    what = f"sparsify{{method={method}}}"
    if not auto and method != "magnitude":
        samples = normalize_samples(getattr(ctx, "calibration", None))
        if not samples:
            calibration_stats(g, ctx, [], need=True, what=what)        # raises: needs calibration
        by_node = {l.node: l for l in layers}
        n, m = level_list[0]

        def prune_group(x, nodes, st):
            for node in nodes:
                l = by_node[node]
                if method == "sparsegpt":
                    vals, idx, dense = sparsegpt(l.tensor, st.hessian, n, m)
                else:
                    vals, idx, dense = nm_prune(l.tensor, scores(l, method, {node.name: st}), n, m)
                _rewrite(g, l, (n, m), vals, idx, output_error(l.tensor, dense, st.gram), method=method,
                         basis="calibration")
        if sequential:
            calibrate_sequentially(g, samples, list(by_node), prune_group, progress=getattr(ctx, "progress", True),
                                   desc=what)
        else:
            stats = calibration_stats(g, ctx, list(by_node), need=True, what=what)
            for node in by_node:
                prune_group(node.inputs[0], [node], stats[node.name])
        requantize_layers(g, requant, "sparsify")
        return dce(g)
    stats = calibration_stats(g, ctx, [l.node for l in layers], need=method == "wanda" or auto and method == "wanda",
                              what=what)
    if auto and stats is None:
        stats = calibration_stats(g, ctx, [l.node for l in layers], need=False, what="sparsify{pattern=auto}")
    plans = []
    for l in layers:
        sc = scores(l, method, stats)
        gram = stats[l.node.name].gram if stats else None
        cands = []
        for n, m in level_list:
            if l.shape[1] % m:
                continue
            vals, idx, dense = nm_prune(l.tensor, sc, n, m)
            err = output_error(l.tensor, dense, gram)
            cands.append(((n, m), vals, idx, err, err))  # (level, values, index, layer error, allocation error)
        plans.append((l, cands, gram))
    if auto and stats is not None:  # ELSA: rank levels by their measured effect on the model's outputs
        trials = [(l.weight.name, nm_prune(l.tensor, scores(l, method, stats), *c[0], )[2].to(l.tensor.dtype))
                  for l, cands, _ in plans for c in cands]
        sens = iter(model_sensitivity(g, ctx, trials))
        plans = [(l, [c[:4] + (next(sens),) for c in cands], gram) for l, cands, gram in plans]
    if auto:
        chosen = _allocate(plans, density)
    else:
        chosen = [c[0] if c else None for _, c, _ in plans]
    for (l, _, gram), c in zip(plans, chosen):
        if c is not None:
            _rewrite(g, l, *c[:4], method=method, basis="calibration" if gram is not None else "weights")
    requantize_layers(g, requant, "sparsify")
    return dce(g)


def _allocate(plans, density: float):
    options = []
    for l, cands, _ in plans:
        rows, cols = l.shape
        best: dict = {}
        for c in cands:  # per density keep the level with the smallest error
            d = c[0][0] / c[0][1]
            if d < 1 and (d not in best or c[4] < best[d][4]):
                best[d] = c
        opts = [(rows * cols, 0.0, None)] + [(rows * cols * d, best[d][4], best[d]) for d in sorted(best, reverse=True)]
        options.append(opts)
    budget = density * sum(o[0][0] for o in options)
    choice = greedy_allocate([[(c, e) for c, e, _ in o] for o in options], budget)
    return [o[j][2] for o, j in zip(options, choice)]


def _rewrite(g: Graph, l: Linear, nm, vals, idx, err, method: str, basis: str) -> None:
    n, m = nm
    rows, kept = vals.shape
    vname, iname = g.fresh_name(l.weight.name + ".nm_values"), g.fresh_name(l.weight.name + ".nm_index")
    v = g.add_param(vname, vals.to(l.tensor.dtype).contiguous())
    if m <= 16 and kept % 2 == 0:
        i = g.add_param(iname, pack_int4(idx).contiguous(), TensorType((rows, kept), DType.u4))
    else:
        i = g.add_param(iname, idx.to(torch.uint8).contiguous(), TensorType((rows, kept), DType.u8))
    derive(g, vname, l.weight.name)
    derive(g, iname, l.weight.name)
    w = g.op("densify_nm", v, i, n=n, m=m, before=l.node)
    replace_linear(g, l.node, g.op("linear", l.node.inputs[0], w, l.node.inputs[2], before=l.node))
    record(g, l.weight.name, bytes_before=l.weight.type.nbytes(), nm=f"{n}:{m}", sparsity_method=method,
           rel_error=err, error_basis=basis)
