"""lowrank: factor linear layers W (out x in) into A (r x in) then B (out x r).

* ``method="svd"``: truncated SVD of W.
* ``method="whitened"``: SVD of W L where L L^T is the calibration Gram (SVD-LLM / Palu): the
  truncation then minimizes the error of the layer's *outputs* on the calibration data, exactly.
* Ranks: ``ratio`` (fraction of the eligible layers' parameters kept) spent greedily where the
  measured output error drops most per parameter (FLRC-style allocation), or explicit
  ``ranks="regex:r;regex:full"``. Layers where factoring would not save parameters stay dense.
* ``share_input=True``: linears reading the same tensor (q/k/v, gate/up) share one
  down-projection A (SkipCat), factored jointly from their stacked weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import PipelineError
from ..ir.graph import Graph
from .compress_common import (Linear, calibration_stats, dense_linears, derive, greedy_allocate, match_patterns,
                              output_error, record, replace_linear, require_match)
from .dce import dce
from .registry import Option, register_pass
from .progress import progress


@dataclass
class Factorization:
    """Rank-ordered factors of a (stacked) weight: W ~= B[:, :r] @ A[:r], with the exact output
    error of every truncation (err[r] = error when keeping r components)."""
    A: torch.Tensor        # (k, in)
    B: torch.Tensor        # (out, k)
    err: torch.Tensor      # (k + 1,) relative output error for r = 0..k


def factorize(w: torch.Tensor, gram: Optional[torch.Tensor], whitened: bool) -> Factorization:
    w = w.double()
    if whitened:
        g = gram.double()
        damp = 1e-6 * g.diagonal().mean().clamp_min(1e-12)
        L = torch.linalg.cholesky(g + damp * torch.eye(g.shape[0], dtype=g.dtype))
        U, S, Vh = torch.linalg.svd(w @ L, full_matrices=False)
        Vh = torch.linalg.solve_triangular(L, Vh, upper=False, left=False)  # Vh L^{-1}
        energy = S ** 2                                   # exact output energy per component
    else:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        energy = S ** 2 * (((Vh @ gram.double()) * Vh).sum(1) if gram is not None else 1.0)
    total = energy.sum().clamp_min(1e-300)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    root = S.sqrt()
    return Factorization(A=root[:, None] * Vh, B=U * root[None, :], err=tail / total)


@register_pass("lowrank", lossy=True, options={
    "method": Option(str, "svd", choices=("svd", "whitened"), help="plain or activation-whitened SVD"),
    "ratio": Option(float, 0.5, check=lambda r: 0 < r <= 1, allowed="in (0, 1]",
                    help="fraction of the eligible layers' parameters kept"),
    "ranks": Option(str, "", help="explicit ranks, 'regex:r;regex:full' on weight names (overrides ratio)"),
    "share_input": Option(bool, False, help="linears reading one tensor share the down-projection"),
    "rank_multiple": Option(int, 8, check=lambda m: m >= 1, allowed=">= 1", help="ranks are multiples of this"),
})
def lowrank(g: Graph, ctx, method: str, ratio: float, ranks: str, share_input: bool, rank_multiple: int):
    """Factor linears into two smaller linears; see the module docstring."""
    from .quantize import dequantize_layers, requantize_layers
    explicit = match_patterns(ranks, "ranks", "lowrank")
    for _, val in explicit:
        if val != "full" and not (val.isdigit() and int(val) > 0):
            raise PipelineError(f"pass 'lowrank': option 'ranks' values must be positive ints or 'full', got {val!r}")
    requant = dequantize_layers(g)  # running after quantize: factor the float weights, then re-quantize
    linears = dense_linears(g)
    if explicit:
        require_match(g, [p for p, _ in explicit], [l.weight.name for l in linears], "ranks", "lowrank")
        linears = [l for l in linears if any(p.search(l.weight.name) for p, _ in explicit)]
    groups = _group(linears, share_input)
    stats = calibration_stats(g, ctx, [grp[0].node for grp in groups], need=method == "whitened",
                              what=f"lowrank{{method={method}}}")
    facts, rank_of = [], []
    for grp in progress(groups, getattr(ctx, "progress", True), desc=f"lowrank{{method={method}}}", unit="layer"):
        w = torch.cat([l.tensor for l in grp], 0)
        gram = stats[grp[0].node.name].gram if stats else None
        facts.append(factorize(w, gram, method == "whitened"))
    if explicit:
        for grp, f in zip(groups, facts):
            val = next(v for p, v in explicit if p.search(grp[0].weight.name))
            rank_of.append(f.A.shape[0] if val == "full" else min(int(val), f.A.shape[0]))
    else:
        rank_of = _allocate(groups, facts, ratio, rank_multiple)
    for grp, f, r in zip(groups, facts, rank_of):
        if r is not None:
            _rewrite(g, grp, f, r, stats[grp[0].node.name].gram if stats else None, method)
    requantize_layers(g, requant, "lowrank")
    return dce(g)


def _group(linears: list[Linear], share_input: bool) -> list[list[Linear]]:
    if not share_input:
        return [[l] for l in linears]
    by_input: dict = {}
    for l in linears:
        by_input.setdefault(l.node.inputs[0], []).append(l)
    return list(by_input.values())


def _allocate(groups, facts, ratio: float, multiple: int) -> list[Optional[int]]:
    """Per group: None (stay dense) or a rank, under the parameter budget."""
    options = []
    for grp, f in zip(groups, facts):
        n_in, n_out = grp[0].shape[1], sum(l.shape[0] for l in grp)
        dense = n_in * n_out
        opts = [(dense, 0.0, None)]
        k = f.A.shape[0]
        ranks = [r for r in range(multiple * ((k - 1) // multiple), 0, -multiple) if r * (n_in + n_out) < dense]
        opts += [(r * (n_in + n_out), float(f.err[r]), r) for r in ranks]
        options.append(opts)
    budget = ratio * sum(o[0][0] for o in options)
    choice = greedy_allocate([[(c, e) for c, e, _ in o] for o in options], budget)
    return [o[j][2] for o, j in zip(options, choice)]


def _rewrite(g: Graph, grp: list[Linear], f: Factorization, r: int, grams, method: str) -> None:
    """x -> linear(x, A) -> linear(., B_i, bias_i) for every member i of the group."""
    first = grp[0]
    dtype = first.tensor.dtype
    a_name = g.fresh_name(first.weight.name + ".lr_a")
    a = g.add_param(a_name, f.A[:r].to(dtype).contiguous())
    derive(g, a_name, first.weight.name)
    h = g.op("linear", first.node.inputs[0], a, None, before=min((l.node for l in grp), key=g.nodes.index))
    row = 0
    for l in grp:
        out = l.shape[0]
        b_name = g.fresh_name(l.weight.name + ".lr_b")
        b_data = f.B[row:row + out, :r]
        b = g.add_param(b_name, b_data.to(dtype).contiguous())
        derive(g, b_name, l.weight.name)
        err = output_error(l.tensor, b_data @ f.A[:r], grams)
        record(g, l.weight.name, bytes_before=l.weight.type.nbytes(), rank=r, lowrank_method=method,
               shared_down_projection=len(grp) > 1, rel_error=err,
               error_basis="calibration" if grams is not None else "weights")
        replace_linear(g, l.node, g.op("linear", h, b, l.node.inputs[2], before=l.node))
        row += out
