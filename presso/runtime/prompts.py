"""A batch of prompts as the decode program takes it: left-padded ids and, per sequence, the first
cache slot holding a real token (``starts``). Every sequence then writes its new tokens at the
same slot; its attention never reads the slots before its start, and position lookups are taken
relative to it (``passes/decode.py``), so each prompt decodes as it would alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import InputError


@dataclass
class PromptBatch:
    ids: torch.Tensor         # i64[batch, padded length], pads on the left
    starts: torch.Tensor      # i64[batch]: the number of pads of each sequence
    as_list: bool             # the prompts came as a list: the result is a list too

    @property
    def real(self) -> torch.Tensor:
        """bool[batch, padded length]: True where a slot holds a prompt token."""
        return torch.arange(self.ids.shape[1], device=self.ids.device)[None, :] >= self.starts[:, None]

    @property
    def ragged(self) -> bool:
        return bool((self.starts > 0).any())


def batch_prompts(input_ids, attention_mask=None, pad_token_id: int = 0, vocab: Optional[int] = None) -> PromptBatch:
    """``input_ids`` i64[batch, seq] (with an optional left-padding ``attention_mask`` of the same
    shape, ones on real tokens, as a tokenizer with ``padding_side="left"`` gives), or a list of
    prompts of any lengths (1-D tensors or lists of ints), which are left-padded here."""
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise InputError("attention_mask goes with an input_ids tensor; a list of prompts needs none "
                             "(each prompt's length is its own)")
        if not input_ids:
            raise InputError("input_ids is an empty list; give at least one prompt")
        prompts = [_one_prompt(i, p) for i, p in enumerate(input_ids)]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
        starts = torch.tensor([width - len(p) for p in prompts], dtype=torch.int64)
        batch = PromptBatch(ids, starts, True)
    else:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            got = (f"{input_ids.dtype}{list(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
                   else type(input_ids).__name__)
            raise InputError(f"input_ids must be i64[batch, seq] or a list of prompts, got {got}")
        if input_ids.shape[1] == 0:
            raise InputError("input_ids needs at least one prompt token per sequence, got [batch, 0]")
        starts = torch.zeros(input_ids.shape[0], dtype=torch.int64, device=input_ids.device)
        if attention_mask is not None:
            starts = _left_padding(attention_mask, input_ids)
        batch = PromptBatch(input_ids, starts, False)
    if vocab is not None:
        bad = batch.real & ((batch.ids < 0) | (batch.ids >= vocab))
        if bool(bad.any()):
            row, col = (int(x) for x in bad.nonzero()[0])
            raise InputError(f"input_ids[{row}, {col}] = {int(batch.ids[row, col])} is not a token id "
                             f"(0 <= id < {vocab}, the vocabulary)")
    return batch


def _one_prompt(i: int, p) -> torch.Tensor:
    t = p if isinstance(p, torch.Tensor) else torch.tensor(p) if isinstance(p, (list, tuple)) else None
    if t is None or t.dim() != 1 or (t.numel() and t.dtype not in (torch.int64, torch.int32)):
        raise InputError(f"input_ids[{i}] must be a 1-D tensor or list of token ids, got "
                         f"{type(p).__name__ if t is None else f'{t.dtype}{list(t.shape)}'}")
    if t.numel() == 0:
        raise InputError(f"input_ids[{i}] is an empty prompt; every prompt needs at least one token")
    return t.to(torch.int64)


def _left_padding(mask, input_ids: torch.Tensor) -> torch.Tensor:
    """The pads of each row of a left-padding mask; refuses other masks (a right-padded row's pads
    would be read as tokens before the new ones)."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(input_ids.shape):
        got = f"{mask.dtype}{list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"attention_mask must be a tensor of input_ids' shape {list(input_ids.shape)}, got {got}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must hold 0 (pad) and 1 (token), as an int or bool tensor")
    m = mask.to(torch.int64).to(input_ids.device)
    starts = m.shape[1] - m.sum(1)
    expected = torch.arange(m.shape[1], device=m.device)[None, :] >= starts[:, None]
    for row in range(m.shape[0]):
        if int(starts[row]) == m.shape[1]:
            raise InputError(f"attention_mask row {row} has no token (all zeros); every prompt needs one")
        if not torch.equal(m[row].bool(), expected[row]):
            raise InputError(f"attention_mask row {row} is not left-padded ({m[row].tolist()}): generate takes "
                             "pads before the tokens only (a tokenizer's padding_side='left'), or a list of "
                             "prompts of different lengths")
    return starts
