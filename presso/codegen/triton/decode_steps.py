"""The decode step's attention and KV-cache writes as ``cuda`` program steps (the ops chosen by
``select.py``): a layer's RoPE and cache writes as one launch, decode attention over standard
caches (only the filled slots, or SDPA with a position mask built once per run), Palu latent
caches read as stored by the latent-attention kernel, and in-place cache writes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...ir.graph import Node
from .select import diagonal_blocks
from .step import Step


def rotary_cache_step(n: Node) -> Step:
    """``cuda.rotary_into_caches``: one launch for a decode layer's q / k RoPE and its two cache
    writes (Palu latents are copied, their keys rotate inside the attention)."""
    from .rotary import rotary_into_caches
    out = n.outputs[0].type.dtype.torch
    rotate_k = n.attrs["rotate_k"]

    def run(q, k, v, cos, sin, kc, vc, pos):
        return [rotary_into_caches(q, k, v, cos, sin, kc, vc, pos, out, rotate_k=rotate_k), kc, vc]
    return Step(n, "triton:rotary_cache_write", run, list(n.inputs))


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


def masked_attention_step(n: Node, mask: PositionMask) -> Step:
    """``cuda.masked_attention``: SDPA (soft-capped scores: the reference's softcapped attention)
    over the whole cache with the program's position mask (slots past the newest position, and
    before a row's start, get zero weight, as in the reference), reading no position back to the
    host (so a decode step can be captured as a CUDA graph)."""
    import torch.nn.functional as F
    scale, softcap = n.attrs["scale"], n.attrs["softcap"]
    if softcap is not None:
        from ...ir.ops import softcapped_attention

        def run_capped(q, k, v, pos, starts=None):
            return [softcapped_attention(q, k.to(q.dtype), v.to(q.dtype), mask(pos, k.shape[-2], starts), False,
                                         scale, softcap)]
        return Step(n, "torch:softcapped_attention", run_capped, list(n.inputs))

    def run(q, k, v, pos, starts=None):
        gqa = q.shape[-3] != k.shape[-3]
        return [F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                               attn_mask=mask(pos, k.shape[-2], starts), scale=scale, enable_gqa=gqa)]
    return Step(n, "torch:sdpa_masked", run, list(n.inputs))


def gqa_attention_step(n: Node) -> Step:
    """``cuda.gqa_decode_attention``: one token over head-major caches, the latent-attention
    kernel's plain form (split over the sequence, only slots up to the position read)."""
    from .latent_attention import gqa_decode_attention
    scale = n.attrs["scale"]
    sc = scale if scale is not None else n.inputs[0].type.shape[3] ** -0.5

    def run_kernel(qt, kt, vt, pt, st=None):
        return [gqa_decode_attention(qt, kt, vt, pt, sc, starts=st)]
    return Step(n, "triton:gqa_decode_attention", run_kernel, list(n.inputs))


def _group_blocks(groups: int, r: int, kd: int):
    """A ``prepare`` function: the block-diagonal [Hkv*D, G*R] key up-projection -> its diagonal
    blocks, transposed, [G, R, Hkv/G*D] (what the latent-attention kernel reads; zeros dropped)."""
    def blocks(w):
        return (torch.stack([b.T for b in diagonal_blocks(w, groups, r, kd)]).contiguous(),)
    return blocks


def latent_attention_step(n: Node, params: dict) -> Step:
    """``cuda.latent_attention``: latent_attention.py's kernels over the caches as stored, the
    query's absorption (``q_absorb``) before the attention and the value up-projection (``v_up``)
    in the merge; RoPE keys (``k_up``) rebuilt per tile from the up-projection's diagonal blocks
    (prepared once at load)."""
    from .latent_attention import latent_decode_attention
    q, kc, _vc, _pos, absorb, k_up, cos, sin, v_up = n.inputs[:9]
    scale, G, Gv = n.attrs["scale"], n.attrs["groups"], n.attrs["value_groups"]
    hpg = q.type.shape[1] // G
    kernel = "triton:latent_attention"
    if k_up is not None:
        D = q.type.shape[3]
        hkv, R = k_up.type.shape[0] // D, kc.type.shape[2] // G
        halves_equal = all(torch.equal(t[:, :D // 2], t[:, D // 2:]) for t in (params[cos.name].data, params[sin.name].data))

        def run_rope(qt, kct, vct, pos, _a, upk, ct, st, wvt, starts=None):
            o = latent_decode_attention(qt[:, :, 0, :], kct, vct.to(kct.dtype), pos, hpg, scale, upk, ct, st,
                                        value_groups=Gv, up_v=wvt, rope_halves_equal=halves_equal, starts=starts)
            return [o.unsqueeze(2)]
        return Step(n, kernel + "+rope" + ("+up_v" if v_up is not None else ""), run_rope, list(n.inputs),
                    prepare=((5,), _group_blocks(G, R, hkv // G * D)))

    def run(qt, kct, vct, pos, wq, _u, _c, _s, wvt, starts=None):
        o = latent_decode_attention(qt[:, :, 0, :], kct, vct.to(kct.dtype), pos, hpg, scale, value_groups=Gv,
                                    absorb=wq, up_v=wvt, starts=starts)
        return [o.unsqueeze(2)]
    kernel += ("+absorb" if absorb is not None else "") + ("+up_v" if v_up is not None else "")
    return Step(n, kernel, run, list(n.inputs))


def cache_write_step(n: Node) -> Step:
    """``cuda.cache_write``: the new entries written into the cache buffer itself."""
    axis = n.attrs["axis"]

    def run(cache, new, pos):
        return [cache.index_copy_(axis, pos, new.to(cache.dtype))]
    return Step(n, "torch:index_copy_", run, list(n.inputs))
