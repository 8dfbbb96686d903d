"""RoPE (the ``rotary`` op, half-split convention: x cos + rotate_half(x) sin) in one kernel;
and a decode layer's q / k rotations with its two cache writes as one launch
(``rotary_into_caches``).

The op's torch reference is six kernels (two slices, a negation, a concatenation, two multiplies
and an add); at decode each of a layer's two rotations is a few hundred elements, so those were
six launches of almost nothing. Here one program rotates a block of rows: both halves of a row
are loaded once, cos / sin read through broadcast strides (never materialized at x's shape), the
arithmetic in fp32 and one rounding to the output dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_rows(x_ptr, c_ptr, s_ptr, y_ptr, pos_ptr, r, ROWS, S1, S2, HALF, sx0, sx1, sx2, sc0, sc1, sc2,
                 ss0, ss1, ss2, sy0, sy1, sy2, ROTATE: tl.constexpr, AT_POS: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows r of a rank-4 x (row = (i0, i1, i2), D = 2 HALF contiguous) rotated by cos / sin (read
    through their broadcast strides) -- or copied, without ROTATE -- into y at (i0, i1, i2), or at
    (i0, i1, positions[i2]) with AT_POS (a cache write); fp32 arithmetic, one rounding."""
    i2 = r % S2
    i1 = (r // S2) % S1
    i0 = r // (S1 * S2)
    d = tl.arange(0, BLOCK_H)
    m = (r < ROWS)[:, None] & (d < HALF)[None, :]
    xo = (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None] + d[None, :]
    x1 = tl.load(x_ptr + xo, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo + HALF, mask=m, other=0.0).to(tl.float32)
    if ROTATE:
        co = (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None] + d[None, :]
        so = (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None] + d[None, :]
        c1 = tl.load(c_ptr + co, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(c_ptr + co + HALF, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(s_ptr + so, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(s_ptr + so + HALF, mask=m, other=0.0).to(tl.float32)
        x1, x2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    if AT_POS:
        i2 = tl.load(pos_ptr + i2, mask=r < ROWS, other=0)
    yo = (i0 * sy0 + i1 * sy1 + i2 * sy2)[:, None] + d[None, :]
    tl.store(y_ptr + yo, x1.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(y_ptr + yo + HALF, x2.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rotary_kernel(x_ptr, c_ptr, s_ptr, y_ptr, ROWS, S1, S2, HALF, sx0, sx1, sx2, sc0, sc1, sc2, ss0, ss1, ss2,
                   BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    _rotate_rows(x_ptr, c_ptr, s_ptr, y_ptr, x_ptr, r, ROWS, S1, S2, HALF, sx0, sx1, sx2, sc0, sc1, sc2, ss0, ss1,
                 ss2, S1 * S2 * 2 * HALF, S2 * 2 * HALF, 2 * HALF, True, False, BLOCK_H)


@triton.jit
def _rotary_cache_kernel(q_ptr, k_ptr, v_ptr, c_ptr, s_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr, QROWS, KROWS, H, HKV, S,
                         HALF, HALF_K, HALF_V, PQ, PK, sq0, sq1, sq2, sk0, sk1, sk2, sv0, sv1, sv2, sc0, sc1, sc2, ss0,
                         ss1, ss2, skc0, skc1, skc2, svc0, svc1, svc2, ROTATE_K: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HV: tl.constexpr):
    """Programs [0, PQ) rotate q into qo, the next PK rotate k (or copy it: a latent) into its cache
    at the positions, the rest copy v into its cache: a decode layer's four small launches as one."""
    pid = tl.program_id(0)
    if pid < PQ:
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        _rotate_rows(q_ptr, c_ptr, s_ptr, qo_ptr, pos_ptr, r, QROWS, H, S, HALF, sq0, sq1, sq2, sc0, sc1, sc2, ss0,
                     ss1, ss2, H * S * 2 * HALF, S * 2 * HALF, 2 * HALF, True, False, BLOCK_H)
    elif pid < PQ + PK:
        r = (pid - PQ) * BLOCK_R + tl.arange(0, BLOCK_R)
        _rotate_rows(k_ptr, c_ptr, s_ptr, kc_ptr, pos_ptr, r, KROWS, HKV, S, HALF_K, sk0, sk1, sk2, sc0, sc1, sc2,
                     ss0, ss1, ss2, skc0, skc1, skc2, ROTATE_K, True, BLOCK_HK)
    else:
        r = (pid - PQ - PK) * BLOCK_R + tl.arange(0, BLOCK_R)
        _rotate_rows(v_ptr, c_ptr, s_ptr, vc_ptr, pos_ptr, r, KROWS, HKV, S, HALF_V, sv0, sv1, sv2, sc0, sc1, sc2,
                     ss0, ss1, ss2, svc0, svc1, svc2, False, True, BLOCK_HV)


def _as_4d(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """t broadcast to ``shape`` (a view: zero strides where it repeats), with leading dims added up to rank 4."""
    t = t.broadcast_to(shape)
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def fits(x_shape) -> bool:
    return 1 <= len(x_shape) <= 4 and isinstance(x_shape[-1], int) and x_shape[-1] % 2 == 0


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x [..., D] (rank <= 4) rotated by cos / sin (broadcastable to x) -> a new contiguous tensor."""
    D = x.shape[-1]
    if D % 2 or x.dim() > 4:
        raise ValueError(f"rotary: x {tuple(x.shape)} must have rank <= 4 and an even last dim")
    if x.stride(-1) != 1:
        x = x.contiguous()
    x4, c4, s4 = _as_4d(x, x.shape), _as_4d(cos, x.shape), _as_4d(sin, x.shape)
    if c4.stride(-1) != 1 or s4.stride(-1) != 1:          # (a broadcast last dim)
        c4, s4 = c4.contiguous(), s4.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    S0, S1, S2 = x4.shape[:3]
    rows = S0 * S1 * S2
    half = D // 2
    block_h = triton.next_power_of_2(half)
    block_r = max(1, min(64, 4096 // block_h))
    _rotary_kernel[(triton.cdiv(rows, block_r),)](
        x4, c4, s4, y, rows, S1, S2, half, *x4.stride()[:3], *c4.stride()[:3], *s4.stride()[:3],
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4)
    return y


def rotary_into_caches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                       q_dtype: torch.dtype, rotate_k: bool = True) -> torch.Tensor:
    """One launch for a decode layer's RoPE and cache writes: q [B, H, S, D] rotated into a new
    tensor (returned, ``q_dtype``); k [B, Hkv, S, D] rotated and v copied into k_cache / v_cache
    [B, Hkv, L, D] at slots positions[s] (in place). cos / sin broadcast to [..., S, D].

    ``rotate_k=False`` (Palu latents, keys rotated after they are rebuilt): k [B, S, Wk] and
    v [B, S, Wv] are copied into token-major caches [B, L, Wk] / [B, L, Wv]."""
    if not rotate_k:     # token-major latents as one "head" each
        if k.dim() == 3 and v.dim() == 3 and k_cache.dim() == 3 and v_cache.dim() == 3:
            k, v, k_cache, v_cache = k[:, None], v[:, None], k_cache[:, None], v_cache[:, None]
    B, H, S, D = q.shape if q.dim() == 4 else (0, 0, 0, 1)
    Hkv = k.shape[1] if k.dim() == 4 else 0
    wk, wv = (k.shape[-1], v.shape[-1]) if not rotate_k else (D, D)
    if (q.dim() != 4 or D % 2 or wk % 2 or wv % 2 or tuple(k.shape) != (B, Hkv, S, wk)
            or tuple(v.shape) != (B, Hkv, S, wv) or k_cache.dim() != 4 or tuple(k_cache.shape[:2]) != (B, Hkv)
            or k_cache.shape[3] != wk or tuple(v_cache.shape) != (*k_cache.shape[:3], wv) or positions.shape != (S,)
            or any(t.dim() > 4 or (t.dim() >= 3 and t.shape[-3] != 1) for t in (cos, sin))):
        form = ("[B, H, S, D], [B, Hkv, S, D] twice, [B, Hkv, L, D] twice" if rotate_k else
                "[B, H, S, D], latents [B, S, Wk] / [B, S, Wv], caches [B, L, Wk] / [B, L, Wv]")
        raise ValueError(f"rotary_into_caches: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, caches "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}, positions {tuple(positions.shape)} must be "
                         f"{form} and [S] with D (and widths) even (cos / sin the same for every head)")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("rotary_into_caches: the caches need unit stride in their last dim")
    c4, s4 = _as_4d(cos, q[:, :1].shape), _as_4d(sin, q[:, :1].shape)     # (heads broadcast: one serves all)
    if c4.stride(-1) != 1 or s4.stride(-1) != 1:
        c4, s4 = c4.contiguous(), s4.contiguous()
    out = torch.empty(q.shape, dtype=q_dtype, device=q.device)
    half = D // 2
    block_h, block_hk, block_hv = (triton.next_power_of_2(w // 2) for w in (D, wk, wv))
    block_r = max(1, min(64, 4096 // max(block_h, block_hk, block_hv)))
    qrows, krows = B * H * S, B * Hkv * S
    pq, pk = triton.cdiv(qrows, block_r), triton.cdiv(krows, block_r)
    sc, ss = list(c4.stride()[:3]), list(s4.stride()[:3])
    sc[1] = ss[1] = 0                                          # cos / sin never vary by head
    _rotary_cache_kernel[(pq + 2 * pk,)](
        q, k, v, c4, s4, out, k_cache, v_cache, positions, qrows, krows, H, Hkv, S, half, wk // 2, wv // 2, pq, pk,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *sc, *ss, *k_cache.stride()[:3], *v_cache.stride()[:3],
        ROTATE_K=rotate_k, BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_HK=block_hk, BLOCK_HV=block_hv, num_warps=4)
    return out
