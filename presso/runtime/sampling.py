"""What ``generate`` does with each step's logits and when it stops: the options, checked once
with typed errors, the logits processors (repetition penalty, temperature, top-k, top-p: the
semantics and order of Hugging Face's ``generate``, so that the same options pick the same
tokens), and the stopping criteria (end-of-sequence ids, stop sequences, a time budget)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import InputError


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _token_id(name: str, v, vocab: Optional[int], alternatives: str = "") -> int:
    if not _is_int(v) or v < 0 or (vocab is not None and v >= vocab):
        bound = f"0 <= id < {vocab}, the vocabulary size" if vocab is not None else "an int >= 0"
        raise InputError(f"{name} must be a token id ({bound}){alternatives}, got {v!r}")
    return v


@dataclass(frozen=True)
class GenerationOptions:
    """Checked options of one ``generate`` call (see ``check_options``)."""
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple = ()
    pad_token_id: int = 0
    stop_sequences: tuple = ()
    max_time: Optional[float] = None
    seed: Optional[int] = None


def check_options(max_new_tokens, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                  eos_token_id=None, pad_token_id=None, stop_sequences=None, max_time=None, seed=None,
                  vocab: Optional[int] = None) -> GenerationOptions:
    """Typed errors, naming the argument and what it allows, for values torch would reject deep
    inside or take silently (a negative token count, a negative temperature that inverts the
    distribution, an eos id past the vocabulary that never fires). ``pad_token_id`` (what a
    finished sequence is filled with, and left padding of a list of prompts) defaults to the first
    eos id, else 0."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise InputError(f"do_sample must be True or False, got {do_sample!r}")
    if not _is_number(temperature) or not temperature >= 0 or math.isinf(temperature):
        raise InputError(f"temperature must be a number >= 0 (0 samples the most likely token), got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise InputError(f"top_k must be an int >= 0 (0 keeps every token), got {top_k!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be a number in (0, 1] (1 keeps every token), got {top_p!r}")
    if not _is_number(repetition_penalty) or not 0 < repetition_penalty < math.inf:
        raise InputError(f"repetition_penalty must be a number > 0 (1 is none, > 1 discourages repeats), "
                         f"got {repetition_penalty!r}")
    if eos_token_id is None:
        eos = ()
    elif isinstance(eos_token_id, (list, tuple)) and eos_token_id:
        eos = tuple(_token_id("eos_token_id", e, vocab, ", a non-empty list of them or None") for e in eos_token_id)
    else:
        eos = (_token_id("eos_token_id", eos_token_id, vocab, ", a non-empty list of them or None"),)
    if pad_token_id is not None:
        _token_id("pad_token_id", pad_token_id, vocab, " or None")
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    stops = ()
    if stop_sequences is not None:
        if not isinstance(stop_sequences, (list, tuple)) or not all(
                isinstance(s, (list, tuple)) and s for s in stop_sequences):
            raise InputError(f"stop_sequences must be a list of non-empty token-id lists, e.g. [[13, 13]], "
                             f"got {stop_sequences!r}")
        stops = tuple(tuple(_token_id("each token of stop_sequences", t, vocab) for t in s) for s in stop_sequences)
    if max_time is not None and (not _is_number(max_time) or not max_time > 0):
        raise InputError(f"max_time must be a number of seconds > 0, or None, got {max_time!r}")
    if seed is not None and not _is_int(seed):
        raise InputError(f"seed must be an int or None, got {seed!r}")
    return GenerationOptions(max_new_tokens, do_sample, float(temperature), top_k, float(top_p),
                             float(repetition_penalty), eos, pad, stops, max_time, seed)


class TokenPicker:
    """The next token of every sequence from its logits: repetition penalty over the tokens each
    sequence holds (its prompt without pads, and what it generated), then argmax, or temperature,
    top-k, top-p and a draw from a CPU generator (seeded: reproducible on every target)."""

    def __init__(self, opts: GenerationOptions, prompt_ids: torch.Tensor, real: torch.Tensor, vocab: int):
        self.opts = opts
        self.gen = torch.Generator().manual_seed(opts.seed) if opts.seed is not None else None
        self.seen = None
        if opts.repetition_penalty != 1.0:
            # which tokens each sequence holds: [batch, vocab] (pads excluded)
            self.seen = torch.zeros(prompt_ids.shape[0], vocab, dtype=torch.bool, device=prompt_ids.device)
            rows = torch.arange(prompt_ids.shape[0], device=prompt_ids.device)[:, None].expand_as(prompt_ids)
            self.seen[rows[real], prompt_ids[real]] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        o = self.opts
        if self.seen is not None:
            logits = logits.float()
            seen = self.seen.to(logits.device)
            logits = torch.where(seen, torch.where(logits < 0, logits * o.repetition_penalty,
                                                   logits / o.repetition_penalty), logits)
        if not o.do_sample:
            nxt = logits.argmax(-1)
        else:
            nxt = self._sample(logits)
        if self.seen is not None:
            self.seen = self.seen.to(nxt.device)
            self.seen[torch.arange(nxt.shape[0], device=nxt.device), nxt] = True
        return nxt

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        o = self.opts
        logits = logits.float().cpu() / max(o.temperature, 1e-6)     # the seeded generator is a CPU one
        if o.top_k:
            kth = logits.topk(min(o.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if o.top_p < 1.0:
            # the smallest set of most likely tokens whose probabilities sum past top_p (at least one)
            sorted_logits, order = torch.sort(logits, descending=False)
            drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - o.top_p
            drop[..., -1:] = False
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=self.gen)[:, 0]


class StopCriteria:
    """Which sequences are done after each new token: an eos id, the sequence ending with a stop
    sequence (matched over prompt and new tokens, pads excluded, ending at the new token), and
    whether the whole generation is over (every sequence done, or ``max_time`` seconds spent since
    ``generate`` began, checked after each token as Hugging Face's ``MaxTimeCriteria`` is)."""

    clock = staticmethod(time.monotonic)

    def __init__(self, opts: GenerationOptions, prompt_ids: torch.Tensor, real: torch.Tensor):
        self.opts = opts
        self.started = self.clock()
        dev = prompt_ids.device
        self.eos = torch.tensor(opts.eos_token_ids, dtype=torch.int64, device=dev) if opts.eos_token_ids else None
        self.stops = [torch.tensor(s, dtype=torch.int64, device=dev) for s in opts.stop_sequences]
        width = max((len(s) for s in opts.stop_sequences), default=0)
        self.tail = None
        if width:            # the last `width` tokens of each sequence, -1 for pads and before the start
            held = torch.where(real, prompt_ids, -1)
            self.tail = torch.cat([torch.full((held.shape[0], width), -1, dtype=torch.int64, device=dev), held],
                                  1)[:, -width:]
        self.done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=dev)
        self.ended_at = torch.full_like(self.done, -1, dtype=torch.int64)    # the step each sequence ended at
        self.step = -1

    @property
    def watches_tokens(self) -> bool:
        return self.eos is not None or self.tail is not None

    def update(self, nxt: torch.Tensor) -> torch.Tensor:
        """Fill the tokens of sequences already done with the pad id, mark the newly done ones;
        returns the tokens to emit."""
        self.done = self.done.to(nxt.device)
        nxt = torch.where(self.done, torch.full_like(nxt, self.opts.pad_token_id), nxt)
        finished = torch.zeros_like(self.done)
        if self.eos is not None:
            finished |= torch.isin(nxt, self.eos.to(nxt.device))
        if self.tail is not None:
            self.tail = torch.cat([self.tail.to(nxt.device)[:, 1:], nxt[:, None]], 1)
            for s in self.stops:
                finished |= (self.tail[:, -len(s):] == s.to(nxt.device)).all(1)
        self.step += 1
        self.ended_at = torch.where(finished & ~self.done, self.step, self.ended_at.to(nxt.device))
        self.done |= finished
        return nxt

    def over(self) -> bool:
        if self.opts.max_time is not None and self.clock() - self.started > self.opts.max_time:
            return True
        return self.watches_tokens and bool(self.done.all())
