"""Split-K for the compressed GEMV kernels (int4, N:M select): at decode a layer with few output
rows has too few row blocks to fill the GPU, and each program's serial walk over K waits on its
loads; splitting K over several programs per row block restores the parallelism. The partial sums
go to an fp32 workspace and the last program of a row block to arrive (an atomic counter) adds
them, applies bias and epilogue, and resets its counter."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import sm_count
from .linear import INTERPRET

_counters: dict = {}


def zeroed_counters(n: int, device) -> torch.Tensor:
    """Split-K arrival counters: zero at rest (the last program of each row block resets its own),
    so one buffer per device serves every call, CUDA-graph replays included."""
    key = str(device)
    buf = _counters.get(key)
    if buf is None or buf.numel() < n:
        buf = _counters[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def split_factor(tiles: int, steps: int, per_sm: int, device) -> int:
    """Split-K factor: double it (never past one K step per program) until there are ``per_sm``
    programs per SM."""
    sms = 4 if INTERPRET else sm_count(device)
    split = 1
    while split * 2 <= steps and tiles * split < per_sm * sms:
        split *= 2
    return split


@triton.jit
def split_sum(ptrs, stride, mask, SPLIT: tl.constexpr):
    """The SPLIT partial sums at ``ptrs``, ``ptrs + stride``, ... added (read past L1: other
    programs wrote them)."""
    tot = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    for k in tl.static_range(1, SPLIT):
        tot += tl.load(ptrs + k * stride, mask=mask, other=0.0, cache_modifier=".cg")
    return tot
