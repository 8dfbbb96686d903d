"""lowrank: factor linear layers W (out x in) into A (r x in) then B (out x r).

* ``method="svd"``: truncated SVD of W.
* ``method="whitened"``: SVD of W L where L L^T is the calibration Gram (SVD-LLM's truncation-aware
  whitening): B = U_r S_r, A = V_r^T L^{-1}, so the truncation minimizes the error of the layer's
  *outputs* on the calibration data, exactly.
* ``sequential`` (whitened): each layer is factored on the inputs the compressed layers before it
  produce (``calibrate_sequentially``). With ``update`` it is also fitted to the *uncompressed*
  model's outputs: the closed-form least-squares weight W* = argmin ||W X - W' X~||^2 (X the
  uncompressed input, X~ the compressed one; SVD-LLM's post-truncation parameter update, done in
  closed form), truncated in X~'s whitened space, which makes B the least-squares B given A.
* Ranks: ``ratio`` (fraction of the eligible layers' parameters kept) spent greedily where the
  output error (from the whitened singular values of the uncompressed model) drops most per
  parameter, or explicit ``ranks="regex:r;regex:full"``; ``allocation=by-type`` does so within each
  layer type (weight names up to the layer index: every q_proj, every down_proj), each type keeping
  ``ratio`` (SVD-LLM v2's per-type allocation); ``allocation=uniform`` gives every layer the same
  fraction. ``allocation=fisher`` spends the budget on the loss instead of the per-layer relative
  error: each dropped whitened component costs its output error weighted by the diagonal Fisher
  information of the layer's output (``passes/fisher.py``: one backward pass per sample on labels
  sampled from the model), so all layers' costs share one scale and early or loss-sensitive
  layers keep more rank. Layers where factoring would not save parameters stay dense (and keep
  their parameters in the budget).
* ``refit=up`` (with ``update``): SVD-LLM's update of the up-projection only: A from the
  whitened truncation, B the least-squares fit for that A to the uncompressed outputs.
* ``share_input=True``: linears reading the same tensor (q/k/v, gate/up) share one
  down-projection A (SkipCat), factored jointly from their stacked weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import PipelineError
from ..ir.graph import Graph
from .calibrate import LinearStats, normalize_samples
from .compress_common import (Linear, calibration_stats, dense_linears, derive, greedy_allocate, match_patterns,
                              output_error, record, replace_linear, require_match)
from .sequential import calibrate_sequentially
from .dce import dce
from .fisher import output_fisher
from .registry import Option, register_pass
from .progress import progress


@dataclass
class Factorization:
    """Rank-ordered factors of a (stacked) weight: W ~= B[:, :r] @ A[:r], with the exact output
    error of every truncation (err[r] = error when keeping r components)."""
    A: torch.Tensor        # (k, in)
    B: torch.Tensor        # (out, k)
    err: torch.Tensor      # (k + 1,) relative output error for r = 0..k


def svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a float64 matrix from the eigendecomposition of its smaller Gram matrix (several
    times faster than LAPACK's SVD at these sizes). Singular values below ~1e-8 of the largest lose
    digits, but U S Vh still reproduces ``m`` (U U^T m), and truncation drops them first."""
    wide = m.shape[0] <= m.shape[1]
    e, Q = torch.linalg.eigh(m @ m.T if wide else m.T @ m)
    e, Q = e.flip(0).clamp_min(0), Q.flip(1)
    S = e.sqrt()
    safe = S.clamp_min(S[0].clamp_min(1e-300) * 1e-15)
    if wide:
        return Q, S, (Q.T @ m) / safe[:, None]
    return (m @ Q) / safe[None, :], S, Q.T


def factorize(w: torch.Tensor, gram: Optional[torch.Tensor], whitened: bool) -> Factorization:
    w = w.double()
    if whitened:
        L = _cholesky(gram, 1e-6)
        U, S, Vh = svd(w @ L)
        Vh = torch.linalg.solve_triangular(L, Vh, upper=False, left=False)  # Vh L^{-1}
        energy = S ** 2                                   # exact output energy per component
    else:
        U, S, Vh = svd(w)
        energy = S ** 2 * (((Vh @ gram.double()) * Vh).sum(1) if gram is not None else 1.0)
    root = S.sqrt()
    return Factorization(A=root[:, None] * Vh, B=U * root[None, :], err=truncation_error(energy))


def truncation_error(energy: torch.Tensor) -> torch.Tensor:
    """Relative error of keeping the first r components, r = 0..k, from each component's energy
    (sorted decreasing): the energy of the dropped tail over the total."""
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return tail / energy.sum().clamp_min(1e-300)


def _cholesky(gram: torch.Tensor, damp: float, diag: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cholesky factor of gram + diag + damp * mean(diag(gram)) I; the damping grows tenfold until
    the factorization succeeds (a Gram summed from float32 products can be numerically singular)."""
    g = gram.double() + (torch.diag(diag) if diag is not None else 0)
    scale = g.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(g + damp * scale * eye)
        if int(info) == 0:
            return L
        damp = max(damp * 10, 1e-9)
    return torch.linalg.cholesky(g + damp * scale * eye)


def whitened_spectrum(w: torch.Tensor, gram: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Relative output error of keeping r whitened components, r = 0..k (the allocation's curve);
    with ``normalize=False`` the error itself (the dropped energy)."""
    w = w.double()
    if w.shape[0] <= w.shape[1]:       # the eigenvalues of W G W^T are the squared singular values of W L
        energy = torch.linalg.eigvalsh(w @ gram.double() @ w.T).flip(0).clamp_min(0)
    else:
        m = w @ _cholesky(gram, 1e-6)
        energy = torch.linalg.eigvalsh(m.T @ m).flip(0).clamp_min(0)
    return truncation_error(energy) * (1.0 if normalize else energy.sum())


def fisher_spectrum(w: torch.Tensor, gram: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """Loss cost of keeping r whitened components, r = 0..k: each dropped component i (left
    singular vector u_i, singular value s_i of W L) costs s_i^2 sum_j F_j u_ij^2, its output error
    weighted by the diagonal Fisher F of the layer's output (to second order, the loss it adds).
    Not normalized: the costs of all layers are in the same (loss) units, so the allocation can
    compare them."""
    w = w.double()
    if w.shape[0] <= w.shape[1]:
        e, U = torch.linalg.eigh(w @ gram.double() @ w.T)
        us = U * e.clamp_min(0).sqrt()[None, :]
    else:
        m = w @ _cholesky(gram, 1e-6)
        _, V = torch.linalg.eigh(m.T @ m)
        us = m @ V
    order = (us ** 2).sum(0).argsort(descending=True)     # truncation drops the smallest s_i first
    energy = (fisher.double()[:, None] * us[:, order] ** 2).sum(0)
    return torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])


def factorize_fitted(w: torch.Tensor, stats: LinearStats, damp: float) -> Factorization:
    """Factors fitted to the uncompressed outputs: with X the uncompressed input and X~ the
    compressed one (rows = tokens), minimize ||X W^T - X~ W'^T||^2 + ||(W' - W) D^1/2||^2 over
    rank-r W', D = damp * diag(X~^T X~) (a ridge toward W, per input channel at its own scale, so
    that it does not flatten the whitening of low-energy channels). With L L^T = X~^T X~ + D that
    is ||(W' - W*) L||^2 + const, W* L = (W C + W D) L^{-T}, C = X^T X~: the truncated SVD of W* L
    gives B = U_r S_r (the least-squares B for A) and A = V_r^T L^{-1}."""
    w = w.double()
    g = stats.gram.double()
    d = damp * g.diagonal()
    L = _cholesky(g, 1e-9, d)
    M = torch.linalg.solve_triangular(L.T, w @ stats.cross.double() + w * d, upper=True, left=False)
    U, S, Vh = svd(M)
    Vh = torch.linalg.solve_triangular(L, Vh, upper=False, left=False)
    energy = S ** 2
    total = ((w @ stats.reference.gram.double()) * w).sum().clamp_min(1e-300)
    kept = torch.cat([energy.new_zeros(1), energy.cumsum(0)])
    root = S.sqrt()
    return Factorization(A=root[:, None] * Vh, B=U * root[None, :], err=((total - kept) / total).clamp_min(0))


def refit_up(w: torch.Tensor, stats: LinearStats, r: int, damp: float) -> Factorization:
    """SVD-LLM's update of the up-projection alone: A from the truncation whitened by the compressed
    input (``factorize``), then the least-squares B for that A against the *uncompressed* outputs,
    min ||X W^T - X~ A^T B^T||^2 + damp * mean(diag(H)) ||B - B0||^2 with H = A X~^T X~ A^T and B0
    the truncation's own B (a ridge toward it). An r-dimensional regression, not an in-dimensional one:
    far fewer coefficients to fit from the calibration tokens than refitting all of W."""
    f = factorize(w, stats.gram, True)
    a, b0 = f.A[:r], f.B[:, :r]
    h = a @ stats.gram.double() @ a.T
    lam = damp * h.diagonal().mean().clamp_min(1e-300)
    rhs = w.double() @ stats.cross.double() @ a.T + lam * b0
    eye = torch.eye(r, dtype=h.dtype)
    b = torch.linalg.solve(h + lam * eye, rhs.T).T
    return Factorization(A=a, B=b, err=f.err[: r + 1])


def fitted_error(w: torch.Tensor, w2: torch.Tensor, stats: LinearStats) -> float:
    """||X W^T - X~ W2^T||^2 / ||X W^T||^2 from the statistics (X uncompressed, X~ compressed input)."""
    w, w2 = w.double(), w2.double()
    ref = stats.reference.gram.double()
    num = ((w @ ref) * w).sum() - 2 * ((w @ stats.cross.double()) * w2).sum() + ((w2 @ stats.gram.double()) * w2).sum()
    return float(num.clamp_min(0) / ((w @ ref) * w).sum().clamp_min(1e-300))


@register_pass("lowrank", lossy=True, options={
    "method": Option(str, "svd", choices=("svd", "whitened"), help="plain or activation-whitened SVD"),
    "ratio": Option(float, 0.5, check=lambda r: 0 < r <= 1, allowed="in (0, 1]",
                    help="fraction of the eligible layers' parameters kept"),
    "ranks": Option(str, "", help="explicit ranks, 'regex:r;regex:full' on weight names (overrides ratio)"),
    "share_input": Option(bool, False, help="linears reading one tensor share the down-projection"),
    "rank_multiple": Option(int, 8, check=lambda m: m >= 1, allowed=">= 1", help="ranks are multiples of this"),
    "allocation": Option(str, "greedy", choices=("greedy", "fisher", "by-type", "uniform"),
                         help="ranks where the output error per parameter is lowest (over all layers; fisher: "
                              "the error weighted by each output's loss sensitivity, the diagonal Fisher; or "
                              "within each layer type, each type keeping ratio), or the same fraction per layer"),
    "fisher_weighted": Option(bool, False, help="allocation=fisher: each truncation minimizes the Fisher-weighted "
                                                "output error too (FWSVD on the whitened weight), not only the "
                                                "ranks"),
    "fisher_samples": Option(int, 1, check=lambda n: n >= 1, allowed=">= 1",
                             help="allocation=fisher: calibration samples (batches) run backward for the Fisher"),
    "sequential": Option(bool, True, help="whitened: factor each layer on the outputs of the layers before it as "
                                          "factored (else all layers on the uncompressed model)"),
    "update": Option(bool, False, help="whitened, sequential: fit the factors to the uncompressed model's outputs "
                                       "(closed-form least squares; on SmolLM2-135M it loses on held-out text, "
                                       "refit=full or up: see benchmarks/RESULTS.md)"),
    "refit": Option(str, "full", choices=("full", "up"),
                    help="update: fit the whole weight then truncate (full), or keep the whitened truncation's "
                         "down-projection and refit only the up-projection (up)"),
    "damp": Option(float, 0.01, check=lambda d: d >= 0, allowed=">= 0",
                   help="update: ridge toward the original weight, relative to each input channel's energy"),
})
def lowrank(g: Graph, ctx, method: str, ratio: float, ranks: str, share_input: bool, rank_multiple: int,
            allocation: str, fisher_weighted: bool, fisher_samples: int, sequential: bool, update: bool, refit: str, damp: float):
    """Factor linears into two smaller linears; see the module docstring."""
    from .quantize import dequantize_layers, requantize_layers
    explicit = match_patterns(ranks, "ranks", "lowrank")
    for _, val in explicit:
        if val != "full" and not (val.isdigit() and int(val) > 0):
            raise PipelineError(f"pass 'lowrank': option 'ranks' values must be positive ints or 'full', got {val!r}")
    linears = dense_linears(g)
    if explicit:
        require_match(g, [p for p, _ in explicit], [l.weight.name for l in linears], "ranks", "lowrank")
        linears = [l for l in linears if any(p.search(l.weight.name) for p, _ in explicit)]
    what = f"lowrank{{method={method}}}"
    if allocation == "fisher" and not (method == "whitened" and sequential):
        raise PipelineError("pass 'lowrank': option allocation='fisher' needs method=whitened and sequential=true, "
                            f"got method={method!r}, sequential={sequential}")
    if fisher_weighted and allocation != "fisher":
        raise PipelineError(f"pass 'lowrank': option fisher_weighted=true needs allocation=fisher, got {allocation!r}")
    if method == "whitened" and sequential:
        samples = normalize_samples(getattr(ctx, "calibration", None))
        if not samples:
            calibration_stats(g, ctx, [], need=True, what=what)     # raises: whitening needs calibration
    requant = dequantize_layers(g)  # running after quantize: factor the float weights, then re-quantize
    groups = _group(linears, share_input)
    if method == "whitened" and sequential:
        _lowrank_sequential(g, ctx, samples, groups, explicit, ratio, rank_multiple, allocation,
                            refit if update else None, damp, fisher_samples, fisher_weighted)
        requantize_layers(g, requant, "lowrank")
        return dce(g)
    stats = calibration_stats(g, ctx, [grp[0].node for grp in groups], need=method == "whitened", what=what)
    facts = []
    for grp in progress(groups, getattr(ctx, "progress", True), desc=what, unit="layer"):
        gram = stats[grp[0].node.name].gram if stats else None
        facts.append(factorize(_stacked(grp), gram, method == "whitened"))
    rank_of = _ranks(groups, [f.err for f in facts], explicit, ratio, rank_multiple, allocation)
    for grp, f, r in zip(groups, facts, rank_of):
        if r is not None:
            gram = stats[grp[0].node.name].gram if stats else None
            _rewrite(g, grp, f, r, method, lambda w, w2: output_error(w, w2, gram),
                     "calibration" if gram is not None else "weights")
    requantize_layers(g, requant, "lowrank")
    return dce(g)


def _lowrank_sequential(g: Graph, ctx, samples, groups, explicit, ratio, multiple, allocation, update, damp,
                        fisher_samples: int = 1, fisher_weighted: bool = False) -> None:
    """Ranks from the uncompressed model's whitened spectra (one walk holding one Gram at a time;
    from fewer batches than all, the 1536-wide inputs' Grams lose rank, their spectra's tails look
    small and the allocation cuts those layers too deep), then a second walk factoring each layer on
    the compressed layers' outputs."""
    show = getattr(ctx, "progress", True)
    lead = {grp[0].node: grp for grp in groups}
    curves: dict = {}
    fisher, weight_of = None, {}
    if allocation == "fisher":
        members = [l.node for grp in groups for l in grp]
        fisher = output_fisher(g, samples[:fisher_samples], members)
        if fisher_weighted:
            for node, grp in lead.items():
                weight_of[node] = _fisher_rows(torch.cat([fisher[l.node.name] for l in grp]))
    if not explicit and allocation != "uniform":
        def measure(x, nodes, st):
            for node in nodes:
                w = _stacked(lead[node])
                if fisher is None:
                    curves[node] = whitened_spectrum(w, st.gram)
                elif node in weight_of:
                    d, scale = weight_of[node]
                    curves[node] = whitened_spectrum(d[:, None] * w.double(), st.gram, normalize=False) * scale
                else:
                    curves[node] = fisher_spectrum(w, st.gram, torch.cat([fisher[l.node.name] for l in lead[node]]))
        calibrate_sequentially(g, samples, list(lead), measure,
                               progress=show, desc="lowrank{allocation}")
    rank_of = _ranks(groups, [curves.get(grp[0].node) for grp in groups], explicit, ratio, multiple, allocation)
    plan = {grp[0].node: (grp, r) for grp, r in zip(groups, rank_of) if r is not None}

    def compress(x, nodes, st):
        for node in nodes:
            grp, r = plan[node]
            w = _stacked(grp)
            if update:
                f = factorize_fitted(w, st, damp) if update == "full" else refit_up(w, st, r, damp)
                _rewrite(g, grp, f, r, "whitened", lambda a, b: fitted_error(a, b, st), "calibration (uncompressed)")
            elif node in weight_of:
                d = weight_of[node][0]
                f = factorize(d[:, None] * w.double(), st.gram, True)
                f.B = f.B / d[:, None]
                _rewrite(g, grp, f, r, "whitened", lambda a, b: output_error(a, b, st.gram), "calibration")
            else:
                f = factorize(w, st.gram, True)
                _rewrite(g, grp, f, r, "whitened", lambda a, b: output_error(a, b, st.gram), "calibration")
    calibrate_sequentially(g, samples, list(plan), compress, progress=show, desc="lowrank{method=whitened}",
                           reference=update is not None)


def _fisher_rows(fisher: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Row weights sqrt(F_j / mean F) for a Fisher-weighted truncation (floored at 1/20 so that no
    output row is treated as free) and the scale that puts its error back in loss units."""
    mean = float(fisher.double().mean().clamp_min(1e-300))
    return (fisher.double() / mean).sqrt().clamp_min(0.05), mean


def _stacked(grp: list[Linear]) -> torch.Tensor:
    return torch.cat([l.tensor for l in grp], 0)


def _ranks(groups, curves, explicit, ratio: float, multiple: int, allocation: str) -> list[Optional[int]]:
    """Per group: None (stay dense) or its rank, from ``ranks=`` or under the ``ratio`` budget."""
    if explicit:
        out = []
        for grp in groups:
            val = next(v for p, v in explicit if p.search(grp[0].weight.name))
            k = min(grp[0].shape[1], sum(l.shape[0] for l in grp))
            out.append(k if val == "full" else min(int(val), k))
        return out
    if allocation == "uniform":
        return [_uniform_rank(grp, ratio, multiple) for grp in groups]
    if allocation == "by-type":
        kinds: dict = {}
        for i, grp in enumerate(groups):
            kinds.setdefault(re.sub(r"\d+", "#", grp[0].weight.name), []).append(i)
        out: list = [None] * len(groups)
        for idx in kinds.values():
            for i, r in zip(idx, _allocate([groups[i] for i in idx], [curves[i] for i in idx], ratio, multiple)):
                out[i] = r
        return out
    return _allocate(groups, curves, ratio, multiple)


def _uniform_rank(grp: list[Linear], ratio: float, multiple: int) -> Optional[int]:
    """The largest multiple of ``multiple`` keeping at most ``ratio`` of the group's parameters;
    None where even that would not save parameters."""
    n_in, n_out = grp[0].shape[1], sum(l.shape[0] for l in grp)
    r = int(ratio * n_in * n_out / (n_in + n_out)) // multiple * multiple
    r = max(r, min(multiple, n_in, n_out))
    return r if r * (n_in + n_out) < n_in * n_out else None


def _group(linears: list[Linear], share_input: bool) -> list[list[Linear]]:
    if not share_input:
        return [[l] for l in linears]
    by_input: dict = {}
    for l in linears:
        by_input.setdefault(l.node.inputs[0], []).append(l)
    return list(by_input.values())


def _allocate(groups, curves, ratio: float, multiple: int) -> list[Optional[int]]:
    """Per group: None (stay dense) or a rank, under the parameter budget, from each group's
    relative output error for r = 0..k kept components."""
    options = []
    for grp, err in zip(groups, curves):
        n_in, n_out = grp[0].shape[1], sum(l.shape[0] for l in grp)
        dense = n_in * n_out
        opts = [(dense, 0.0, None)]
        k = len(err) - 1
        ranks = [r for r in range(multiple * ((k - 1) // multiple), 0, -multiple) if r * (n_in + n_out) < dense]
        opts += [(r * (n_in + n_out), float(err[r]), r) for r in ranks]
        options.append(opts)
    budget = ratio * sum(o[0][0] for o in options)
    choice = greedy_allocate([[(c, e) for c, e, _ in o] for o in options], budget)
    return [o[j][2] for o, j in zip(options, choice)]


def _rewrite(g: Graph, grp: list[Linear], f: Factorization, r: int, method: str, error, basis: str) -> None:
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
        record(g, l.weight.name, bytes_before=l.weight.type.nbytes(), rank=r, lowrank_method=method,
               shared_down_projection=len(grp) > 1, rel_error=error(l.tensor, b_data @ f.A[:r]), error_basis=basis)
        replace_linear(g, l.node, g.op("linear", h, b, l.node.inputs[2], before=l.node))
        row += out
