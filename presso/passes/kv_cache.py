"""kv_cache (Palu): low-rank K/V projections whose small latent is what the KV cache stores.

For each attention, its K and V projections ``linear(x, W) -> reshape [B, T, H, D] -> transpose
[B, H, T, D] (-> rotary for K)`` are found by meaning (through the canonical ``attention`` and
``rotary`` ops, never by names) and factored per group of heads with activation-whitened SVD:
``W_g ~= B_g A_g``; the latent ``h = x A^T`` ([B, T, groups*r]) is computed once per token.

* V, and K without RoPE: the up-projection is *absorbed*: scores use q' = q B_k (per head), values
  are the latent itself and the output is o' B_v^T, so full K/V are never built; the attention
  runs with the latent groups as its key/value heads (like GQA). K's bias cancels in the softmax;
  V's bias is added after.
* K with RoPE: K is rebuilt from the latent (B h -> reshape -> rotary) before attention; the decode
  program caches the latent and rebuilds keys over the cache (marked ``kv_cache_point``).

``grouping``: ``per-head`` (one factorization per KV head), ``group-head`` (``group_size`` heads
share one, Palu's G-LRD) or ``joint``. Ranks: ``rank_ratio`` of each group's full rank, uniform
or ``allocation="sensitivity"`` (greedy over layers and K vs V on the measured whitened error),
rounded to multiples of ``rank_multiple``; ``key_share`` is the keys' part of each layer's budget
under uniform allocation (on SmolLM2-135M values need more than keys: K 64 / V 128 of 192 beats
96 / 96 and 128 / 64, and the greedy search on relative errors, which starves keys, does worse;
benchmarks/RESULTS.md). Palu searches ranks with Fisher information, which
needs loss gradients over the calibration data; presso's reference runtime runs graphs forward
only, so the search here spends the budget on the exact (Gram-computed) output errors instead.

``loss``: what the truncation minimizes. ``input``: the K/V projection's output error on the
calibration inputs (SVD-LLM whitening). ``attention``: that error as the attention reads it, a
two-sided weighted SVD min ||M^1/2 (W - W') X||: for V, M = sum of W_o,i^T W_o,i over the query
heads i the KV head serves (the error reaching the residual stream through o_proj); for K,
M = E[q q^T] of those heads' queries (computed from W_q and the same input Gram: the error of the
scores), averaged over each RoPE rotation plane when K is rotated (RoPE mixes the pair's two
dims at every angle).

``latent_bits`` 4 / 8 (Palu's low-rank-aware quantization): a seeded, sign-randomized block
Hadamard rotation is folded into the factors (A' = H S A, B' = B S H: the product is unchanged)
so the cached latent has no outlier dims, then ``kv_quantize`` / ``kv_dequantize`` (per token,
``latent_group_size`` values per f16 scale) sit between the latent and its readers; the decode
program caches the quantized rows. The ``kv_quant`` pass quantizes K/V (or an earlier
kv_cache's latents) the same way without factoring: the plain KV-quantization baseline.
Attention the pass cannot prove standard is left unchanged with a warning naming the node.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import PipelineError
from ..ir.graph import Graph, Node, Value
from .compress_common import calibration_stats, derive, greedy_allocate, record
from .dce import dce
from .lowrank import Factorization, factorize
from .registry import Option, register_pass


@dataclass
class Projection:
    x: Value
    weight: Value
    bias: Optional[Value]
    heads: int
    dim: int
    linear: Node
    rotary: Optional[Node]


def match_projection(v: Value) -> Optional[Projection]:
    """v = [rotary](transpose(reshape(linear(x, W, b)) -> [B, T, H, D]) -> [B, H, T, D])."""
    rot = None
    n = v.node
    if n is not None and n.op == "rotary":
        rot, n = n, n.inputs[0].node
    if n is None or n.op != "transpose" or n.attrs["perm"] != [0, 2, 1, 3]:
        return None
    r = n.inputs[0].node
    if r is None or r.op != "reshape" or r.output.type.rank != 4:
        return None
    lin = r.inputs[0].node
    if lin is None or lin.op != "linear" or lin.inputs[1].kind != "param" or lin.inputs[1].type.rank != 2:
        return None
    h, d = r.output.type.shape[2], r.output.type.shape[3]
    if list(r.output.type.shape[:2]) != list(lin.output.type.shape[:2]) or h * d != lin.output.type.shape[-1]:
        return None
    return Projection(lin.inputs[0], lin.inputs[1], lin.inputs[2], h, d, lin, rot)


def unfuse_qkv(g: Graph) -> None:
    """slice(linear(x, W, b), last axis) -> linear(x, W[rows], b[rows]) when every reader of the
    fused projection slices it (GPT-2's c_attn), so that K and V have projections of their own."""
    users = g.users()
    for n in list(g.nodes):
        if n.op != "linear" or n.inputs[1].kind != "param":
            continue
        readers = users.get(n.output, [])
        last = n.output.type.rank - 1
        if not readers or not all(u.op == "slice" and u.attrs["axis"] == last and u.attrs["step"] == 1
                                  and isinstance(u.attrs["end"], int) for u in readers):
            continue
        w, b = g.params[n.inputs[1].name].data, (g.params[n.inputs[2].name].data if n.inputs[2] is not None else None)
        for u in readers:
            s, e = u.attrs["start"], min(u.attrs["end"], w.shape[0])
            wn = g.add_param(g.fresh_name(f"{n.inputs[1].name}.rows{s}"), w[s:e].contiguous())
            derive(g, wn.name, n.inputs[1].name)
            bn = g.add_param(g.fresh_name(f"{n.inputs[2].name}.rows{s}"), b[s:e].contiguous()) if b is not None else None
            g.replace_uses(u.output, g.op("linear", n.inputs[0], wn, bn, before=u))
    dce(g)


@register_pass("kv_cache", lossy=True, options={
    "rank_ratio": Option(float, 0.5, check=lambda r: 0 < r <= 1, allowed="in (0, 1]",
                         help="latent size as a fraction of the K/V width"),
    "grouping": Option(str, "group-head", choices=("per-head", "group-head", "joint")),
    "group_size": Option(int, 4, check=lambda g: g >= 1, allowed=">= 1", help="heads per group (group-head)"),
    "allocation": Option(str, "uniform", choices=("uniform", "sensitivity")),
    "loss": Option(str, "input", choices=("input", "attention"),
                   help="error the truncation minimizes: the projection's outputs, or as attention reads them"),
    "key_share": Option(float, 0.5, check=lambda r: 0 < r < 1, allowed="in (0, 1)",
                        help="fraction of the latent budget given to keys (uniform allocation)"),
    "rank_multiple": Option(int, 16, check=lambda m: m >= 1, allowed=">= 1", help="ranks are multiples of this"),
    "latent_bits": Option(int, 16, choices=(4, 8, 16), help="cached latent precision (16: float, unquantized)"),
    "latent_group_size": Option(int, 32, check=lambda m: m >= 2 and m % 2 == 0, allowed="even and >= 2",
                                help="latent values per quantization scale, per token"),
})
def kv_cache(g: Graph, ctx, rank_ratio: float, grouping: str, group_size: int, allocation: str, loss: str,
             key_share: float, rank_multiple: int, latent_bits: int, latent_group_size: int):
    """Palu's low-rank KV projection; see the module docstring."""
    if latent_bits < 16:   # the quantization groups tile each latent group exactly
        rank_multiple = math.lcm(rank_multiple, latent_group_size)
    unfuse_qkv(g)
    plans = []
    for a in [n for n in g.nodes if n.op == "attention"]:
        pk, pv = match_projection(a.inputs[1]), match_projection(a.inputs[2])
        pq = a.inputs[0]
        if pk is None or pv is None or pv.rotary is not None or pq.type.rank != 4:
            warnings.warn(f"kv_cache: attention %{a.name} does not read K/V projections the pass can prove "
                          "standard (linear -> reshape -> transpose [-> rotary]); left unchanged", stacklevel=2)
            continue
        if pk.heads != pv.heads or pk.dim != pv.dim:
            warnings.warn(f"kv_cache: attention %{a.name} has K and V of different shapes; left unchanged", stacklevel=2)
            continue
        gs = {"per-head": 1, "group-head": min(group_size, pk.heads), "joint": pk.heads}[grouping]
        if pk.heads % gs:
            raise PipelineError(f"pass 'kv_cache': group_size={gs} does not divide the {pk.heads} KV heads of "
                                f"attention %{a.name}")
        plans.append((a, pk, pv, gs))
    if not plans:
        warnings.warn("kv_cache: no attention with standard K/V projections; graph unchanged", stacklevel=2)
        return g
    g.meta.setdefault("kv_cache_bytes_per_token_uncompressed", sum(
        (a.inputs[1].type.shape[-3] * a.inputs[1].type.shape[-1] + a.inputs[2].type.shape[-3] * a.inputs[2].type.shape[-1])
        * a.inputs[1].type.dtype.bits // 8 for a in g.nodes if a.op == "attention"))
    stats = calibration_stats(g, ctx, [p.linear for _, pk, pv, _ in plans for p in (pk, pv)], need=True,
                              what="kv_cache (whitened SVD)")
    facts = []
    users = g.users() if loss == "attention" else {}
    for a, pk, pv, gs in plans:
        metrics = _attention_metrics(g, a, pk, pv, stats[pk.linear.name].gram, users) if loss == "attention" \
            else (None, None)
        per = []
        for p, m in zip((pk, pv), metrics):
            w = g.params[p.weight.name].data
            gram = stats[p.linear.name].gram
            n = gs * p.dim
            per.append([weighted_factorize(w[i * n:(i + 1) * n], gram, None if m is None else m[i * n:(i + 1) * n, i * n:(i + 1) * n])
                        for i in range(p.heads // gs)])
        facts.append(per)
    ranks = _allocate(plans, facts, rank_ratio, allocation, rank_multiple, key_share)
    for (a, pk, pv, gs), per, (rk, rv) in zip(plans, facts, ranks):
        if latent_bits < 16:
            per = [[_rotate(f, r) for f in fs] for fs, r in zip(per, (rk, rv))]
        _rewrite(g, a, pk, pv, gs, per, rk, rv)
        for p in (pk, pv):
            record(g, p.weight.name, kv_loss=loss, kv_latent_bits=latent_bits,
                   kv_latent_group_size=latent_group_size if latent_bits < 16 else None)
    if latent_bits < 16:
        quantize_cache_points(g, latent_bits, latent_group_size, "kv_cache")
    return dce(g)


def weighted_factorize(w: torch.Tensor, gram: torch.Tensor, metric: Optional[torch.Tensor]) -> Factorization:
    """Rank-ordered factors minimizing ||M^1/2 (W - B A) X|| (X X^T = gram): the SVD of M^1/2 W L
    (L L^T = gram), mapped back; without ``metric``, the whitened SVD (M = I)."""
    if metric is None:
        return factorize(w, gram, whitened=True)
    e, Q = torch.linalg.eigh(metric.double())
    e = e.clamp_min(1e-6 * e.clamp_min(0).mean().clamp_min(1e-30))
    root, inv = (Q * e.sqrt()) @ Q.T, (Q * e.rsqrt()) @ Q.T
    f = factorize(root @ w.double(), gram, whitened=True)
    return Factorization(A=f.A, B=inv @ f.B, err=f.err)


def _out_projection(g: Graph, a: Node, users: dict) -> Optional[torch.Tensor]:
    """W_o when the attention's output goes transpose -> reshape [B, T, H*D] -> linear(W_o) only
    (``users``: the graph's readers of each value, taken once for all attentions)."""
    n = users.get(a.output, [])
    if len(n) != 1 or n[0].op != "transpose" or n[0].attrs["perm"] != [0, 2, 1, 3]:
        return None
    r = users.get(n[0].output, [])
    if len(r) != 1 or r[0].op != "reshape" or r[0].output.type.rank != 3:
        return None
    lin = users.get(r[0].output, [])
    if len(lin) != 1 or lin[0].op != "linear" or lin[0].inputs[1].kind != "param" or lin[0].inputs[0] is not r[0].output:
        return None
    return g.params[lin[0].inputs[1].name].data


def _attention_metrics(g: Graph, a: Node, pk: Projection, pv: Projection, gram: torch.Tensor, users: dict):
    """(M_k, M_v), block-diagonal over KV heads [hkv*D, hkv*D] (see the module docstring); None
    where the query / output projection is not the standard form."""
    H, D, hkv = a.inputs[0].type.shape[1], pk.dim, pk.heads
    rep = H // hkv
    mk = mv = None
    pq = match_projection(a.inputs[0])
    if pq is not None and pq.x is pk.x and pq.heads == H and pq.dim == D:
        wq = g.params[pq.weight.name].data.double().reshape(H, D, -1)
        cq = torch.einsum("hdi,ij,hej->hde", wq, gram.double(), wq)             # E[q q^T] per query head
        ck = cq.reshape(hkv, rep, D, D).sum(1)
        if pk.rotary is not None:      # rotate_half pairs dim d with d + D/2: average over each plane
            diag = ck.diagonal(dim1=1, dim2=2)
            plane = (diag[:, :D // 2] + diag[:, D // 2:]) / 2
            ck = torch.diag_embed(torch.cat((plane, plane), 1))
        mk = torch.block_diag(*ck)
    wo = _out_projection(g, a, users)
    if wo is not None and wo.shape[1] == H * D:
        wo = wo.double().reshape(wo.shape[0], H, D)
        cv = torch.einsum("ohd,ohe->hde", wo, wo).reshape(hkv, rep, D, D).sum(1)
        mv = torch.block_diag(*cv)
    return mk, mv


def _rotate(f: Factorization, r: int) -> Factorization:
    """Fold a seeded, sign-randomized block Hadamard into the first r components: the product
    B A is unchanged and the latent's energy is spread over each block (no outlier dims)."""
    from ..ir.ops import hadamard_matrix
    block = r & -r                     # the largest power of two dividing r
    gen = torch.Generator().manual_seed(r)
    signs = torch.randint(0, 2, (r,), generator=gen).double() * 2 - 1
    h = torch.block_diag(*[hadamard_matrix(block, torch.float64)] * (r // block)) * signs[None, :]   # H S, orthogonal
    A, B = f.A.double().clone(), f.B.double().clone()
    A[:r] = h.T @ A[:r]
    B[:, :r] = B[:, :r] @ h
    return Factorization(A=A, B=B, err=f.err)


def quantize_cache_points(g: Graph, bits: int, group_size: int, pass_name: str) -> int:
    """Put ``kv_quantize`` -> ``kv_dequantize`` after every value the decode program would cache
    (kv_cache's marked latents, else each attention's K/V projection outputs) and move the cache
    mark onto the quantized rows. Returns how many were quantized."""
    from .decode import _cache_point
    done = 0
    for a in [n for n in g.nodes if n.op == "attention"]:
        for which, val in (("k", a.inputs[1]), ("v", a.inputs[2])):
            point = _cache_point(val)
            if point is val:
                proj = match_projection(val)
                if proj is None:
                    warnings.warn(f"{pass_name}: the {which} of attention %{a.name} is not a projection the pass "
                                  "can prove standard; its cache is left unquantized", stacklevel=3)
                    continue
                point = proj.linear.output
            width = point.type.shape[-1]
            if point.node.op == "kv_quantize" or not point.type.dtype.is_float:
                continue
            if not isinstance(width, int) or width % group_size:
                raise PipelineError(f"pass '{pass_name}': group_size={group_size} does not divide the {which} cache "
                                    f"width {width} of attention %{a.name} (%{point.name})")
            nxt = g.nodes[g.nodes.index(point.node) + 1]
            q = g.op("kv_quantize", point, bits=bits, group_size=group_size, before=nxt)
            dq = g.op("kv_dequantize", q, bits=bits, group_size=group_size, width=width,
                      dtype=point.type.dtype.value, before=nxt)
            g.replace_uses(point, dq)
            q.node.inputs = [point]
            q.node.meta["kv_cache_point"] = point.node.meta.pop("kv_cache_point", which)
            done += 1
    return done


def _allocate(plans, facts, ratio: float, allocation: str, multiple: int, key_share: float) -> list[tuple[int, int]]:
    """A rank per layer and operand (the same for every group of that layer), a multiple of
    ``multiple`` (or the full rank). ``uniform``: ``key_share`` of each layer's budget (``ratio``
    of its K and V widths) to keys, the rest to values. ``sensitivity``: the budget (ratio of all
    latent widths) is spent greedily where the relative output error drops most per cached value."""
    def full(p, gs):
        return gs * p.dim

    def rounded(r, n):
        return min(n, max(multiple, multiple * round(r / multiple)))
    if allocation == "uniform":
        out = []
        for _, pk, pv, gs in plans:
            budget = ratio * (full(pk, gs) + full(pv, gs))
            out.append((rounded(key_share * budget, full(pk, gs)), rounded((1 - key_share) * budget, full(pv, gs))))
        return out
    options = []
    for (a, pk, pv, gs), per in zip(plans, facts):
        for p, fs in zip((pk, pv), per):
            n = full(p, gs)
            opts = [(n * len(fs), 0.0, n)]
            for r in range((n - 1) // multiple * multiple, 0, -multiple):
                opts.append((r * len(fs), float(sum(f.err[r] for f in fs) / len(fs)), r))
            options.append(opts)
    budget = ratio * sum(o[0][0] for o in options)
    choice = greedy_allocate([[(c, e) for c, e, _ in o] for o in options], budget)
    flat = [o[j][2] for o, j in zip(options, choice)]
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(plans))]


def _latent(g: Graph, a: Node, p: Projection, fs, r: int, which: str) -> Value:
    """h = x A^T for every group, [B, T, groups * r]; marked as what the decode program caches."""
    dtype = g.params[p.weight.name].data.dtype
    A = torch.cat([f.A[:r] for f in fs], 0).to(dtype)
    name = g.fresh_name(p.weight.name + ".palu_a")
    an = g.add_param(name, A.contiguous())
    derive(g, name, p.weight.name)
    h = g.op("linear", p.x, an, None, before=a)
    h.node.meta["kv_cache_point"] = which
    return h


def _rewrite(g, a: Node, pk: Projection, pv: Projection, gs: int, per, rk: int, rv: int) -> None:
    q = a.inputs[0]
    B, H, T, D = q.type.shape
    hkv, groups = pk.heads, pk.heads // gs
    n_rep = H // hkv
    scale = a.attrs["scale"] if a.attrs["scale"] is not None else 1.0 / math.sqrt(D)
    bk_list, bv_list = per
    hk = _latent(g, a, pk, bk_list, rk, "k")
    hv = _latent(g, a, pv, bv_list, rv, "v")
    dtype = q.type.dtype.torch

    def heads(h, r):  # [B, T, groups*r] -> [B, groups, T, r]
        return g.op("transpose", g.op("reshape", h, shape=[B, T, groups, r], before=a), perm=[0, 2, 1, 3], before=a)

    if pk.rotary is None:  # absorb B_k into the query: q'_i = q_i B_k[head(i)]
        wq = torch.stack([bk_list[(i // n_rep) // gs].B[((i // n_rep) % gs) * D:((i // n_rep) % gs + 1) * D, :rk]
                          for i in range(H)]).to(dtype)                           # [H, D, rk]
        wq_p = g.add_param(g.fresh_name(pk.weight.name + ".palu_qk"), wq.contiguous())
        derive(g, wq_p.name, pk.weight.name)
        q_lat = g.op("matmul", q, wq_p, before=a)
        k_in = heads(hk, rk)
    else:  # RoPE: rebuild keys from the latent, then rotate
        Bk = torch.block_diag(*[f.B[:, :rk] for f in bk_list]).to(dtype)          # [hkv*D, groups*rk]
        bk = g.add_param(g.fresh_name(pk.weight.name + ".palu_b"), Bk.contiguous())
        derive(g, bk.name, pk.weight.name)
        kflat = g.op("linear", hk, bk, pk.bias, before=a)
        k = g.op("transpose", g.op("reshape", kflat, shape=[B, T, hkv, D], before=a), perm=[0, 2, 1, 3], before=a)
        rot = pk.rotary
        k_in = g.op("rotary", k, rot.inputs[1], rot.inputs[2], before=a)
        q_lat = q
    v_in = heads(hv, rv)
    if pk.rotary is not None and groups != hkv:  # full-width keys per KV head: latent values serve each head
        v_in = _expand_groups(g, a, v_in, hkv, groups)
    o_lat = g.op("attention", q_lat, k_in, v_in, a.inputs[3], causal=a.attrs["causal"], scale=scale,
                 softcap=a.attrs["softcap"], before=a)
    wv = torch.stack([bv_list[(i // n_rep) // gs].B[((i // n_rep) % gs) * D:((i // n_rep) % gs + 1) * D, :rv].T
                      for i in range(H)]).to(dtype)                               # [H, rv, D]
    wv_p = g.add_param(g.fresh_name(pv.weight.name + ".palu_vo"), wv.contiguous())
    derive(g, wv_p.name, pv.weight.name)
    out = g.op("matmul", o_lat, wv_p, before=a)
    if pv.bias is not None:
        bias = g.params[pv.bias.name].data.reshape(hkv, 1, D).repeat_interleave(n_rep, 0)   # [H, 1, D]
        bp = g.add_param(g.fresh_name(pv.bias.name + ".palu"), bias.contiguous())
        out = g.op("add", out, bp, before=a)
    g.replace_uses(a.output, out)
    for p, fs, r in ((pk, bk_list, rk), (pv, bv_list, rv)):
        record(g, p.weight.name, bytes_before=p.weight.type.nbytes(), kv_rank=r, kv_rank_full=gs * D,
               kv_heads_per_group=gs, kv_groups=groups, rel_error=float(sum(f.err[r] for f in fs) / len(fs)),
               error_basis="calibration", rope=p.rotary is not None)


def _expand_groups(g, a, v, hkv, groups):
    """Latent values shared by a group serve each of the group's KV heads (keys are per head)."""
    B, G, T, r = v.type.shape
    rep = hkv // groups
    v5 = g.op("reshape", v, shape=[B, G, 1, T, r], before=a)
    return g.op("reshape", g.op("expand", v5, shape=[B, G, rep, T, r], before=a), shape=[B, hkv, T, r], before=a)


@register_pass("kv_quant", lossy=True, options={
    "bits": Option(int, 8, choices=(4, 8), help="bits per cached value"),
    "group_size": Option(int, 32, check=lambda m: m >= 2 and m % 2 == 0, allowed="even and >= 2",
                         help="cached values per f16 scale, per token"),
})
def kv_quant(g: Graph, ctx, bits: int, group_size: int):
    """Plain KV-cache quantization (per token and group): K before RoPE, V, or the latents of an
    earlier kv_cache pass; see ``quantize_cache_points``."""
    if not quantize_cache_points(g, bits, group_size, "kv_quant"):
        warnings.warn("kv_quant: no attention K/V the pass can quantize; graph unchanged", stacklevel=2)
    return dce(g)
