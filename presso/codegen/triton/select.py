"""Kernel selection for the ``cuda`` target: patterns rewriting a graph's nodes into the target
ops of ``ir/cuda_ops.py`` (one launch each), so the kernel every node runs is in the IR
(``print_ir_after="select_kernels"``) and the program builder (``program.py``) only emits.

Phases, each ``apply_patterns`` to a fixpoint (later phases match what earlier ones wrote):

1. a decode layer's RoPE and cache writes -> ``cuda.rotary_into_caches`` (matched on the
   canonical ops, before any of them is rewritten on its own);
2. ``linear`` of a weight producer reading params (``dequantize``, ``densify_nm``, both) -> a
   compressed-linear op reading the packed params;
3. a compressed linear's elementwise user (or, for a gated pair's stacked int4 linear, its
   split and the elementwise node of the two halves) -> the linear's epilogue;
4. single nodes: fused regions, norms, RoPE, quantized lookups, decode attention (latent caches
   read as stored, GQA over head-major caches, else masked SDPA), in-place cache writes.

Selecting again is a no-op, so the target may run it on graphs already selected (a decode
program built from a selected graph adds only its new attention and cache writes).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...ir.analysis import packed_weight_producer, quantized_nm_producers
from ...ir.expr import node_expr
from ...ir.graph import Graph, Node, Value
from ...ir.registry import canonical_op
from ...ir.types import DType, dims_product
from ...passes.rewrite import Rewriter, apply_patterns, pattern_table

SELECT_PATTERNS = ((2, 4), (4, 8))      # N:M patterns the select kernel runs (nm_select.py)
COMPRESSED_LINEARS = ("cuda.int4_linear", "cuda.int8_linear", "cuda.nm_linear", "cuda.nm_select_linear",
                      "cuda.nm_int4_linear", "cuda.nm_select_int4_linear")
MAX_EXTRA = 2                           # operands an epilogue reads besides the linear's result (epilogue.py)


def _is(n: Optional[Node], op: str) -> bool:
    """n computes ``op`` (itself, or a target op implementing it)."""
    return n is not None and canonical_op(n.op) == op


# ---- phase 2: compressed linears ------------------------------------------------------------------
def _compressed_linear(rw: Rewriter, n: Node) -> bool:
    from .int4 import tiled_layout_fits
    from .nm_select import fits as select_fits
    x, b = n.inputs[0], n.inputs[2]
    p = packed_weight_producer(n.inputs[1], rw.users)
    if p is not None and p.op == "dequantize":
        q, s, z = p.inputs
        a = p.attrs
        if a["bits"] == 4:          # (the type's shape is logical)
            rw.retarget(n, "cuda.int4_linear", [x, q, s, z, b], group_size=a["group_size"], dtype=a["dtype"],
                        tiled=tiled_layout_fits(a["group_size"], q.type.shape[1]))
        else:
            rw.retarget(n, "cuda.int8_linear", [x, q, s, z, b], group_size=a["group_size"], dtype=a["dtype"])
        return True
    if p is not None:
        vals, idx = p.inputs
        nn, m = p.attrs["n"], p.attrs["m"]
        select = ((nn, m) in SELECT_PATTERNS and vals.type.dtype in (DType.f16, DType.bf16)
                  and select_fits(vals.type.shape[1] * 2))
        rw.retarget(n, "cuda.nm_select_linear" if select else "cuda.nm_linear", [x, vals, idx, b], n=nn, m=m)
        return True
    chain = quantized_nm_producers(n.inputs[1], rw.users)
    if chain is None:
        return False
    d, q = chain
    codes, scales, zeros = q.inputs
    nn, m, gs = d.attrs["n"], d.attrs["m"], q.attrs["group_size"]
    select = (nn, m) in SELECT_PATTERNS and select_fits(codes.type.shape[1] * 2, group=gs)
    rw.retarget(n, "cuda.nm_select_int4_linear" if select else "cuda.nm_int4_linear",
                [x, codes, scales, zeros, d.inputs[1], b], n=nn, m=m, group_size=gs, dtype=q.attrs["dtype"])
    return True


# ---- phase 3: epilogues ---------------------------------------------------------------------------
def _expr(f: Node) -> Optional[str]:
    """The elementwise computation of ``f`` (a fused region, already selected or not, or one
    fusable op) as an expression over its operands, else None."""
    return f.attrs["expr"] if f.op == "cuda.elementwise" else node_expr(f)


def _epilogue_operand_fits(v: Value, out: Value) -> bool:
    """A float operand the kernel can read at the output tile: the output's shape, or one row of it."""
    t, o = v.type, out.type
    if not t.dtype.is_float:
        return False
    if t.shape == o.shape:
        return True
    return t.rank >= 1 and t.rank <= o.rank and t.shape[-1] == o.shape[-1] and all(d == 1 for d in t.shape[:-1])


def _gated_pair(rw: Rewriter, n: Node) -> Optional[tuple[Node, Node, str, int]]:
    """(split, elementwise node, its expression, the first half's operand) when a tiled int4
    linear's output is two stacked halves (``concat_linears``' gated pair) whose only user is one
    elementwise node of exactly those two: the kernel then computes both halves and the node."""
    out, users, outputs = n.outputs[0], rw.users, rw.g.outputs
    us = users.get(out, [])
    if n.op != "cuda.int4_linear" or not n.attrs["tiled"] or out in outputs or len(us) != 1 or us[0].op != "split":
        return None
    sp = us[0]
    sizes = sp.attrs["sizes"]
    if (len(sp.outputs) != 2 or sp.attrs["axis"] != out.type.rank - 1 or sizes[0] != sizes[1]
            or not isinstance(sizes[0], int) or sizes[0] % 16 or sp.meta.get("kv_cache_points")):
        return None
    fs = [users.get(h, []) for h in sp.outputs]
    if any(h in outputs or len(u) != 1 for h, u in zip(sp.outputs, fs)) or fs[0][0] is not fs[1][0]:
        return None
    f = fs[0][0]
    expr, fout = _expr(f), f.outputs[0]
    where = [[j for j, v in enumerate(f.inputs) if v is h] for h in sp.outputs]
    if (expr is None or len(f.inputs) != 2 or any(len(w) != 1 for w in where)
            or fout.type.shape != sp.outputs[0].type.shape or not fout.type.dtype.is_float):
        return None
    return sp, f, expr, where[0][0]


def _fold_epilogue(rw: Rewriter, n: Node) -> bool:
    """A compressed linear whose output's only user is an elementwise node (a fused region or one
    fusable op) takes that node's computation as its kernel epilogue: one launch and no round trip
    of the linear's output, provided the node's other operands (at most two, full-shaped or one
    row) are computed before the linear. A gated pair's stacked int4 linear takes the node of its
    two halves."""
    if n.attrs["epilogue"]:
        return False
    pair = _gated_pair(rw, n)
    if pair is not None:
        sp, f, expr, first = pair
        rw.retarget(n, n.op, n.inputs, **{**n.attrs, "pair": True, "epilogue": expr, "acc": first})
        rw.g.replace_uses(f.output, n.output)
        return True
    out = n.outputs[0]
    us = rw.users.get(out, [])
    if out in rw.g.outputs or len(us) != 1:
        return False
    f = us[0]
    expr = _expr(f)
    if expr is None:
        return False
    fout = f.outputs[0]
    acc = [j for j, v in enumerate(f.inputs) if v is out]
    others = [v for v in f.inputs if v is not out]
    order = {m: i for i, m in enumerate(rw.g.nodes)}
    if (fout.type.shape != out.type.shape or not fout.type.dtype.is_float or len(acc) != 1
            or len(others) > MAX_EXTRA
            or not all(_epilogue_operand_fits(v, out) and (v.node is None or order[v.node] < order[n]) for v in others)):
        return False
    rw.retarget(n, n.op, n.inputs + others, **{**n.attrs, "epilogue": expr, "acc": acc[0]})
    rw.g.replace_uses(fout, n.output)
    return True


# ---- phase 4: single nodes ------------------------------------------------------------------------
def _elementwise(rw: Rewriter, n: Node) -> bool:
    rw.retarget(n, "cuda.elementwise", n.inputs, expr=n.attrs["expr"])
    return True


def _norm(rw: Rewriter, n: Node) -> bool:
    if n.attrs["ndim"] != 1 or not n.inputs[0].type.dtype.is_float:
        return False
    rw.retarget(n, "cuda." + n.op, n.inputs, eps=n.attrs["eps"])
    return True


def _rotary(rw: Rewriter, n: Node) -> bool:
    from .rotary import fits
    x = n.inputs[0]
    if not (fits(x.type.shape) and all(v.type.dtype.is_float for v in n.inputs)
            and all(v.type.rank <= x.type.rank for v in n.inputs[1:])):
        return False
    rw.retarget(n, "cuda.rotary", n.inputs)
    return True


def _gather_dequant(rw: Rewriter, n: Node) -> bool:
    """Int4 tables the tiled layout allows are read in it (shared with a tied head's GEMV)."""
    from .int4 import tiled_layout_fits
    a = n.attrs
    tiled = a["bits"] == 4 and tiled_layout_fits(a["group_size"], n.inputs[1].type.shape[1])
    rw.retarget(n, "cuda.gather_dequant", n.inputs, **a, tiled=tiled)
    return True


def _cache_write(rw: Rewriter, n: Node) -> bool:
    """Write the new entries into the cache buffer itself (the reference copies the whole cache):
    valid because the old cache is an input nothing else reads."""
    if n.inputs[0].kind != "input" or len(rw.users.get(n.inputs[0], [])) != 1:
        return False
    rw.retarget(n, "cuda.cache_write", n.inputs, axis=n.attrs["axis"])
    return True


def _decode_attention(rw: Rewriter, n: Node) -> bool:
    """Latent caches read as stored (``_latent_attention``); else one token over head-major caches
    runs the GQA decode kernel (split over the sequence, only slots up to the position read);
    else SDPA over the whole cache with a position mask built once per run (soft-capped scores:
    the reference's softcapped attention), which reads no position back to the host."""
    if _latent_attention(rw, n):
        return True
    scale, softcap = n.attrs["scale"], n.attrs["softcap"]
    q, k, v, p = (x.type for x in n.inputs[:4])
    if (softcap is None and q.rank == 4 and q.shape[2] == 1 and k.rank == 4 and v.shape == k.shape and p.shape == (1,)
            and q.dtype == k.dtype == v.dtype and _pow2_at_least_16(q.shape[3]) and k.shape[3] == q.shape[3]
            and isinstance(k.shape[1], int) and isinstance(q.shape[1], int) and q.shape[1] % k.shape[1] == 0):
        rw.retarget(n, "cuda.gqa_decode_attention", n.inputs, scale=scale)
    else:
        rw.retarget(n, "cuda.masked_attention", n.inputs, scale=scale, softcap=softcap)
    return True


# ---- phase 1: RoPE into the caches ----------------------------------------------------------------
def _cache_write_under(v: Value) -> Optional[Node]:
    """The cache_update whose result v reads through a chain of per-token ops (views, the key
    rebuild's linear, its rotary): how a Palu attention reads its latent caches."""
    for _ in range(8):
        n = v.node
        if n is None:
            return None
        if n.op == "cache_update":
            return n
        if canonical_op(n.op) not in ("reshape", "transpose", "expand", "linear", "rotary"):
            return None
        v = n.inputs[0]
    return None


def _rotary_into_caches(rw: Rewriter, n: Node) -> bool:
    """A decode layer whose attention reads rotary(q) and caches just written, both written only
    here from caches that are inputs, the positions shared, becomes one launch at the earliest of
    its nodes where every input is computed and no reader of their results has run:

    * attention_cached(rotary(q), cache_update(Kc, rotary(k), pos), cache_update(Vc, v, pos)), the
      two rotations by the same cos / sin, head-major caches [B, Hkv, L, D];
    * Palu latents: the attention reads token-major caches [B, L, W] written with the k / v
      latents, through the kv_cache pass's views and key rebuild (keys rotate after it)."""
    from .rotary import fits as fits_rotary
    users = rw.users
    rq, ck, cv = n.inputs[0].node, _cache_write_under(n.inputs[1]), _cache_write_under(n.inputs[2])
    if not _is(rq, "rotary") or ck is None or cv is None or ck is cv:
        return False
    rk = ck.inputs[1].node
    if n.inputs[1].node is ck:                    # full keys, rotated before the cache
        if (not _is(rk, "rotary") or users.get(rk.outputs[0]) != [ck] or rk.inputs[1:] != rq.inputs[1:]
                or n.inputs[2].node is not cv or ck.attrs["axis"] != 2 or cv.attrs["axis"] != 2
                or any(c.inputs[0].type.rank != 4 for c in (ck, cv))):
            return False
    elif any(c.inputs[0].type.rank != 3 or c.attrs["axis"] != 1 for c in (ck, cv)):
        return False
    else:
        rk = None
    if (ck.inputs[2] is not cv.inputs[2] or
            any(c.inputs[0].kind != "input" or len(users.get(c.inputs[0], [])) != 1
                or c.inputs[0].type.dtype != c.inputs[1].type.dtype for c in (ck, cv))):
        return False
    if (rq.inputs[0].type.rank != 4 or not fits_rotary(rq.inputs[0].type.shape)
            or any(v.type.rank > 2 for v in rq.inputs[1:]) or not rq.outputs[0].type.dtype.is_float):
        return False
    if rk is None and any(not isinstance(c.inputs[0].type.shape[-1], int) or c.inputs[0].type.shape[-1] % 2
                          for c in (ck, cv)):
        return False
    four = [x for x in (rq, rk, ck, cv) if x is not None]
    k = rk.inputs[0] if rk is not None else ck.inputs[1]
    inputs = [rq.inputs[0], k, cv.inputs[1], rq.inputs[1], rq.inputs[2], ck.inputs[0], cv.inputs[0], ck.inputs[2]]
    order = {m: i for i, m in enumerate(rw.g.nodes)}
    ready = max((order[v.node] for v in inputs if v.node is not None), default=-1)
    for at in sorted(four, key=order.get):
        if order[at] > ready and all(order[u] > order[at] for x in (rq, ck, cv) for u in users.get(x.outputs[0], [])
                                     if u not in four):
            rw.fuse(four, "cuda.rotary_into_caches", inputs, [rq.outputs[0], ck.outputs[0], cv.outputs[0]], before=at,
                    axis=ck.attrs["axis"], rotate_k=rk is not None)
            return True
    return False


# ---- latent attention -----------------------------------------------------------------------------
def _latent_cache(v: Value) -> Optional[tuple[Value, int, int]]:
    """v = transpose(reshape(c, [B, L, G, r]), perm=[0, 2, 1, 3]) of a [B, L, G*r] cache c (how
    the kv_cache pass's absorbed form reads a latent cache per group), or that view's groups each
    repeated for several KV heads (reshape -> expand -> reshape: the RoPE form's values): (c, G, r)."""
    t = v.node
    if t is not None and t.op == "reshape" and t.inputs[0].node is not None and t.inputs[0].node.op == "expand":
        e = t.inputs[0].node
        r5 = e.inputs[0].node
        if r5 is None or r5.op != "reshape" or e.output.type.rank != 5 or r5.output.type.shape[2] != 1:
            return None
        B, G, rep, L, r = e.output.type.shape
        if list(t.output.type.shape) != [B, dims_product([G, rep]), L, r]:
            return None
        t = r5.inputs[0].node
    if t is None or t.op != "transpose" or list(t.attrs["perm"]) != [0, 2, 1, 3]:
        return None
    r = t.inputs[0].node
    if r is None or r.op != "reshape" or r.inputs[0].type.rank != 3:
        return None
    c = r.inputs[0]
    B, L, G, rank = r.output.type.shape
    if not (isinstance(G, int) and isinstance(rank, int)) or tuple(c.type.shape) != (B, L, G * rank):
        return None
    return c, G, rank


def diagonal_blocks(w: torch.Tensor, groups: int, r: int, kd: int) -> list[torch.Tensor]:
    """The ``groups`` diagonal blocks [kd, r] of a block-diagonal [groups*kd, groups*r] weight."""
    return [w[i * kd:(i + 1) * kd, i * r:(i + 1) * r] for i in range(groups)]


def _rope_latent_keys(k: Value, groups: int, params: dict) -> Optional[tuple]:
    """k = rotary(transpose(reshape(linear(c, W), [B, L, Hkv, D]), perm=[0, 2, 1, 3]), cos, sin): keys
    rebuilt from a latent cache c [B, L, G*R] and rotated (the kv_cache pass's RoPE form), W a
    param [Hkv*D, G*R] block-diagonal over ``groups`` (each group's latent rebuilds only its own
    KV heads; checked on the data), cos / sin params [L, D] by cache slot. Returns
    (c, W, cos, sin, Hkv, D) or None."""
    rot = k.node
    if not _is(rot, "rotary"):
        return None
    t = rot.inputs[0].node
    if t is None or t.op != "transpose" or list(t.attrs["perm"]) != [0, 2, 1, 3]:
        return None
    rs = t.inputs[0].node
    lin = rs.inputs[0].node if rs is not None and rs.op == "reshape" else None
    if lin is None or lin.op != "linear" or lin.inputs[2] is not None or lin.inputs[1].kind != "param":
        return None
    c, w = lin.inputs[0], lin.inputs[1]
    B, L, hkv, D = rs.output.type.shape
    cos, sin = rot.inputs[1:]
    if (c.type.rank != 3 or tuple(c.type.shape[:2]) != (B, L) or not isinstance(hkv, int) or hkv % groups
            or any(x.kind != "param" or tuple(x.type.shape) != (L, D) for x in (cos, sin))):
        return None
    data = params[w.name].data
    width, kd = c.type.shape[2], hkv // groups * D
    if tuple(data.shape) != (hkv * D, width) or width % groups:
        return None
    if not torch.equal(torch.block_diag(*diagonal_blocks(data, groups, width // groups, kd)), data):
        return None
    return c, w, cos, sin, hkv, D


def _pow2_at_least_16(v) -> bool:
    return isinstance(v, int) and v >= 16 and v & (v - 1) == 0


def _param_matmul_into(q: Value, users: dict) -> Optional[tuple[Node, Value, Value]]:
    """q = matmul(x, W) read only by its one user, x one decode token's heads [B, H, 1, D] and W a
    param [H, D, R] (the kv_cache pass's absorption of B_k into the query): (matmul, x, W)."""
    m = q.node
    if m is None or m.op != "matmul" or len(users.get(q, [])) != 1:
        return None
    x, w = m.inputs
    if w.kind != "param" or x.type.rank != 4 or x.type.shape[2] != 1 or \
            tuple(w.type.shape) != (x.type.shape[1], x.type.shape[3], q.type.shape[3]):
        return None
    return m, x, w


def _param_matmul_from(o: Value, users: dict, outputs: list) -> Optional[tuple[Node, Value]]:
    """o's only user is matmul(o, W), W a param [H, Rv, D] (the value up-projection): (matmul, W)."""
    us = users.get(o, [])
    if o in outputs or len(us) != 1 or us[0].op != "matmul" or us[0].inputs[0] is not o:
        return None
    w = us[0].inputs[1]
    if w.kind != "param" or w.type.rank != 3 or tuple(w.type.shape[:2]) != (o.type.shape[1], o.type.shape[3]):
        return None
    return us[0], w


def _latent_attention(rw: Rewriter, n: Node) -> bool:
    """A decode step's attention over Palu latent caches -> ``cuda.latent_attention``, which reads
    the caches as they are stored, [B, L, G*r], instead of SDPA over per-group views:

    * absorbed form (no RoPE): the query was multiplied into the key latent space; that absorption
      before the attention, when it is the kv_cache pass's per-head param matmul, runs in its kernels;
    * RoPE form: the keys the graph rebuilds over the whole cache (linear, reshape, transpose,
      rotary) are rebuilt tile by tile inside the kernel, only for the slots up to the position;
      under GQA each rebuilt key head serves its query heads.

    Values stay latent in both; the value up-projection after the attention, when it is the pass's
    per-head param matmul, runs in the kernel's merge: the op then replaces that matmul's node."""
    q = n.inputs[0]
    v = _latent_cache(n.inputs[2])
    if v is None or q.type.rank != 4 or q.type.shape[2] != 1 or not q.type.dtype.is_float:
        return False
    hv, Gv, RV = v
    H = q.type.shape[1]
    k = _latent_cache(n.inputs[1])
    rope = None if k is not None else _rope_latent_keys(n.inputs[1], Gv, rw.g.params)
    if k is not None:
        hk, G, R = k
        ok = q.type.shape[3] == R
    elif rope is not None:
        hk, w, cos, sin, hkv, D = rope
        G, R = Gv, hk.type.shape[2] // Gv
        ok = (q.type.shape[3] == D and isinstance(H, int) and H % hkv == 0 and _pow2_at_least_16(D // 2)
              and q.type.dtype == hk.type.dtype == w.type.dtype)
    else:
        return False
    # (the kv_cache pass states the scale: a latent's width is not the head dim SDPA's default uses)
    if not (ok and isinstance(H, int) and H % G == 0 and G % Gv == 0 and _pow2_at_least_16(R)
            and _pow2_at_least_16(RV) and n.attrs["scale"] is not None and n.attrs["softcap"] is None):
        return False
    starts = n.inputs[4] if len(n.inputs) > 4 else None
    up = _param_matmul_from(n.outputs[0], rw.users, rw.g.outputs)
    absorb = None if rope else _param_matmul_into(q, rw.users)
    inputs = [absorb[1] if absorb else q, hk, hv, n.inputs[3], absorb[2] if absorb else None,
              w if rope else None, cos if rope else None, sin if rope else None, up[1] if up else None, starts]
    at = up[0] if up else n
    rw.retarget(at, "cuda.latent_attention", inputs, scale=n.attrs["scale"], groups=G, value_groups=Gv)
    return True


PHASES = (
    pattern_table(("attention_cached", _rotary_into_caches)),
    pattern_table(("linear", _compressed_linear)),
    pattern_table(*((op, _fold_epilogue) for op in COMPRESSED_LINEARS)),
    pattern_table(("fused_elementwise", _elementwise), ("rms_norm", _norm), ("layer_norm", _norm),
                  ("rotary", _rotary), ("gather_dequantize", _gather_dequant), ("attention_cached", _decode_attention),
                  ("cache_update", _cache_write)),
)


def select_kernels(g: Graph) -> Graph:
    """Rewrite ``g`` in place into the ``cuda`` target's ops (see the module docstring)."""
    for patterns in PHASES:
        apply_patterns(g, patterns)
    return g
