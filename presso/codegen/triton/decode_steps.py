"""The decode step's attention and KV-cache writes as ``cuda`` program steps: a layer's RoPE and
cache writes as one launch, decode attention over standard caches (only the filled slots), and
Palu latent caches read as stored by the latent-attention kernel (absorbed queries, or RoPE keys
rebuilt inside it), the kv_cache pass's surrounding matmuls and views folded in.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...ir.graph import Graph, Node, Value
from ...ir.types import dims_product
from .step import Step


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


def rotary_cache_groups(g: Graph, users: dict) -> dict[Node, tuple]:
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
        ready = max((order[v.node] for v in _rotary_cache_inputs(four) if v.node is not None), default=-1)
        for at in sorted((x for x in four if x is not None), key=order.get):
            if order[at] > ready and all(order[u] > order[at] for x in (rq, ck, cv) for u in users.get(x.outputs[0], [])
                                         if u not in four):
                groups[at] = four       # the earliest node where every input is ready and no reader has run
                break
    return groups


def _rotary_cache_inputs(four: tuple) -> list:
    """What the fused step reads: q, the new k (before its rotation) and v, cos, sin, both caches,
    the positions."""
    rq, rk, ck, cv = four
    k = rk.inputs[0] if rk is not None else ck.inputs[1]
    return [rq.inputs[0], k, cv.inputs[1], rq.inputs[1], rq.inputs[2], ck.inputs[0], cv.inputs[0], ck.inputs[2]]


def rotary_cache_step(anchor: Node, four: tuple) -> Step:
    """One launch for a decode layer's q / k RoPE and its two cache writes (``rotary_into_caches``;
    Palu latents are copied, their keys rotate inside the attention)."""
    from .rotary import rotary_into_caches
    rq, rk, ck, cv = four
    out = rq.outputs[0].type.dtype.torch
    rotate_k = rk is not None

    def run(q, k, v, cos, sin, kc, vc, pos):
        return [rotary_into_caches(q, k, v, cos, sin, kc, vc, pos, out, rotate_k=rotate_k), kc, vc]
    return Step(anchor, "triton:rotary_cache_write", run, _rotary_cache_inputs(four),
                produces=[rq.outputs[0], ck.outputs[0], cv.outputs[0]])


class PositionMask:
    """The decode attention's mask (cache slot j visible to query i of row b when
    min(starts[b], positions[i]) <= j <= positions[i]: ``attention_cached``'s),
    built by the first layer of a run and read by the others (2 launches per layer otherwise).
    The runtime calls ``Program.begin_run`` before each run (and each CUDA-graph capture, which so
    records the first layer's launches), so a mask never outlives the run that built it."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._key, self._mask = None, None

    def __call__(self, pos: torch.Tensor, length: int, starts: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._key is None or self._key[0] is not pos or self._key[1] != length or self._key[2] is not starts:
            slots = torch.arange(length, device=pos.device)
            self._mask = slots[None, :] <= pos[:, None]
            if starts is not None:
                first = torch.minimum(starts[:, None], pos[None, :])
                self._mask = (self._mask[None] & (slots[None, None, :] >= first[..., None]))[:, None]
            self._key = (pos, length, starts)
        return self._mask


def attention_cached_step(n: Node, mask: PositionMask) -> Step:
    """Decode attention over a preallocated cache without reading the positions back to the host
    (so a decode step can be captured as a CUDA graph): one token over head-major caches runs the
    latent-attention kernel's plain form (split over the sequence, only slots up to the position
    read); otherwise SDPA (soft-capped scores: the reference's softcapped attention) over the whole
    cache with a position mask (slots past the newest position, and before a row's start, get zero
    weight, as in the reference)."""
    import torch.nn.functional as F
    scale, softcap = n.attrs["scale"], n.attrs["softcap"]
    q, k, v, p = (x.type for x in n.inputs[:4])
    if softcap is not None:
        from ...ir.ops import softcapped_attention

        def run_capped(q, k, v, pos, starts=None):
            return [softcapped_attention(q, k.to(q.dtype), v.to(q.dtype), mask(pos, k.shape[-2], starts), False,
                                         scale, softcap)]
        return Step(n, "torch:softcapped_attention", run_capped, list(n.inputs))
    if (q.rank == 4 and q.shape[2] == 1 and k.rank == 4 and v.shape == k.shape and p.shape == (1,)
            and q.dtype == k.dtype == v.dtype and _pow2_at_least_16(q.shape[3]) and k.shape[3] == q.shape[3]
            and isinstance(k.shape[1], int) and isinstance(q.shape[1], int) and q.shape[1] % k.shape[1] == 0):
        from .latent_attention import gqa_decode_attention
        sc = scale if scale is not None else q.shape[3] ** -0.5

        def run_kernel(qt, kt, vt, pt, st=None):
            return [gqa_decode_attention(qt, kt, vt, pt, sc, starts=st)]
        return Step(n, "triton:gqa_decode_attention", run_kernel, list(n.inputs))

    def run(q, k, v, pos, starts=None):
        gqa = q.shape[-3] != k.shape[-3]
        return [F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                               attn_mask=mask(pos, k.shape[-2], starts), scale=scale, enable_gqa=gqa)]
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
    if not torch.equal(torch.block_diag(*_diagonal_blocks(data, groups, width // groups, kd)), data):
        return None
    return c, w, cos, sin, hkv, D


def _diagonal_blocks(w: torch.Tensor, groups: int, r: int, kd: int) -> list[torch.Tensor]:
    """The ``groups`` diagonal blocks [kd, r] of a block-diagonal [groups*kd, groups*r] weight."""
    return [w[i * kd:(i + 1) * kd, i * r:(i + 1) * r] for i in range(groups)]


def _group_blocks(groups: int, r: int, kd: int):
    """A ``prepare`` function: the block-diagonal [Hkv*D, G*R] key up-projection -> its diagonal
    blocks, transposed, [G, R, Hkv/G*D] (what the latent-attention kernel reads; zeros dropped)."""
    def blocks(w):
        return (torch.stack([b.T for b in _diagonal_blocks(w, groups, r, kd)]).contiguous(),)
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


def latent_attention_step(n: Node, users: dict, outputs: set, params: dict) -> Optional[tuple[Step, list]]:
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
            and _pow2_at_least_16(RV) and n.attrs["scale"] is not None and n.attrs["softcap"] is None):
        return None
    scale, hpg = n.attrs["scale"], H // G
    starts = n.inputs[4] if len(n.inputs) > 4 else None
    replaced = [x for view, cache in ((n.inputs[1], hk), (n.inputs[2], hv))
                for x in _private_chain(view, cache, n, users, outputs)]
    up = _param_matmul_from(n.outputs[0], users, outputs)
    wv = up[1] if up else None
    kernel = "triton:latent_attention" + ("+rope" if rope else "")
    if rope:
        halves_equal = all(torch.equal(t[:, :D // 2], t[:, D // 2:]) for t in (params[cos.name].data, params[sin.name].data))

        def run_rope(qt, kc, vc, pos, upk, ct, st, wvt, starts):
            o = latent_decode_attention(qt[:, :, 0, :], kc, vc.to(kc.dtype), pos, hpg, scale, upk, ct, st,
                                        value_groups=Gv, up_v=wvt, rope_halves_equal=halves_equal, starts=starts)
            return [o.unsqueeze(2)]
        step = Step(up[0] if up else n, kernel + ("+up_v" if up else ""), run_rope,
                    [q, hk, hv, n.inputs[3], w, cos, sin, wv, starts], prepare=((4,), _group_blocks(G, R, hkv // G * D)))
        return step, replaced
    absorb = _param_matmul_into(q, users)
    replaced += [absorb[0]] if absorb else []

    def run(qt, kc, vc, pos, wq, wvt, starts):
        o = latent_decode_attention(qt[:, :, 0, :], kc, vc.to(kc.dtype), pos, hpg, scale, value_groups=Gv,
                                    absorb=wq, up_v=wvt, starts=starts)
        return [o.unsqueeze(2)]
    kernel += ("+absorb" if absorb else "") + ("+up_v" if up else "")
    return Step(up[0] if up else n, kernel, run, [absorb[1] if absorb else q, hk, hv, n.inputs[3],
                                                   absorb[2] if absorb else None, wv, starts]), replaced


def cache_update_step(n: Node) -> Step:
    """Write the new entries into the cache buffer itself (the reference copies the whole cache):
    valid because the old cache is not read after its update (checked by the caller)."""
    axis = n.attrs["axis"]

    def run(cache, new, pos):
        return [cache.index_copy_(axis, pos, new.to(cache.dtype))]
    return Step(n, "torch:index_copy_", run, list(n.inputs))
