"""The ``cuda`` target's ops: each is one launch of a Triton kernel (or of a torch routine the
target chooses over the reference, for decode attention and in-place cache writes), written into
the graph by the target's ``select_kernels`` pass (``codegen/triton/select.py``).

Each op's reference implementation is the composition of canonical ops it replaces, evaluated
with those ops' own references, so a lowered graph still verifies, runs on the reference runtime
and is checked by ``check="numeric"``. A node whose op is not ``cuda.*`` runs its torch reference.

Compressed linears share one schema: ``x``, the weight producer's operands, ``bias?``, then the
operands of a folded elementwise epilogue (``extras*``). ``epilogue`` is that node's expression
over its operands with the linear's result at operand ``acc`` (the extras fill the others, in
order); ``pair=true`` (int4, tiled layout) computes two stacked linears whose halves are the
expression's two operands (the first at ``acc``), as one launch.
"""
from __future__ import annotations

import torch

from ..errors import IRError
from .expr import parse as parse_expr
from .ops import (_attn_cached_infer, _attn_flops, _cache_update_infer, attention_cached, cache_update, densify_nm,
                  dequantize, evaluate_expr, gather_dequantize, layer_norm, linear, rms_norm, rotary)
from .registry import Attr, defop, get_op, meta_infer
from .types import TensorType

_EPILOGUE = {"epilogue": Attr("str", ""), "acc": Attr("int", 0)}
_DEQUANT = {"group_size": Attr("int"), "dtype": Attr("dtype", "f32")}
_NM = {"n": Attr("int"), "m": Attr("int")}


def with_epilogue(y: torch.Tensor, extras, epilogue: str, acc: int, pair: bool = False) -> torch.Tensor:
    """The linear's result ``y`` through its folded epilogue (none when ``epilogue`` is empty)."""
    if not epilogue:
        return y
    if pair:
        half = y.shape[-1] // 2
        xs = [None, None]
        xs[acc], xs[1 - acc] = y[..., :half], y[..., half:]
    else:
        xs = list(extras)
        xs.insert(acc, y)
    return evaluate_expr(parse_expr(epilogue), xs)


def _epilogue_verify(n_fixed: int):
    def check(types, attrs):
        expr = attrs.get("epilogue", "")
        if not expr:
            if len(types) > n_fixed:
                raise IRError("operands past the bias are an epilogue's: set 'epilogue'")
            return
        from .expr import operands
        used = operands(parse_expr(expr))
        n = 2 if attrs.get("pair") else len(types) - n_fixed + 1
        if used and max(used) >= n or not 0 <= attrs["acc"] < n:
            raise IRError(f"epilogue {expr!r} with its result at %{attrs['acc']} reads operands past its {n}")
    return check


def _linear_flops(ins, outs, attrs, b):
    return 2 * outs[0].numel(b) * ins[0].concrete_shape(b)[-1] * (2 if attrs.get("pair") else 1)


@defop("cuda.int4_linear", ["x", "q", "scales", "zeros?", "bias?", "extras*"],
       {**_DEQUANT, "tiled": Attr("bool", False), "pair": Attr("bool", False), **_EPILOGUE}, "linear",
       verify=_epilogue_verify(5), flops=_linear_flops, implements="linear")
def int4_linear(x, q, scales, zeros, bias, extras, group_size, dtype, tiled, pair, epilogue, acc):
    """linear(x, dequantize(q, scales, zeros){bits=4}, bias) [-> epilogue]: the int4 GEMV / GEMM
    reading packed codes (``tiled``: repacked at load into int4.py's tiled layout)."""
    y = linear(x, dequantize(q, scales, zeros, 4, group_size, dtype), bias)
    return with_epilogue(y, extras, epilogue, acc, pair)


@defop("cuda.int8_linear", ["x", "q", "scales", "zeros?", "bias?", "extras*"], {**_DEQUANT, **_EPILOGUE}, "linear",
       verify=_epilogue_verify(5), flops=_linear_flops, implements="linear")
def int8_linear(x, q, scales, zeros, bias, extras, group_size, dtype, epilogue, acc):
    """linear(x, dequantize(q, scales, zeros){bits=8}, bias) [-> epilogue]."""
    return with_epilogue(linear(x, dequantize(q, scales, zeros, 8, group_size, dtype), bias), extras, epilogue, acc)


_NM_OPERANDS = ["x", "values", "index", "bias?", "extras*"]
_NM_INT4_OPERANDS = ["x", "codes", "scales", "zeros?", "index", "bias?", "extras*"]


def _nm_linear(x, values, index, bias, extras, n, m, epilogue, acc):
    return with_epilogue(linear(x, densify_nm(values, index, n, m), bias), extras, epilogue, acc)


def _nm_int4_linear(x, codes, scales, zeros, index, bias, extras, n, m, group_size, dtype, epilogue, acc):
    vals = dequantize(codes, scales, zeros, 4, group_size, dtype)
    return with_epilogue(linear(x, densify_nm(vals, index, n, m), bias), extras, epilogue, acc)


@defop("cuda.nm_linear", _NM_OPERANDS, {**_NM, **_EPILOGUE}, "linear", verify=_epilogue_verify(4),
       flops=_linear_flops, implements="linear")
def nm_linear(x, values, index, bias, extras, n, m, epilogue, acc):
    """linear(x, densify_nm(values, index), bias) [-> epilogue]: the gather kernel (2-bit positions
    repacked at load where m <= 4)."""
    return _nm_linear(x, values, index, bias, extras, n, m, epilogue, acc)


@defop("cuda.nm_select_linear", _NM_OPERANDS, {**_NM, **_EPILOGUE}, "linear", verify=_epilogue_verify(4),
       flops=_linear_flops, implements="linear")
def nm_select_linear(x, values, index, bias, extras, n, m, epilogue, acc):
    """linear(x, densify_nm(values, index), bias) [-> epilogue]: nm_select.py's select kernel
    (values and positions repacked at load)."""
    return _nm_linear(x, values, index, bias, extras, n, m, epilogue, acc)


@defop("cuda.nm_int4_linear", _NM_INT4_OPERANDS, {**_NM, **_DEQUANT, **_EPILOGUE}, "linear",
       verify=_epilogue_verify(6), flops=_linear_flops, implements="linear")
def nm_int4_linear(x, codes, scales, zeros, index, bias, extras, n, m, group_size, dtype, epilogue, acc):
    """linear(x, densify_nm(dequantize(codes, scales, zeros){bits=4}, index), bias) [-> epilogue]:
    the gather kernel dequantizing the kept codes in registers."""
    return _nm_int4_linear(x, codes, scales, zeros, index, bias, extras, n, m, group_size, dtype, epilogue, acc)


@defop("cuda.nm_select_int4_linear", _NM_INT4_OPERANDS, {**_NM, **_DEQUANT, **_EPILOGUE}, "linear",
       verify=_epilogue_verify(6), flops=_linear_flops, implements="linear")
def nm_select_int4_linear(x, codes, scales, zeros, index, bias, extras, n, m, group_size, dtype, epilogue, acc):
    """linear(x, densify_nm(dequantize(codes, scales, zeros){bits=4}, index), bias) [-> epilogue]:
    nm_select.py's select kernel on its int4 layout."""
    return _nm_int4_linear(x, codes, scales, zeros, index, bias, extras, n, m, group_size, dtype, epilogue, acc)


@defop("cuda.elementwise", ["xs*"], {"expr": Attr("str")}, "elementwise",
       flops=lambda i, o, a, b: sum(t.numel(b) for t in o), implements="fused_elementwise")
def elementwise(xs, expr):
    """A ``fused_elementwise`` region as one generated kernel (elementwise.py)."""
    return evaluate_expr(parse_expr(expr), xs)


@defop("cuda.rms_norm", ["x", "weight?"], {"eps": Attr("float", 1e-6)}, "norm", implements="rms_norm")
def cuda_rms_norm(x, weight, eps):
    """rms_norm over the last dim, one row per program (norm.py)."""
    return rms_norm(x, weight, eps, 1)


@defop("cuda.layer_norm", ["x", "weight?", "bias?"], {"eps": Attr("float", 1e-5)}, "norm", implements="layer_norm")
def cuda_layer_norm(x, weight, bias, eps):
    """layer_norm over the last dim, one row per program (norm.py)."""
    return layer_norm(x, weight, bias, eps, 1)


@defop("cuda.rotary", ["x", "cos", "sin"], category="elementwise", implements="rotary")
def cuda_rotary(x, cos, sin):
    """RoPE (rotary.py)."""
    return rotary(x, cos, sin)


@defop("cuda.gather_dequant", ["index", "q", "scales", "zeros?"],
       {"bits": Attr("int", choices=(4, 8)), **_DEQUANT, "tiled": Attr("bool", False)}, "compressed",
       implements="gather_dequantize")
def gather_dequant(index, q, scales, zeros, bits, group_size, dtype, tiled):
    """gather_dequantize: rows of a quantized table (``tiled``: int4.py's layout, shared with a
    tied head's GEMV)."""
    return gather_dequantize(index, q, scales, zeros, bits, group_size, dtype)


def _rotary_caches_infer(types, attrs):
    q, k, v, cos, sin, kc, vc, pos = types
    (rq,) = meta_infer(get_op("rotary"), [q, cos, sin], {}, "cuda.rotary_into_caches")
    return [rq, *_cache_update_infer([kc, k, pos], attrs), *_cache_update_infer([vc, v, pos], attrs)]


@defop("cuda.rotary_into_caches", ["q", "k", "v", "cos", "sin", "k_cache", "v_cache", "positions"],
       {"axis": Attr("int"), "rotate_k": Attr("bool", True)}, "state", infer=_rotary_caches_infer)
def rotary_into_caches(q, k, v, cos, sin, k_cache, v_cache, positions, axis, rotate_k):
    """A decode layer's RoPE of q and its two cache writes in one launch: (rotary(q), k_cache with
    rotary(k) (or k, ``rotate_k=false``: latent caches) at ``positions``, v_cache with v)."""
    k = rotary(k, cos, sin) if rotate_k else k
    return (rotary(q, cos, sin), cache_update(k_cache, k, positions, axis), cache_update(v_cache, v, positions, axis))


@defop("cuda.cache_write", ["cache", "new", "positions"], {"axis": Attr("int")}, "state",
       infer=_cache_update_infer, implements="cache_update")
def cache_write(cache, new, positions, axis):
    """cache_update written into the cache buffer itself (valid: nothing reads the old cache)."""
    return cache_update(cache, new, positions, axis)


_ATTN = {"scale": Attr("float", None, optional=True)}


@defop("cuda.gqa_decode_attention", ["q", "k", "v", "positions", "starts?"], _ATTN, "attention",
       infer=_attn_cached_infer, flops=_attn_flops, implements="attention_cached")
def gqa_decode_attention(q, k, v, positions, starts, scale):
    """attention_cached of one token over head-major caches, split over the sequence, reading
    only the slots up to the position (latent_attention.py's plain form)."""
    return attention_cached(q, k, v, positions, starts, scale, None)


@defop("cuda.masked_attention", ["q", "k", "v", "positions", "starts?"],
       {**_ATTN, "softcap": Attr("float", None, optional=True)}, "attention", infer=_attn_cached_infer,
       flops=_attn_flops, implements="attention_cached")
def masked_attention(q, k, v, positions, starts, scale, softcap):
    """attention_cached as torch SDPA over the whole cache with a position mask built once per run
    (no host sync, so a step can be captured as a CUDA graph)."""
    return attention_cached(q, k, v, positions, starts, scale, softcap)


def per_group(cache: torch.Tensor, groups: int) -> torch.Tensor:
    """A token-major latent cache [B, L, G*r] as G heads [B, G, L, r]."""
    B, L, W = cache.shape
    return cache.reshape(B, L, groups, W // groups).permute(0, 2, 1, 3)


def _latent_infer(types, attrs):
    q, kc, vc, pos, absorb, k_up, cos, sin, v_up, starts = types
    if q.rank != 4 or kc.rank != 3 or vc.rank != 3:
        raise IRError(f"cuda.latent_attention: q must be [B, H, 1, d] and the caches [B, L, width], got {q}, {kc}, {vc}")
    width = v_up.shape[-1] if v_up is not None else vc.shape[-1] // attrs["value_groups"]
    return [TensorType(tuple(q.shape[:3]) + (width,), q.dtype)]


@defop("cuda.latent_attention", ["q", "k_cache", "v_cache", "positions", "q_absorb?", "k_up?", "cos?", "sin?",
                                 "v_up?", "starts?"],
       {"scale": Attr("float"), "groups": Attr("int"), "value_groups": Attr("int")}, "attention",
       infer=_latent_infer)
def latent_attention(q, k_cache, v_cache, positions, q_absorb, k_up, cos, sin, v_up, starts, scale, groups,
                     value_groups):
    """Decode attention over Palu latent caches read as stored (latent_attention.py): keys are
    the key cache's ``groups`` latents, queries absorbed into them (q @ q_absorb, per head) or,
    with ``k_up``, keys rebuilt per slot (linear(k_cache, k_up) as heads of q's width) and rotated
    by cos / sin; values the value cache's ``value_groups`` latents, up-projected per head by
    ``v_up`` after the attention."""
    if q_absorb is not None:
        q = torch.matmul(q, q_absorb)
    if k_up is None:
        k = per_group(k_cache, groups)
    else:
        B, L, _ = k_cache.shape
        k = rotary(linear(k_cache, k_up).reshape(B, L, -1, q.shape[-1]).permute(0, 2, 1, 3), cos, sin)
    o = attention_cached(q, k, per_group(v_cache, value_groups), positions, starts, scale, None)
    return torch.matmul(o, v_up) if v_up is not None else o
