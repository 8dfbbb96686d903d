"""Decode attention over a Palu latent KV cache, in one pass over the cache (split over the
sequence for long contexts); a standard GQA cache is the special case R = D with no up-projection
(its head-major layout read through strides), so plain decode attention runs here too, reading
only the slots up to the position (no mask over the whole cache).

Per group of ``HPG`` query heads the cache holds a key latent ``hk`` [L, R] and a value latent
``hv`` [L, Rv] per token. Keys are never materialized in memory:

* ``rope=False`` (absorbed): scores are ``(q B_k^T) . hk_t``;
* ``rope=True`` (rebuilt): each key tile is rebuilt in registers as its two halves,
  ``k_lo = hk B[:, :D/2]`` and ``k_hi = hk B[:, D/2:]`` (tensor cores), so the rotation is
  elementwise on the halves (``k_lo cos_lo - k_hi sin_lo``, ``k_hi cos_hi + k_lo sin_hi``: the
  rotate-half form of RoPE) and each key costs one R x D product; a rebuilt key head's scores
  for the query heads that read it (one, or several under GQA) are one ``tl.dot`` per half;

values stay latent: the attention produces ``o' = softmax(s) hv`` [H, Rv] per split, and the
splits are merged by their softmax maxima and sums. The sequence's tiles are dealt to the splits
round-robin, so at any moment every program reads near the others (and, with RoPE, the same
cos / sin rows, from L2): measured faster than consecutive-token splits on the H100, most with
rebuilt keys (benchmarks/RESULTS.md). Heads are padded to 16 rows so scores and
probabilities x values are each one ``tl.dot``.

The absorbed form's two small per-head matmuls around the attention (``absorb``: q -> q B_k^T
before, ``up_v``: o' -> o' B_v after) are fused in when the caller passes them: a small kernel
absorbs every head's query (each weight tile read once for the whole batch) and the merge kernel
applies the value up-projection, so a decode step's attention is three kernels and no torch
matmul. On Hopper the attention and merge kernels are programmatic dependent launches: each
starts while the kernel before it drains (the merge loads its weight slice then) and waits
in-kernel for that kernel's output. (One cooperative kernel doing all three phases with group
barriers measured slower on the H100: the in-kernel absorb and merge phases
cost more than the separate kernels; benchmarks/RESULTS.md.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import sm_count
from .linear import INTERPRET

_ABSORB_BLOCK_R = 32      # latent columns per absorb program: 8 KB of a head's map at D=128
_MERGE_BLOCK_D = 32       # output columns per merge-and-up-project work item


@triton.jit
def _wait_for_previous_kernel():
    """``griddepcontrol.wait`` (a programmatic dependent launch waits here for the kernel before it
    and sees its writes); returns 0, to be added to the addresses of every load of that kernel's
    output. The data dependency is what orders those loads after the wait, whatever the compiler
    makes of the asm statement (Triton 3.6's ``gdc_wait`` is an asm statement with no memory
    clobber: nothing stops a load being scheduled above it)."""
    return tl.inline_asm_elementwise("griddepcontrol.wait; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b in fp32; exact for fp32 operands (tl.dot would round them to tf32)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b).to(tl.float32)


@triton.jit
def _trig_tiles(cos_ptr, sin_ptr, trig, mt, D: tl.constexpr, HALVES_EQUAL: tl.constexpr):
    """cos / sin of each token's slot for the low and high halves of a head (fp32; 0 where
    masked). Standard RoPE tables repeat their first half (``HALVES_EQUAL``): two loads, not four."""
    c_lo = tl.load(cos_ptr + trig, mask=mt[:, None], other=0.0).to(tl.float32)
    s_lo = tl.load(sin_ptr + trig, mask=mt[:, None], other=0.0).to(tl.float32)
    if HALVES_EQUAL:
        return c_lo, c_lo, s_lo, s_lo
    c_hi = tl.load(cos_ptr + trig + D // 2, mask=mt[:, None], other=0.0).to(tl.float32)
    s_hi = tl.load(sin_ptr + trig + D // 2, mask=mt[:, None], other=0.0).to(tl.float32)
    return c_lo, c_hi, s_lo, s_hi


@triton.jit
def _per_head(t, KC: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr):
    """[T, D/2] -> [T, KC*D/2]: one token's half-dims repeated for each key head of a chunk."""
    if KC == 1:
        return t
    return tl.reshape(tl.broadcast_to(t[:, None, :], (BLOCK_T, KC, D // 2)), (BLOCK_T, KC * (D // 2)))


@triton.jit
def _gqa_rope_operands(b_ptr, q_ptr, b, g, jc, hc, dd, rr, rh, mh, stride_bg, stride_br, stride_bc, stride_qb,
                       stride_qh, HPG: tl.constexpr, KPG: tl.constexpr, KC: tl.constexpr, D: tl.constexpr):
    """Chunk ``jc``'s up-projection halves [R, KC*D/2] (its KC key heads side by side) and the
    query blocks, transposed, [KC*D/2, HP]: each query head's column holds its half-query in the
    rows of the key head it reads, zeros elsewhere, so one dot per half scores every key head of
    the chunk."""
    kv = jc * KC + hc                                                      # each column's key head
    bp = b_ptr + g * stride_bg + rr[:, None] * stride_br + (kv * D + dd)[None, :] * stride_bc
    mq = mh[None, :] & (rh[None, :] // (HPG // KPG) == kv[:, None])
    qp = q_ptr + b * stride_qb + (g * HPG + rh)[None, :] * stride_qh + dd[:, None]
    return (tl.load(bp), tl.load(bp + (D // 2) * stride_bc), tl.load(qp, mask=mq, other=0.0),
            tl.load(qp + D // 2, mask=mq, other=0.0))


@triton.jit
def _gqa_rope_scores(hk, b_lo, b_hi, q_lo, q_hi, c_lo, c_hi, s_lo, s_hi, IEEE: tl.constexpr):
    """Scores [HP, T] of a chunk's key heads, rebuilt from the latent tile hk [T, R] and rotated
    (rotate-half RoPE on the halves), rounded to the cache dtype as stored keys would be. The
    rotated keys stay the dots' left operand (registers, as the rebuild dots left them) and the
    small [T, HP] result is transposed, not the [T, KC*D/2] keys."""
    k_lo, k_hi = _dot(hk, b_lo, IEEE), _dot(hk, b_hi, IEEE)                          # [T, KC*D/2]
    r_lo = (k_lo * c_lo - k_hi * s_lo).to(hk.dtype)
    r_hi = (k_hi * c_hi + k_lo * s_hi).to(hk.dtype)
    return tl.trans(_dot(r_lo, q_lo.to(hk.dtype), IEEE) + _dot(r_hi, q_hi.to(hk.dtype), IEEE))


@triton.jit
def _softmax_step(s, hv, mt, mh, scale, m_i, l_i, acc, IEEE: tl.constexpr):
    """Online softmax over one tile: scores s [HP, T] (heads x tokens), values hv [T, RV]."""
    s = s * scale
    s = tl.where(mh[:, None] & mt[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])                                                    # [HP, T]
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return m_new, l_i, acc * alpha[:, None] + _dot(p.to(hv.dtype), hv, IEEE)


@triton.jit
def _absorb_kernel(q_ptr, w_ptr, qa_ptr, B, D, stride_qb, stride_qh, stride_wh, stride_wd, stride_ab, stride_ah,
                   BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                   GDC: tl.constexpr):
    """qa[b-block, h, r-block] = q[b-block, h] @ w[h][:, r-block]: one dot for up to BLOCK_B batch rows
    (rows past B are masked: no bytes read). With ``GDC`` the attention kernel may launch at once."""
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
    h, rb, bb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rd = tl.arange(0, BLOCK_D)
    md = rd < D
    rr = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rbat = bb * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = rbat < B
    w = tl.load(w_ptr + h * stride_wh + rd[:, None] * stride_wd + rr[None, :], mask=md[:, None], other=0.0)
    q = tl.load(q_ptr + rbat[:, None] * stride_qb + h * stride_qh + rd[None, :], mask=mb[:, None] & md[None, :],
                other=0.0)
    qa = _dot(q, w.to(q.dtype), IEEE)
    tl.store(qa_ptr + rbat[:, None] * stride_ab + h * stride_ah + rr[None, :], qa.to(qa_ptr.dtype.element_ty),
             mask=mb[:, None])


@triton.jit
def _latent_attn_kernel(q_ptr, b_ptr, cos_ptr, sin_ptr, hk_ptr, hv_ptr, pos_ptr, start_ptr, o_ptr, ml_ptr,
                        L, scale, stride_qb, stride_qh, stride_bg, stride_br, stride_bc, stride_cl,
                        stride_kb, stride_kl, stride_kg, stride_vb, stride_vl, stride_vg,
                        stride_ob, stride_oh, stride_os,
                        HPG: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, R: tl.constexpr, RV: tl.constexpr,
                        GV_DIV: tl.constexpr, ROPE: tl.constexpr, KPG: tl.constexpr, KC: tl.constexpr,
                        HALVES_EQUAL: tl.constexpr, BLOCK_T: tl.constexpr,
                        IEEE: tl.constexpr, SPLIT_LEN, INTERLEAVE: tl.constexpr, GDC: tl.constexpr,
                        HAS_START: tl.constexpr):
    """One split of one group's sequence; partial outputs and softmax statistics to o / ml. With
    ``HAS_START`` (a left-padded batch) the slots before the row's start are masked. With
    ``GDC`` (grid dependency control) the merge kernel may launch at once, and an absorbed query is
    read only once the absorb kernel before it has finished (the caches and the position were
    written before that kernel started)."""
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
    b, g, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pos = tl.load(pos_ptr).to(tl.int32)      # an i32 loop: Triton pipelines only i32 induction variables
    if INTERLEAVE:        # tiles dealt round-robin: this split takes tiles sp, sp + splits, ...
        t_start, t_end, t_step = sp * BLOCK_T, pos + 1, tl.num_programs(2) * BLOCK_T
    else:                 # SPLIT_LEN consecutive tokens
        t_start, t_step = sp * SPLIT_LEN, BLOCK_T
        t_end = tl.minimum(t_start + SPLIT_LEN, pos + 1)
    first = 0
    if HAS_START:
        first = tl.load(start_ptr + b).to(tl.int32)
    rh = tl.arange(0, HP)
    mh = rh < HPG
    rr = tl.arange(0, R)
    rv = tl.arange(0, RV)
    gv = g // GV_DIV
    m_i = tl.full((HP,), float("-inf"), tl.float32)
    l_i = tl.zeros((HP,), tl.float32)
    acc = tl.zeros((HP, RV), tl.float32)
    if ROPE:
        rd = tl.arange(0, D // 2)                        # one half of a head's dims
        hc = tl.arange(0, KC * (D // 2)) // (D // 2)    # GQA: a chunk of KC key heads' half-dims, [KC * D/2]:
        dd = tl.arange(0, KC * (D // 2)) % (D // 2)     # each column's head within the chunk, dim within the half
        if HPG != KPG and KPG == KC:
            b_lo, b_hi, q_lo, q_hi = _gqa_rope_operands(b_ptr, q_ptr, b, g, 0, hc, dd, rr, rh, mh, stride_bg,
                                                        stride_br, stride_bc, stride_qb, stride_qh, HPG, KPG, KC, D)
    else:
        qa_ptrs = q_ptr + b * stride_qb + (g * HPG + rh)[:, None] * stride_qh + rr[None, :]
        after = 0
        if GDC:               # the absorb kernel's output
            after = _wait_for_previous_kernel()
        qa = tl.load(qa_ptrs + after, mask=mh[:, None], other=0.0)                     # [HP, R]
    for t0 in range(t_start, t_end, t_step):
        rt = t0 + tl.arange(0, BLOCK_T)
        mt = (rt < t_end) & (rt >= first)
        hk = tl.load(hk_ptr + b * stride_kb + rt[:, None] * stride_kl + g * stride_kg + rr[None, :], mask=mt[:, None],
                     other=0.0)                                                      # [T, R]
        if ROPE and HPG == KPG:       # one query head per key head: rotate and score elementwise
            s = tl.zeros((HP, BLOCK_T), tl.float32)
            trig = rt[:, None] * stride_cl + rd[None, :]
            c_lo, c_hi, s_lo, s_hi = _trig_tiles(cos_ptr, sin_ptr, trig, mt, D, HALVES_EQUAL)
            for h in range(HPG):          # a loop, not unrolled: one head's up-projection tiles at a time
                bp = b_ptr + g * stride_bg + rr[:, None] * stride_br + (h * D + rd)[None, :] * stride_bc
                k_lo = _dot(hk, tl.load(bp), IEEE)                                                # [T, D/2]
                k_hi = _dot(hk, tl.load(bp + (D // 2) * stride_bc), IEEE)
                qp = q_ptr + b * stride_qb + (g * HPG + h) * stride_qh + rd
                q_lo, q_hi = tl.load(qp).to(tl.float32), tl.load(qp + D // 2).to(tl.float32)
                sh = tl.sum((k_lo * c_lo - k_hi * s_lo) * q_lo[None, :] + (k_hi * c_hi + k_lo * s_hi) * q_hi[None, :],
                            axis=1)
                s = tl.where(rh[:, None] == h, sh[None, :], s)
        elif ROPE:                    # GQA: KC key heads per dot, each serving HPG / KPG query heads
            trig = rt[:, None] * stride_cl + rd[None, :]
            c_lo, c_hi, s_lo, s_hi = _trig_tiles(cos_ptr, sin_ptr, trig, mt, D, HALVES_EQUAL)     # [T, D/2]
            c_lo, c_hi = _per_head(c_lo, KC, BLOCK_T, D), _per_head(c_hi, KC, BLOCK_T, D)      # [T, KC*D/2]
            s_lo, s_hi = _per_head(s_lo, KC, BLOCK_T, D), _per_head(s_hi, KC, BLOCK_T, D)
            if KPG == KC:             # operands loaded once per split, before the loop
                s = _gqa_rope_scores(hk, b_lo, b_hi, q_lo, q_hi, c_lo, c_hi, s_lo, s_hi, IEEE)
            else:
                s = tl.zeros((HP, BLOCK_T), tl.float32)
                for jc in range(KPG // KC):   # a loop, not unrolled: KC key heads' tiles at a time
                    b_lo, b_hi, q_lo, q_hi = _gqa_rope_operands(b_ptr, q_ptr, b, g, jc, hc, dd, rr, rh, mh,
                                                                stride_bg, stride_br, stride_bc, stride_qb,
                                                                stride_qh, HPG, KPG, KC, D)
                    s += _gqa_rope_scores(hk, b_lo, b_hi, q_lo, q_hi, c_lo, c_hi, s_lo, s_hi, IEEE)
        else:
            s = _dot(qa, tl.trans(hk), IEEE)                                             # [HP, T]
        hv = tl.load(hv_ptr + b * stride_vb + rt[:, None] * stride_vl + gv * stride_vg + rv[None, :], mask=mt[:, None],
                     other=0.0)                                                          # [T, RV]
        m_i, l_i, acc = _softmax_step(s, hv, mt, mh, scale, m_i, l_i, acc, IEEE)
    o_off = o_ptr + b * stride_ob + (g * HPG + rh)[:, None] * stride_oh + sp * stride_os + rv[None, :]
    tl.store(o_off, acc, mask=mh[:, None])
    ml_off = ml_ptr + ((b * tl.num_programs(1) + g) * tl.num_programs(2) + sp) * (2 * HP) + rh
    tl.store(ml_off, m_i)
    tl.store(ml_off + HP, l_i)


@triton.jit
def _combine_kernel(o_ptr, ml_ptr, w_ptr, out_ptr, H, SPLITS, DV, stride_ob, stride_oh, stride_os, stride_wh, stride_wr,
                    stride_yb, stride_yh, HPG: tl.constexpr, HP: tl.constexpr, RV: tl.constexpr,
                    BLOCK_S: tl.constexpr, UP: tl.constexpr, BLOCK_D: tl.constexpr, GDC: tl.constexpr):
    """One head's splits merged by their softmax maxima and sums; with ``UP`` the merged latent
    output times the head's value up-projection ([RV, DV], a BLOCK_D slice per program). With
    ``GDC`` the weight slice is loaded while the attention kernel still runs."""
    bh, db = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rs = tl.arange(0, BLOCK_S)
    ms = rs < SPLITS
    rv = tl.arange(0, RV)
    if UP:   # the weight slice first: its load does not wait for the statistics
        rd = db * BLOCK_D + tl.arange(0, BLOCK_D)
        md = rd < DV
        w = tl.load(w_ptr + h * stride_wh + rv[:, None] * stride_wr + rd[None, :], mask=md[None, :], other=0.0)
    base = ((b * (H // HPG) + h // HPG) * SPLITS + rs) * (2 * HP)
    after = 0
    if GDC:
        after = _wait_for_previous_kernel()
    base += after
    m = tl.load(ml_ptr + base + h % HPG, mask=ms, other=float("-inf"))
    lsum = tl.load(ml_ptr + base + HP + h % HPG, mask=ms, other=0.0)
    mx = tl.max(m, axis=0)
    wt = tl.where(ms & (m > float("-inf")), tl.exp(m - mx), 0.0)
    o = tl.load(o_ptr + after + b * stride_ob + h * stride_oh + rs[:, None] * stride_os + rv[None, :],
                mask=ms[:, None], other=0.0)
    y = tl.sum(o * wt[:, None], axis=0) / tl.sum(wt * lsum, axis=0)                  # [RV]
    if UP:
        tl.store(out_ptr + b * stride_yb + h * stride_yh + rd,
                 tl.sum(y[:, None] * w.to(tl.float32), axis=0).to(out_ptr.dtype.element_ty), mask=md)
    else:
        tl.store(out_ptr + b * stride_yb + h * stride_yh + rv, y.to(out_ptr.dtype.element_ty))


def has_dependent_launch(device) -> bool:
    """Programmatic dependent launch: CUDA GPUs of compute capability 9.0 (Hopper) and later; not
    under the Triton interpreter."""
    if INTERPRET or getattr(device, "type", "cpu") != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def default_split(sequences: int, L: int, device, least: int = 256) -> int:
    """Tokens per program: about one program per SM over all ``sequences`` (batch rows x groups), in
    [least, 8192]. Measured on the H100 (benchmarks/RESULTS.md): fewer, longer splits stream
    the cache faster (B=1 L=64k: 4096 tokens 188 us vs 2048 193 us; B=16 L=16k: 8192 717 us vs 1024
    734 us) until the programs no longer fill the machine (B=1 L=16k: 1024 best, 2048 slower)."""
    sms = sm_count(device)
    return max(least, min(8192, triton.next_power_of_2(triton.cdiv(sequences * L, sms))))


def latent_decode_attention(q: torch.Tensor, hk: torch.Tensor, hv: torch.Tensor, position: torch.Tensor,
                            heads_per_group: int, scale: float, up_k: torch.Tensor | None = None,
                            cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                            value_groups: int | None = None, split_len: int | None = None,
                            block_t: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                            absorb: torch.Tensor | None = None, up_v: torch.Tensor | None = None,
                            rope_halves_equal: bool = False, dependent_launch: bool | None = None,
                            interleave: bool | None = None, starts: torch.Tensor | None = None):
    """One decode token's attention over the latent cache.

    q: [B, H, D] (rope, or with ``absorb``) or the absorbed [B, H, R]; hk: [B, L, G*R];
    hv: [B, L, Gv*Rv] (token-major latent caches; or head-major [B, G, L, R] / [B, Gv, L, Rv], as
    a standard GQA cache is: then plain decode attention, R = Rv = D); position: i64[1], the newest
    valid slot; up_k: [G, R, KPG*D], each group's key up-projection for its KPG key heads (rope
    only; any strides; KPG < heads_per_group is GQA: each rebuilt key head serves
    heads_per_group / KPG query heads); cos/sin: [L, D] tables by position (rope only); value_groups: latent
    groups of hv (default G); absorb: [H, D, R], each head's query map into the key latent (no
    rope); up_v: [H, Rv, Dv], each head's value up-projection; starts: i64[B], each row's first
    valid slot (a left-padded batch: the slots before it are not attended), default 0.
    rope_halves_equal: the caller knows each cos / sin row repeats its first half (standard RoPE
    tables; checked on the data by the cuda program): the kernel reads half of them.
    dependent_launch: launch the attention (after an absorb) and the merge kernel as programmatic
    dependent launches (Hopper and later; default: where the GPU has them), so each starts while
    the kernel before it drains and waits in-kernel for the data it needs.
    interleave: deal the sequence's tiles to the splits round-robin (split s takes tiles s,
    s + splits, ...), so that at any moment all programs read neighbouring tiles; False: each split
    is ``split_len`` consecutive tokens. Default: round-robin where the programs run in one wave or
    keys are rebuilt (RoPE); several waves of absorbed splits measured ~0.3-0.4% faster consecutive.
    Returns o' [B, H, Rv] (value latent space), or [B, H, Dv] with ``up_v``."""
    B, H = q.shape[:2]
    rope = up_k is not None
    G = H // heads_per_group
    Gv = value_groups or G
    if hk.dim() == 4:                      # head-major: [B, G, L, R]
        R, RV, L = hk.shape[-1], hv.shape[-1], hk.shape[2]
        k_strides, v_strides = (hk.stride(0), hk.stride(2), hk.stride(1)), (hv.stride(0), hv.stride(2), hv.stride(1))
    else:
        R, RV, L = hk.shape[-1] // G, hv.shape[-1] // Gv, hk.shape[1]
        k_strides, v_strides = (hk.stride(0), hk.stride(1), R), (hv.stride(0), hv.stride(1), RV)
    if hk.stride(-1) != 1 or hv.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("latent_decode_attention: q and the caches need unit stride in their last dim")
    if absorb is not None and (rope or tuple(absorb.shape) != (H, q.shape[-1], R) or absorb.stride(-1) != 1):
        raise ValueError(f"absorb {tuple(absorb.shape)} must be [H, D, R] = [{H}, {q.shape[-1]}, {R}] "
                         "with unit stride (the absorbed form only: no RoPE key up-projection)")
    if up_v is not None and (up_v.shape[:2] != (H, RV) or up_v.stride(-1) != 1):
        raise ValueError(f"up_v {tuple(up_v.shape)} must be [H, Rv, Dv] = [{H}, {RV}, ...] with unit stride")
    hp = max(16, triton.next_power_of_2(heads_per_group))
    gdc = dependent_launch is not False and has_dependent_launch(q.device)

    def dependent(after_own_kernel: bool) -> dict:
        """Launch options: a dependent launch only right after one of this call's kernels (an
        attention after the absorb: a kernel before this call may still be writing the caches)."""
        return {"launch_pdl": True} if gdc and after_own_kernel else {}

    dv = RV if up_v is None else up_v.shape[-1]
    out = torch.empty(B, H, dv, dtype=q.dtype, device=q.device)
    if absorb is not None:
        qa = torch.empty(B, H, R, dtype=q.dtype, device=q.device)
        br = min(R, _ABSORB_BLOCK_R)
        _absorb_kernel[(H, R // br, triton.cdiv(B, 16))](
            q, absorb, qa, B, q.shape[-1], q.stride(0), q.stride(1), absorb.stride(0), absorb.stride(1), qa.stride(0),
            qa.stride(1), BLOCK_B=16, BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])), BLOCK_R=br,
            IEEE=q.dtype == torch.float32, GDC=gdc)
        q = qa
    D = q.shape[-1]
    if rope:
        half = D // 2                       # a tensor-core dot per half: a power of two, >= 16 on a GPU
        kpg = up_k.shape[-1] // D if up_k.dim() == 3 else 0     # key heads per group
        if (kpg == 0 or tuple(up_k.shape) != (G, R, kpg * D) or heads_per_group % kpg or D % 2 or half & (half - 1)
                or (half < 16 and not INTERPRET)):
            raise ValueError(f"up_k {tuple(up_k.shape)} must be [G, R, KPG*D] = [{G}, {R}, KPG*{D}], KPG (key heads "
                             f"per group) dividing the {heads_per_group} query heads per group, D / 2 a power of two "
                             ">= 16 (RoPE rotates the halves of a head)")
        if cos is None or sin is None or cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] < L or cos.shape[1] != D:
            raise ValueError(f"cos / sin {None if cos is None else tuple(cos.shape)} / "
                             f"{None if sin is None else tuple(sin.shape)} must both be [>= L, D] = [>= {L}, {D}]")
        up, cos, sin = up_k, cos.contiguous(), sin.contiguous()     # (the kernel reads both with one row stride)
        up_strides = up_k.stride()
        # key heads rebuilt per dot: their half-dims side by side, at most 128 columns
        kc = max(c for c in (1, 2, 4, 8, 16) if kpg % c == 0 and c * half <= max(128, half))
    else:
        up = cos = sin = q
        kpg, kc, up_strides = 1, 1, (0, 0, 0)
    gqa_rope = rope and kpg < heads_per_group
    # RoPE, one query head per key head: the up-projection tiles are re-read per key tile: 128-token
    # tiles, 8 warps, 2 stages (H100, B=1 L=16k: 173 us; 128 x 8 x 1 stage 188, 64 x 8 236; 1016 as
    # 16 x 4 before the half-split rotation). GQA RoPE: 64-token tiles, 4 warps, 3 stages (more
    # warps or 128-token tiles spill: each tile's rebuilt keys live in registers), and splits down
    # to 64 tokens so that B=1 fills the SMs (H100 sweep, benchmarks/RESULTS.md).
    # Absorbed latent caches (rows of >= 512 bytes) in one wave of programs: 32-token tiles, the
    # pipeline fills and drains sooner (B=1 L=16k 54.8 us vs 55.9 at 64); several waves (B=16,
    # L >= 16k) and plain GQA caches (64-dim heads): 64
    split = split_len or (L if INTERPRET else default_split(B * G, L, q.device, 64 if gqa_rope else 256))
    splits = triton.cdiv(L, split)
    one_wave = not INTERPRET and B * G * splits <= sm_count(q.device)
    interleave = one_wave or rope or INTERPRET if interleave is None else interleave
    bt = block_t or (16 if INTERPRET else 64 if gqa_rope else 128 if rope else
                     32 if one_wave and R * hk.element_size() >= 512 else 64)
    num_warps = num_warps or (8 if rope and not gqa_rope else 4)
    ieee = hk.dtype == torch.float32
    stages = ({"num_stages": num_stages or (3 if gqa_rope else 2)} if rope else
              {} if num_stages is None else {"num_stages": num_stages})
    o = torch.empty(B, H, splits, RV, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * G * splits * 2 * hp, dtype=torch.float32, device=q.device)
    _latent_attn_kernel[(B, G, splits)](
        q, up, cos, sin, hk, hv, position, position if starts is None else starts, o, ml, L, scale,
        q.stride(0), q.stride(1),
        *up_strides, cos.stride(0) if rope else 0,
        *k_strides, *v_strides, o.stride(0), o.stride(1), o.stride(2),
        HPG=heads_per_group, HP=hp, D=D, R=R, RV=RV, GV_DIV=G // Gv, ROPE=rope, KPG=kpg, KC=kc,
        HALVES_EQUAL=rope_halves_equal, BLOCK_T=bt, IEEE=ieee,
        SPLIT_LEN=split, INTERLEAVE=interleave, GDC=gdc, HAS_START=starts is not None, num_warps=num_warps, **stages,
        **dependent(absorb is not None))
    bd = min(triton.next_power_of_2(dv), _MERGE_BLOCK_D)
    w = up_v if up_v is not None else o
    _combine_kernel[(B * H, triton.cdiv(dv, bd))](o, ml, w, out, H, splits, dv, o.stride(0), o.stride(1), o.stride(2),
                                                  w.stride(0), w.stride(1), out.stride(0), out.stride(1),
                                                  HPG=heads_per_group, HP=hp, RV=RV,
                                                  BLOCK_S=triton.next_power_of_2(splits), UP=up_v is not None,
                                                  BLOCK_D=bd, GDC=gdc, **dependent(True))
    return out


def reference_latent_attention(q, hk, hv, position, heads_per_group, scale, up_k=None, cos=None, sin=None,
                               value_groups=None, absorb=None, up_v=None, starts=None):
    """The same computation with full keys rebuilt in memory (torch), for tests and benchmarks."""
    if absorb is not None:
        q = torch.einsum("bhd,hdr->bhr", q.float(), absorb.float()).to(q.dtype)
    if up_v is not None:
        o = reference_latent_attention(q.float(), hk, hv, position, heads_per_group, scale, up_k, cos, sin, value_groups,
                                       starts=starts)
        return torch.einsum("bhr,hrd->bhd", o, up_v.float()).to(q.dtype)
    B, H = q.shape[:2]
    G = H // heads_per_group
    n = int(position.item()) + 1
    Gv = value_groups or G
    if hk.dim() == 4:                                  # head-major caches -> token-major
        hk, hv = hk.transpose(1, 2).flatten(2), hv.transpose(1, 2).flatten(2)
    hk = hk[:, :n].float().reshape(B, n, G, -1)
    hv = hv[:, :n].float().reshape(B, n, Gv, -1)
    if up_k is not None:
        D = q.shape[-1]
        k = torch.einsum("bngr,grd->bngd", hk, up_k.float()).reshape(B, n, -1, D)   # [B, n, G*KPG, D]
        k = k.repeat_interleave(H // k.shape[2], dim=2)
        half = D // 2
        rot = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
        k = k * cos[:n, None, :].float() + rot * sin[:n, None, :].float()
        s = torch.einsum("bhd,bnhd->bhn", q.float(), k)
    else:
        kq = hk.repeat_interleave(heads_per_group, dim=2)                   # [B, n, H, R]
        s = torch.einsum("bhr,bnhr->bhn", q.float(), kq)
    if starts is not None:
        s = s.masked_fill(torch.arange(n, device=s.device)[None, None, :] < starts[:, None, None].to(s.device),
                          float("-inf"))
    p = torch.softmax(s * scale, dim=-1)
    v = hv.repeat_interleave(H // Gv, dim=2)                               # [B, n, H, Rv]
    return torch.einsum("bhn,bnhr->bhr", p, v).to(q.dtype)


def gqa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor,
                         scale: float, starts: torch.Tensor | None = None) -> torch.Tensor:
    """One decode token's attention over standard caches: q [B, H, 1, D], k / v [B, Hkv, L, D]
    (Hkv dividing H), position i64[1] -> [B, H, 1, D]; only slots 0..position are read (from
    starts[b] on for row b, with ``starts``)."""
    B, H, _, D = q.shape
    out = latent_decode_attention(q[:, :, 0, :], k, v, position, H // k.shape[1], scale, starts=starts)
    return out.reshape(B, H, 1, D)
