"""Decode attention over a Palu latent KV cache, in one pass over the cache (split over the
sequence for long contexts, then a small combine kernel).

Per group of ``HPG`` query heads the cache holds a key latent ``hk`` [L, R] and a value latent
``hv`` [L, Rv] per token. Keys are never materialized in memory:

* ``rope=False`` (absorbed): scores are ``(q B^T) . hk_t`` -- the caller passes ``qa = q B^T``;
* ``rope=True`` (rebuilt): each key tile is rebuilt in registers, ``k = hk B`` (tensor cores),
  rotated with the cached cos/sin of its positions, and dotted with ``q``;

values stay latent: the kernel returns ``o' = softmax(s) hv`` [H, Rv]; the value up-projection is
the graph's next matmul. Heads are padded to 16 rows so probabilities x values is one ``tl.dot``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear import INTERPRET


@triton.jit
def _latent_attn_kernel(q_ptr, b_ptr, br_ptr, cos_ptr, sin_ptr, hk_ptr, hv_ptr, pos_ptr, o_ptr, ml_ptr,
                        L, scale, stride_qb, stride_qh, stride_bg, stride_br, stride_cl,
                        stride_kb, stride_kl, stride_vb, stride_vl, stride_ob, stride_oh, stride_os,
                        HPG: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, R: tl.constexpr, RV: tl.constexpr,
                        GV_DIV: tl.constexpr, ROPE: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr,
                        SPLIT_LEN):
    b, g, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pos = tl.load(pos_ptr)
    n_valid = pos + 1
    t_start = sp * SPLIT_LEN
    t_end = tl.minimum(t_start + SPLIT_LEN, n_valid)
    rh = tl.arange(0, HP)
    mh = rh < HPG
    rr = tl.arange(0, R)
    rv = tl.arange(0, RV)
    gv = g // GV_DIV
    m_i = tl.full((HP,), float("-inf"), tl.float32)
    l_i = tl.zeros((HP,), tl.float32)
    acc = tl.zeros((HP, RV), tl.float32)
    if ROPE:
        rd = tl.arange(0, D)
    else:
        qa = tl.load(q_ptr + b * stride_qb + (g * HPG + rh)[:, None] * stride_qh + rr[None, :],
                     mask=mh[:, None], other=0.0)                                   # [HP, R]
    for t0 in range(t_start, t_end, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        mt = rt < t_end
        hk = tl.load(hk_ptr + b * stride_kb + rt[:, None] * stride_kl + g * R + rr[None, :], mask=mt[:, None],
                     other=0.0)                                                      # [T, R]
        if ROPE:
            s = tl.zeros((BLOCK_T, HP), tl.float32)
            cs = tl.load(cos_ptr + rt[:, None] * stride_cl + rd[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
            sn = tl.load(sin_ptr + rt[:, None] * stride_cl + rd[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
            for h in range(HPG):          # a loop, not unrolled: one head's up-projection tiles at a time
                bh = tl.load(b_ptr + g * stride_bg + rr[:, None] * stride_br + h * D + rd[None, :])      # [R, D]
                brh = tl.load(br_ptr + g * stride_bg + rr[:, None] * stride_br + h * D + rd[None, :])
                k = tl.dot(hk, bh) * cs + tl.dot(hk, brh) * sn                                         # [T, D]
                qh = tl.load(q_ptr + b * stride_qb + (g * HPG + h) * stride_qh + rd).to(tl.float32)
                sh = tl.sum(k * qh[None, :], axis=1)
                s = tl.where(rh[None, :] == h, sh[:, None], s)
        elif IEEE:        # fp32 caches: exact products (tl.dot would round fp32 inputs to tf32)
            s = tl.dot(hk, tl.trans(qa), input_precision="ieee")
        else:
            s = tl.dot(hk, tl.trans(qa)).to(tl.float32)                                # [T, HP]
        s = s * scale
        s = tl.where(mt[:, None] & mh[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[None, :])                                                 # [T, HP]
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        hv = tl.load(hv_ptr + b * stride_vb + rt[:, None] * stride_vl + gv * RV + rv[None, :], mask=mt[:, None],
                     other=0.0)                                                          # [T, RV]
        if IEEE:
            pv = tl.dot(tl.trans(p.to(hv.dtype)), hv, input_precision="ieee")
        else:
            pv = tl.dot(tl.trans(p.to(hv.dtype)), hv).to(tl.float32)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    o_off = o_ptr + b * stride_ob + (g * HPG + rh)[:, None] * stride_oh + sp * stride_os + rv[None, :]
    tl.store(o_off, acc, mask=mh[:, None])
    ml_off = ml_ptr + ((b * tl.num_programs(1) + g) * tl.num_programs(2) + sp) * (2 * HP) + rh
    tl.store(ml_off, m_i)
    tl.store(ml_off + HP, l_i)


@triton.jit
def _combine_kernel(o_ptr, ml_ptr, out_ptr, SPLITS, stride_ob, stride_oh, stride_os, stride_yb, stride_yh,
                    HPG: tl.constexpr, HP: tl.constexpr, RV: tl.constexpr, BLOCK_S: tl.constexpr):
    b, g = tl.program_id(0), tl.program_id(1)
    rs = tl.arange(0, BLOCK_S)
    ms = rs < SPLITS
    rv = tl.arange(0, RV)
    base = ((b * tl.num_programs(1) + g) * SPLITS + rs) * (2 * HP)
    for h in tl.static_range(HPG):
        m = tl.load(ml_ptr + base + h, mask=ms, other=float("-inf"))
        lsum = tl.load(ml_ptr + base + HP + h, mask=ms, other=0.0)
        mx = tl.max(m, axis=0)
        w = tl.where(ms & (m > float("-inf")), tl.exp(m - mx), 0.0)
        denom = tl.sum(w * lsum, axis=0)
        o = tl.load(o_ptr + b * stride_ob + (g * HPG + h) * stride_oh + rs[:, None] * stride_os + rv[None, :],
                    mask=ms[:, None], other=0.0)
        y = tl.sum(o * w[:, None], axis=0) / denom
        tl.store(out_ptr + b * stride_yb + (g * HPG + h) * stride_yh + rv, y.to(out_ptr.dtype.element_ty))


def latent_decode_attention(q: torch.Tensor, hk: torch.Tensor, hv: torch.Tensor, position: torch.Tensor,
                            heads_per_group: int, scale: float, up_k: torch.Tensor | None = None,
                            cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                            value_groups: int | None = None, split_len: int | None = None,
                            block_t: int | None = None, num_warps: int = 4, num_stages: int | None = None):
    """One decode token's attention over the latent cache.

    q: [B, H, D] (rope) or the absorbed [B, H, R]; hk: [B, L, G*R]; hv: [B, L, Gv*Rv];
    position: i64[1], the newest valid slot; up_k: [G, R, HPG*D] key up-projection (rope only);
    cos/sin: [L, D] tables by position (rope only); value_groups: latent groups of hv (default G).
    Returns o' [B, H, Rv] (value latent space)."""
    B, H = q.shape[:2]
    rope = up_k is not None
    G = H // heads_per_group
    R = hk.shape[-1] // G
    Gv = value_groups or G
    RV = hv.shape[-1] // Gv
    L = hk.shape[1]
    D = q.shape[-1]
    if rope:
        # rotate_half(k) = k @ P: fold P into a second up-projection so rotation is two dots
        half = D // 2
        ub = up_k.reshape(G, R, heads_per_group, D)
        up_rot = torch.cat((-ub[..., half:], ub[..., :half]), dim=-1).reshape(G, R, heads_per_group * D).contiguous()
        up = up_k.contiguous()
    else:
        up = up_rot = q
        cos = sin = q
    split = split_len or (L if INTERPRET else max(256, min(2048, triton.next_power_of_2(L) // 16)))
    splits = triton.cdiv(L, split)
    hp = max(16, triton.next_power_of_2(heads_per_group))
    o = torch.empty(B, H, splits, RV, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * G * splits * 2 * hp, dtype=torch.float32, device=q.device)
    bt = block_t or (16 if INTERPRET else (16 if rope else 64))
    _latent_attn_kernel[(B, G, splits)](
        q, up, up_rot, cos, sin, hk, hv, position, o, ml, L, scale, q.stride(0), q.stride(1),
        up.stride(0) if rope else 0, up.stride(1) if rope else 0, cos.stride(0) if rope else 0,
        hk.stride(0), hk.stride(1), hv.stride(0), hv.stride(1), o.stride(0), o.stride(1), o.stride(2),
        HPG=heads_per_group, HP=hp, D=D, R=R, RV=RV, GV_DIV=G // Gv, ROPE=rope, BLOCK_T=bt,
        IEEE=hk.dtype == torch.float32, SPLIT_LEN=split,
        num_warps=num_warps, **({"num_stages": 1} if rope else {} if num_stages is None else {"num_stages": num_stages}))
    out = torch.empty(B, H, RV, dtype=q.dtype, device=q.device)
    _combine_kernel[(B, G)](o, ml, out, splits, o.stride(0), o.stride(1), o.stride(2), out.stride(0), out.stride(1),
                            HPG=heads_per_group, HP=hp, RV=RV, BLOCK_S=triton.next_power_of_2(splits))
    return out


def reference_latent_attention(q, hk, hv, position, heads_per_group, scale, up_k=None, cos=None, sin=None,
                               value_groups=None):
    """The same computation with full keys rebuilt in memory (torch), for tests and benchmarks."""
    B, H = q.shape[:2]
    G = H // heads_per_group
    n = int(position.item()) + 1
    Gv = value_groups or G
    hk = hk[:, :n].float().reshape(B, n, G, -1)
    hv = hv[:, :n].float().reshape(B, n, Gv, -1)
    if up_k is not None:
        D = q.shape[-1]
        k = torch.einsum("bngr,grd->bngd", hk, up_k.float()).reshape(B, n, H, D)
        half = D // 2
        rot = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
        k = k * cos[:n, None, :].float() + rot * sin[:n, None, :].float()
        s = torch.einsum("bhd,bnhd->bhn", q.float(), k)
    else:
        kq = hk.repeat_interleave(heads_per_group, dim=2)                   # [B, n, H, R]
        s = torch.einsum("bhr,bnhr->bhn", q.float(), kq)
    p = torch.softmax(s * scale, dim=-1)
    v = hv.repeat_interleave(H // Gv, dim=2)                               # [B, n, H, Rv]
    return torch.einsum("bhn,bnhr->bhr", p, v).to(q.dtype)
