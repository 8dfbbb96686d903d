"""Integer weight codes: round-to-nearest group by group, dequantization, and the byte rules of
packed int4. Shared by the weight quantizer (``quantize``), the embedding quantizer and the KV
latent quantizer, so that one definition of the stored codes serves them all."""
from __future__ import annotations

import torch

from ..errors import PipelineError


def qparams(w: torch.Tensor, bits: int, symmetric: bool):
    """Per-row scale (fp16-rounded, as stored) and zero point for the columns of ``w``."""
    if symmetric:  # codes in [-2^(b-1), 2^(b-1) - 1]; the scale spreads absmax over 2^b - 1 steps
        scale = (2 * w.abs().amax(1) / (2 ** bits - 1)).clamp_min(1e-8)
        return scale.half().double(), None
    qmax = 2 ** bits - 1
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp_min(1e-8).half().double()
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def encode(w: torch.Tensor, scale, zero, bits: int):
    """Integer codes and their dequantized values for a column block ``w`` (rows, k)."""
    if zero is None:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        q = torch.clamp(torch.round(w / scale[:, None]), lo, hi)
        return q, q * scale[:, None]
    q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2 ** bits - 1)
    return q, (q - zero[:, None]) * scale[:, None]


def num_groups(cols: int, group: int) -> int:
    """Groups along the input dim; a last group shorter than ``group`` holds the remaining columns."""
    return -(-cols // group)


def rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool):
    """Round to nearest, group by group (the last group may be shorter)."""
    w = w.double()
    rows, cols = w.shape
    codes, scales, zeros = [], [], []
    full = cols - cols % group
    parts = [(w[:, :full].reshape(rows * (full // group), group), full // group)] if full else []
    if full < cols:
        parts.append((w[:, full:], 1))
    for wg, ng in parts:
        scale, zero = qparams(wg, bits, symmetric)
        q, _ = encode(wg, scale, zero, bits)
        codes.append(q.reshape(rows, -1))
        scales.append(scale.reshape(rows, ng))
        zeros.append(None if zero is None else zero.reshape(rows, ng))
    return torch.cat(codes, 1), torch.cat(scales, 1), None if symmetric else torch.cat(zeros, 1)


def dequant(codes, scales, zeros, group: int) -> torch.Tensor:
    cols = codes.shape[1]
    c = codes.double()
    if zeros is not None:
        c = c - zeros.double().repeat_interleave(group, 1)[:, :cols]
    return c * scales.double().repeat_interleave(group, 1)[:, :cols]


def check_int4_fits(cols: int, group_size: int, bits: int, odd: str, what: str, where: str = "") -> None:
    """int4 rows and groups hold whole bytes (a group size that does not divide ``cols`` leaves a
    shorter last group); ``odd`` says what has the odd length, ``what`` names the option."""
    if bits == 4 and cols % 2:
        raise PipelineError(f"pass 'quantize': {what} packs two values per byte, but {odd}")
    if bits == 4 and group_size % 2:
        raise PipelineError(f"pass 'quantize': {what} groups hold whole bytes, so group_size must be even, "
                            f"got {group_size}{where}")
