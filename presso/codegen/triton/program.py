"""A graph -> the ``cuda`` target's program: one launch per node, Triton kernels where presso has
one (compressed linears reading packed weights, fused elementwise regions, norms), the op's
torch implementation on the device for the rest (matmuls with dense weights, attention, layout).

Weight producers (``dequantize``, ``densify_nm``) feeding exactly one linear are never run: the
linear's kernel reads their packed params. ``Program.kernels`` says which node runs what.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ...ir.analysis import packed_weight_producer, quantized_nm_producers
from ...ir.expr import node_expr
from ...ir.graph import Graph, Node, Value
from ...ir.registry import get_op
from ...ir.types import DType, dims_product


@dataclass
class Step:
    node: Node
    kernel: str                      # "triton:<name>" or "torch"
    run: Callable                    # (env lookups resolved by the runtime) -> list of tensors
    inputs: list                     # Values read
    # params the kernel reads in its own layout: (input positions, fn(those tensors) -> the
    # kernel's forms); the runtime applies it once, at load, and keeps only the result
    prepare: Optional[tuple[tuple[int, ...], Callable]] = None
    # the Values its run returns, when they are not ``node``'s outputs (a step covering several nodes)
    produces: Optional[list] = None

    @property
    def outputs(self) -> list:
        return self.produces if self.produces is not None else self.node.outputs


def _nm_index_packer(kept: int, m: int):
    """A ``prepare`` function repacking an N:M index into the form the kernels read
    (``pack_nm_index``), and the dict where it records that form's bits per entry for ``run``."""
    from .linear import pack_nm_index
    bits = {}

    def pack_index(it):
        packed, bits["index"] = pack_nm_index(it, kept, m)
        return (packed,)
    return pack_index, bits


SELECT_PATTERNS = ((2, 4), (4, 8))      # N:M patterns the select kernel runs (nm_select.py)


def _linear_step(n: Node, p: Node) -> Step:
    from .int4 import int4_linear, int4_linear_tiled, pack_int4, tiled_layout_fits
    from .linear import int8_linear, nm_linear
    from .nm_select import fits as select_fits, nm_select_linear, pack_nm_select
    x, b = n.inputs[0], n.inputs[2]
    a = p.attrs
    if p.op == "dequantize":
        q, s, z = p.inputs
        gs = a["group_size"]
        if a["bits"] == 4 and tiled_layout_fits(gs, q.type.shape[1]):      # (the type's shape is logical)
            def run_tiled(xt, w, _s, _z, bt, **epilogue):
                return [int4_linear_tiled(xt, w, bt, **epilogue)]
            return Step(n, "triton:int4_linear", run_tiled, [x, q, s, z, b],
                        prepare=((1, 2, 3), lambda qt, st, zt: (pack_int4(qt, st, zt, gs), None, None)))
        kern = int4_linear if a["bits"] == 4 else int8_linear

        def run(xt, qt, st, zt, bt, **epilogue):
            return [kern(xt, qt, st, zt, bt, gs, **epilogue)]
        return Step(n, f"triton:int{a['bits']}_linear", run, [x, q, s, z, b])
    vals, idx = p.inputs
    nn, m = a["n"], a["m"]
    if (nn, m) in SELECT_PATTERNS and vals.type.dtype in (DType.f16, DType.bf16) and select_fits(vals.type.shape[1] * 2):
        def run_select(xt, w, _i, bt, **epilogue):
            return [nm_select_linear(xt, w, bt, **epilogue)]
        return Step(n, f"triton:nm_select_{nn}_{m}", run_select, [x, vals, idx, b],
                    prepare=((1, 2), lambda vt, it: (pack_nm_select(vt, it, m), None)))
    pack_index, bits = _nm_index_packer(vals.type.shape[1], m)

    def run_nm(xt, vt, it, bt, **epilogue):
        return [nm_linear(xt, vt, it, nn, m, bt, index_bits=bits["index"], **epilogue)]
    return Step(n, f"triton:nm_linear_{nn}_{m}", run_nm, [x, vals, idx, b], prepare=((2,), pack_index))


def _nm_int4_step(n: Node, d: Node, q: Node) -> Step:
    """linear(x, densify_nm(dequantize(codes, scales[, zeros]), index)): 2:4 and 4:8 run the select
    kernel of nm_select.py on its layout (repacked once at load); other N:M the gather kernel,
    which reads the int4 codes of the kept values and their scales, dequantizing in registers."""
    from .linear import nm_linear
    from .nm_select import fits, nm_select_linear, pack_nm_select_int4
    x, b = n.inputs[0], n.inputs[2]
    codes, scales, zeros = q.inputs
    nn, m, gs = d.attrs["n"], d.attrs["m"], q.attrs["group_size"]
    if (nn, m) in SELECT_PATTERNS and fits(codes.type.shape[1] * 2, group=gs):
        def run_select(xt, w, _s, _z, _i, bt, **epilogue):
            return [nm_select_linear(xt, w, bt, **epilogue)]
        return Step(n, f"triton:nm_select_int4_{nn}_{m}", run_select, [x, codes, scales, zeros, d.inputs[1], b],
                    prepare=((1, 2, 3, 4), lambda ct, st, zt, it: (pack_nm_select_int4(ct, st, zt, gs, it, m),
                                                                   None, None, None)))
    pack_index, bits = _nm_index_packer(codes.type.shape[1], m)        # (logical) kept values per row

    def run(xt, ct, st, zt, it, bt, **epilogue):
        return [nm_linear(xt, ct, it, nn, m, bt, index_bits=bits["index"], value_scales=st, value_zeros=zt,
                          value_group=gs, **epilogue)]
    return Step(n, f"triton:nm_int4_linear_{nn}_{m}", run, [x, codes, scales, zeros, d.inputs[1], b],
                prepare=((4,), pack_index))


def _epilogue_operand_fits(v: Value, out: Value) -> bool:
    """A float operand the kernel can read at the output tile: the output's shape, or one row of it."""
    t, o = v.type, out.type
    if not t.dtype.is_float:
        return False
    if t.shape == o.shape:
        return True
    return t.rank >= 1 and t.rank <= o.rank and t.shape[-1] == o.shape[-1] and all(d == 1 for d in t.shape[:-1])


def _fold_epilogues(steps: list, users: dict, outputs: set) -> list:
    """A compressed linear whose output's only user is an elementwise node (a fused region or one
    fusable op) takes that node's computation as its kernel epilogue: one launch and no round trip
    of the linear's output, provided the node's other operands (at most two, full-shaped or one
    row) are computed before the linear."""
    from .epilogue import MAX_EXTRA, Epilogue
    produced_at = {v: i for i, st in enumerate(steps) for v in st.outputs}
    folded: dict[int, Step] = {}
    dropped = set()
    for i, st in enumerate(steps):
        if st.node.op != "linear" or not st.kernel.startswith("triton:"):
            continue
        out = st.node.outputs[0]
        us = users.get(out, [])
        if out in outputs or len(us) != 1:
            continue
        f = us[0]
        expr = node_expr(f)
        if expr is None:
            continue
        fout = f.outputs[0]
        acc = [j for j, v in enumerate(f.inputs) if v is out]
        others = [(j, v) for j, v in enumerate(f.inputs) if v is not out]
        if (fout.type.shape != out.type.shape or not fout.type.dtype.is_float or len(acc) != 1
                or len(others) > MAX_EXTRA
                or not all(_epilogue_operand_fits(v, out) and produced_at.get(v, -1) < i for _, v in others)):
            continue
        epi = Epilogue(expr, acc[0], tuple(j for j, _ in others), fout.type.dtype.torch)
        k = len(st.inputs)

        def run(*ins, _run=st.run, _k=k, _epi=epi):
            return _run(*ins[:_k], epilogue=_epi, extras=tuple(ins[_k:]))
        folded[i] = Step(f, st.kernel + "+epilogue", run, st.inputs + [v for _, v in others], st.prepare)
        dropped.add(f)
    return [folded.get(i, st) for i, st in enumerate(steps) if st.node not in dropped or i in folded]


def _fused_step(n: Node) -> Step:
    from .elementwise import fused_elementwise
    out = n.outputs[0].type
    expr = n.attrs["expr"]
    dtype = out.dtype.torch

    def run(*xs, bindings=None):
        return [fused_elementwise(expr, list(xs), out.concrete_shape(bindings or {}), dtype)]
    return Step(n, "triton:fused_elementwise", run, list(n.inputs))


def _norm_step(n: Node) -> Step | None:
    from .norm import layer_norm, rms_norm
    if n.attrs["ndim"] != 1 or not n.inputs[0].type.dtype.is_float:
        return None
    eps = n.attrs["eps"]
    if n.op == "rms_norm":
        return Step(n, "triton:rms_norm", lambda x, w: [rms_norm(x, w, eps)], list(n.inputs))
    return Step(n, "triton:layer_norm", lambda x, w, b: [layer_norm(x, w, b, eps)], list(n.inputs))


def _rotary_step(n: Node) -> Step | None:
    from .rotary import fits, rotary
    x = n.inputs[0]
    if not (fits(x.type.shape) and all(v.type.dtype.is_float for v in n.inputs)
            and all(v.type.rank <= x.type.rank for v in n.inputs[1:])):
        return None
    out = n.outputs[0].type.dtype.torch
    return Step(n, "triton:rotary", lambda xt, c, s_: [rotary(xt, c, s_, out)], list(n.inputs))


def _cache_write_under(v: Value) -> Optional[Node]:
    """The cache_update whose result v reads through a chain of per-token ops (views, the key
    rebuild's linear, its rotary): how a Palu attention reads its latent caches."""
    for _ in range(8):
        n = v.node
        if n is None:
            return None
        if n.op == "cache_update":
            return n
        if n.op not in ("reshape", "transpose", "expand", "linear", "rotary"):
            return None
        v = n.inputs[0]
    return None


def _rotary_cache_groups(g: Graph, users: dict) -> dict[Node, tuple]:
    """Decode layers whose attention reads rotary(q) and caches just written, both written only
    here from caches that are inputs, the positions shared:

    * attention_cached(rotary(q), cache_update(Kc, rotary(k), pos), cache_update(Vc, v, pos)), the
      two rotations by the same cos / sin, head-major caches [B, Hkv, L, D];
    * Palu latents: the attention reads token-major caches [B, L, W] written with the k / v
      latents, through the kv_cache pass's views and key rebuild (keys rotate after it).

    Returns, keyed by the node where one step runs them all (the earliest of them in graph order
    after every input is computed and before any reader of their results), (rotary q, rotary k or
    None for latents, cache update k, cache update v)."""
    from .rotary import fits as fits_rotary
    order = {n: i for i, n in enumerate(g.nodes)}
    groups = {}
    for n in g.nodes:
        if n.op != "attention_cached":
            continue
        rq, ck, cv = n.inputs[0].node, _cache_write_under(n.inputs[1]), _cache_write_under(n.inputs[2])
        if rq is None or ck is None or cv is None or rq.op != "rotary" or ck is cv:
            continue
        rk = ck.inputs[1].node
        if n.inputs[1].node is ck:                    # full keys, rotated before the cache
            if (rk is None or rk.op != "rotary" or users.get(rk.outputs[0]) != [ck] or rk.inputs[1:] != rq.inputs[1:]
                    or n.inputs[2].node is not cv or ck.attrs["axis"] != 2 or cv.attrs["axis"] != 2
                    or any(c.inputs[0].type.rank != 4 for c in (ck, cv))):
                continue
        elif any(c.inputs[0].type.rank != 3 or c.attrs["axis"] != 1 for c in (ck, cv)):
            continue
        else:
            rk = None
        if (ck.inputs[2] is not cv.inputs[2] or
                any(c.inputs[0].kind != "input" or len(users.get(c.inputs[0], [])) != 1
                    or c.inputs[0].type.dtype != c.inputs[1].type.dtype for c in (ck, cv))):
            continue
        if (rq.inputs[0].type.rank != 4 or not fits_rotary(rq.inputs[0].type.shape)
                or any(v.type.rank > 2 for v in rq.inputs[1:]) or not rq.outputs[0].type.dtype.is_float):
            continue
        if rk is None and any(not isinstance(c.inputs[0].type.shape[-1], int) or c.inputs[0].type.shape[-1] % 2
                              for c in (ck, cv)):
            continue
        four = (rq, rk, ck, cv)
        ins = [rq.inputs[0], (rk or ck).inputs[0 if rk else 1], cv.inputs[1], *rq.inputs[1:3], ck.inputs[2]]
        ready = max((order[v.node] for v in ins if v.node is not None), default=-1)
        for at in sorted((x for x in four if x is not None), key=order.get):
            if order[at] > ready and all(order[u] > order[at] for x in (rq, ck, cv) for u in users.get(x.outputs[0], [])
                                         if u not in four):
                groups[at] = four       # the earliest node where every input is ready and no reader has run
                break
    return groups


def _rotary_cache_step(anchor: Node, four: tuple) -> Step:
    """One launch for a decode layer's q / k RoPE and its two cache writes (``rotary_into_caches``;
    Palu latents are copied, their keys rotate inside the attention)."""
    from .rotary import rotary_into_caches
    rq, rk, ck, cv = four
    out = rq.outputs[0].type.dtype.torch
    rotate_k = rk is not None

    def run(q, k, v, cos, sin, kc, vc, pos):
        return [rotary_into_caches(q, k, v, cos, sin, kc, vc, pos, out, rotate_k=rotate_k), kc, vc]
    return Step(anchor, "triton:rotary_cache_write", run,
                [rq.inputs[0], (rk or ck).inputs[0 if rotate_k else 1], cv.inputs[1], rq.inputs[1], rq.inputs[2],
                 ck.inputs[0], cv.inputs[0], ck.inputs[2]], produces=[rq.outputs[0], ck.outputs[0], cv.outputs[0]])


def _torch_step(n: Node) -> Step:
    opdef = get_op(n.op)
    attrs = n.attrs

    def run(*ins, bindings=None):
        return opdef.run(list(ins), attrs, bindings or {})
    return Step(n, "torch", run, list(n.inputs))


class PositionMask:
    """The decode attention's mask (cache slot j visible to query i when j <= positions[i]),
    built by the first layer of a run and read by the others (2 launches per layer otherwise).
    The runtime calls ``Program.begin_run`` before each run (and each CUDA-graph capture, which so
    records the first layer's launches), so a mask never outlives the run that built it."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._key, self._mask = None, None

    def __call__(self, pos: torch.Tensor, length: int) -> torch.Tensor:
        if self._key is None or self._key[0] is not pos or self._key[1] != length:
            self._mask = torch.arange(length, device=pos.device)[None, :] <= pos[:, None]
            self._key = (pos, length)
        return self._mask


def _attention_cached_step(n: Node, mask: PositionMask) -> Step:
    """Decode attention over a preallocated cache without reading the positions back to the host
    (so a decode step can be captured as a CUDA graph): one token over head-major caches runs the
    latent-attention kernel's plain form (split over the sequence, only slots up to the position
    read); otherwise SDPA over the whole cache with a position mask (slots past the newest
    position get zero weight, as in the reference)."""
    import torch.nn.functional as F
    scale = n.attrs["scale"]
    q, k, v, p = (x.type for x in n.inputs)
    if (q.rank == 4 and q.shape[2] == 1 and k.rank == 4 and v.shape == k.shape and p.shape == (1,)
            and q.dtype == k.dtype == v.dtype and _pow2_at_least_16(q.shape[3]) and k.shape[3] == q.shape[3]
            and isinstance(k.shape[1], int) and isinstance(q.shape[1], int) and q.shape[1] % k.shape[1] == 0):
        from .latent_attention import gqa_decode_attention
        sc = scale if scale is not None else q.shape[3] ** -0.5

        def run_kernel(qt, kt, vt, pt):
            return [gqa_decode_attention(qt, kt, vt, pt, sc)]
        return Step(n, "triton:gqa_decode_attention", run_kernel, list(n.inputs))

    def run(q, k, v, pos):
        gqa = q.shape[-3] != k.shape[-3]
        return [F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask(pos, k.shape[-2]),
                                               scale=scale, enable_gqa=gqa)]
    return Step(n, "torch:sdpa_masked", run, list(n.inputs))


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


def _rope_latent_keys(k: Value, groups: int, params: dict) -> Optional[tuple]:
    """k = rotary(transpose(reshape(linear(c, W), [B, L, Hkv, D]), perm=[0, 2, 1, 3]), cos, sin): keys
    rebuilt from a latent cache c [B, L, G*R] and rotated (the kv_cache pass's RoPE form), W a
    param [Hkv*D, G*R] block-diagonal over ``groups`` (each group's latent rebuilds only its own
    KV heads; checked on the data), cos / sin params [L, D] by cache slot. Returns
    (c, W, cos, sin, Hkv, D) or None."""
    rot = k.node
    if rot is None or rot.op != "rotary":
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
    r = width // groups
    blocks = torch.block_diag(*[data[i * kd:(i + 1) * kd, i * r:(i + 1) * r] for i in range(groups)])
    if not torch.equal(blocks, data):
        return None
    return c, w, cos, sin, hkv, D


def _group_blocks(groups: int, r: int, kd: int):
    """A ``prepare`` function: the block-diagonal [Hkv*D, G*R] key up-projection -> its diagonal
    blocks, transposed, [G, R, Hkv/G*D] (what the latent-attention kernel reads; zeros dropped)."""
    def blocks(w):
        return (torch.stack([w[i * kd:(i + 1) * kd, i * r:(i + 1) * r].T for i in range(groups)]).contiguous(),)
    return blocks


def _private_chain(v: Value, stop: Value, reader: Node, users: dict, outputs: set) -> list[Node]:
    """The nodes computing v from stop, walked back from v while each result is read only by the
    next node (and is no graph output): none of them is needed once ``reader`` reads stop."""
    chain = []
    while v is not stop and v.node is not None and v not in outputs and users.get(v, []) == [reader]:
        reader = v.node
        chain.append(reader)
        v = reader.inputs[0]
    return chain


def _pow2_at_least_16(v) -> bool:
    from .linear import _pow2
    return isinstance(v, int) and v >= 16 and _pow2(v)


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


def _param_matmul_from(o: Value, users: dict, outputs: set) -> Optional[tuple[Node, Value]]:
    """o's only user is matmul(o, W), W a param [H, Rv, D] (the value up-projection): (matmul, W)."""
    us = users.get(o, [])
    if o in outputs or len(us) != 1 or us[0].op != "matmul" or us[0].inputs[0] is not o:
        return None
    w = us[0].inputs[1]
    if w.kind != "param" or w.type.rank != 3 or tuple(w.type.shape[:2]) != (o.type.shape[1], o.type.shape[3]):
        return None
    return us[0], w


def _latent_attention_step(n: Node, users: dict, outputs: set, params: dict) -> Optional[tuple[Step, list]]:
    """A decode step's attention over Palu latent caches: the latent-attention kernel reads the
    caches as they are stored, [B, L, G*r], instead of SDPA over per-group views.

    * absorbed form (no RoPE): the query was multiplied into the key latent space; that absorption
      before the attention, when it is the kv_cache pass's per-head param matmul, runs in its kernels;
    * RoPE form: the keys the graph rebuilds over the whole cache (linear, reshape, transpose,
      rotary) are rebuilt tile by tile inside the kernel, only for the slots up to the position;
      under GQA each rebuilt key head serves its query heads.

    Values stay latent in both; the value up-projection after the attention, when it is the pass's
    per-head param matmul, runs in the kernel's merge. Returns the step (attached to the last node
    it covers: the up-projection's matmul, or the attention) and the earlier nodes it replaces."""
    from .latent_attention import latent_decode_attention
    q = n.inputs[0]
    v = _latent_cache(n.inputs[2])
    if v is None or q.type.rank != 4 or q.type.shape[2] != 1 or not q.type.dtype.is_float:
        return None
    hv, Gv, RV = v
    H = q.type.shape[1]
    k = _latent_cache(n.inputs[1])
    rope = None if k is not None else _rope_latent_keys(n.inputs[1], Gv, params)
    if k is not None:
        hk, G, R = k
        ok = q.type.shape[3] == R
    elif rope is not None:
        hk, w, cos, sin, hkv, D = rope
        G, R = Gv, hk.type.shape[2] // Gv
        ok = (q.type.shape[3] == D and isinstance(H, int) and H % hkv == 0 and _pow2_at_least_16(D // 2)
              and q.type.dtype == hk.type.dtype == w.type.dtype)
    else:
        return None
    # (the kv_cache pass states the scale: a latent's width is not the head dim SDPA's default uses)
    if not (ok and isinstance(H, int) and H % G == 0 and G % Gv == 0 and _pow2_at_least_16(R)
            and _pow2_at_least_16(RV) and n.attrs["scale"] is not None):
        return None
    scale, hpg = n.attrs["scale"], H // G
    replaced = [x for view, cache in ((n.inputs[1], hk), (n.inputs[2], hv))
                for x in _private_chain(view, cache, n, users, outputs)]
    up = _param_matmul_from(n.outputs[0], users, outputs)
    wv = up[1] if up else None
    kernel = "triton:latent_attention" + ("+rope" if rope else "")
    if rope:
        halves_equal = all(torch.equal(t[:, :D // 2], t[:, D // 2:]) for t in (params[cos.name].data, params[sin.name].data))

        def run_rope(qt, kc, vc, pos, upk, ct, st, wvt):
            o = latent_decode_attention(qt[:, :, 0, :], kc, vc.to(kc.dtype), pos, hpg, scale, upk, ct, st,
                                        value_groups=Gv, up_v=wvt, rope_halves_equal=halves_equal)
            return [o.unsqueeze(2)]
        step = Step(up[0] if up else n, kernel + ("+up_v" if up else ""), run_rope,
                    [q, hk, hv, n.inputs[3], w, cos, sin, wv], prepare=((4,), _group_blocks(G, R, hkv // G * D)))
        return step, replaced
    absorb = _param_matmul_into(q, users)
    replaced += [absorb[0]] if absorb else []

    def run(qt, kc, vc, pos, wq, wvt):
        o = latent_decode_attention(qt[:, :, 0, :], kc, vc.to(kc.dtype), pos, hpg, scale, value_groups=Gv,
                                    absorb=wq, up_v=wvt)
        return [o.unsqueeze(2)]
    kernel += ("+absorb" if absorb else "") + ("+up_v" if up else "")
    return Step(up[0] if up else n, kernel, run, [absorb[1] if absorb else q, hk, hv, n.inputs[3],
                                                   absorb[2] if absorb else None, wv]), replaced


def _cache_update_step(n: Node) -> Step:
    """Write the new entries into the cache buffer itself (the reference copies the whole cache):
    valid because the old cache is not read after its update (checked by the caller)."""
    axis = n.attrs["axis"]

    def run(cache, new, pos):
        return [cache.index_copy_(axis, pos, new.to(cache.dtype))]
    return Step(n, "torch:index_copy_", run, list(n.inputs))


@dataclass
class Program:
    graph: Graph
    steps: list
    mask: Optional[PositionMask] = None

    def begin_run(self) -> None:
        """Forget what the previous run computed once for all steps (the position mask)."""
        if self.mask is not None:
            self.mask.reset()

    @property
    def kernels(self) -> dict[str, str]:
        return {s.node.name: s.kernel for s in self.steps}


def build_program(g: Graph) -> Program:
    users = g.users()
    outputs = set(g.outputs)
    skipped, covered, steps = set(), set(), []     # nodes whose step is dropped / never built
    mask = PositionMask()
    rope_caches = _rotary_cache_groups(g, users)
    for anchor, four in rope_caches.items():
        covered.update(x for x in four if x is not None and x is not anchor)
    for n in g.nodes:
        if n in covered:          # run by another node's step
            continue
        if n in rope_caches:
            steps.append(_rotary_cache_step(n, rope_caches[n]))
            continue
        if n.op == "linear":
            p = packed_weight_producer(n.inputs[1], users)
            if p is not None:
                skipped.add(p)
                steps.append(_linear_step(n, p))
                continue
            chain = quantized_nm_producers(n.inputs[1], users)
            if chain is not None:
                skipped.update(chain)
                steps.append(_nm_int4_step(n, *chain))
                continue
        step = None
        if n.op == "fused_elementwise":
            step = _fused_step(n)
        elif n.op in ("rms_norm", "layer_norm"):
            step = _norm_step(n)
        elif n.op == "rotary":
            step = _rotary_step(n)
        elif n.op == "attention_cached":
            latent = _latent_attention_step(n, users, outputs, g.params)
            if latent is not None:
                step, replaced = latent
                skipped.update(replaced)
                covered.add(step.node)
            else:
                step = _attention_cached_step(n, mask)
        elif n.op == "cache_update" and n.inputs[0].kind == "input" and len(users.get(n.inputs[0], [])) == 1:
            step = _cache_update_step(n)
        steps.append(step or _torch_step(n))
    steps = [s for s in steps if s.node not in skipped]
    return Program(g, _fold_epilogues(steps, users, outputs), mask)


def needs_bindings(step: Step) -> bool:
    return step.kernel in ("torch", "triton:fused_elementwise")


def run_step(step: Step, ins: list, bindings: dict) -> list[torch.Tensor]:
    if needs_bindings(step):
        return step.run(*ins, bindings=bindings)
    return step.run(*ins)
