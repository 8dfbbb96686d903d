"""Autoregressive generation over the decode program: preallocated KV-cache buffers, one prefill
run over the prompt, then single-token decode steps; greedy or sampling (temperature, top-k)."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputError
from ..ir.graph import Graph
from .reference import ReferenceRuntime


class Generator:
    def __init__(self, decode_graph: Graph, step_graph: Graph, specs, max_len: int, device=None,
                 make_runtime=ReferenceRuntime):
        self.graph, self.step, self.specs, self.max_len = decode_graph, step_graph, specs, max_len
        self.prefill_rt = make_runtime(decode_graph)
        self.step_rt = make_runtime(step_graph)
        self.device = device or getattr(self.step_rt, "device", "cpu")

    def new_caches(self, batch_bindings: dict) -> list[torch.Tensor]:
        """Zeroed cache buffers, allocated once for the whole generation."""
        return [torch.zeros(s.type.concrete_shape(batch_bindings), dtype=s.type.dtype.torch, device=self.device)
                for s in self.specs]

    def cache_bytes_per_token(self, caches: list[torch.Tensor], batch: int) -> int:
        """Bytes the real cache buffers hold per token (per sequence of the batch)."""
        return sum(c.numel() * c.element_size() for c in caches) // (batch * self.max_len)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
                 eos_token_id: Optional[int] = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise InputError(f"input_ids must be i64[batch, seq], got {input_ids.dtype}{list(input_ids.shape)}")
        batch, prompt = input_ids.shape
        _check_arguments(prompt, max_new_tokens, do_sample, temperature, top_k, eos_token_id)
        if prompt + max_new_tokens > self.max_len:
            raise InputError(f"prompt ({prompt}) + max_new_tokens ({max_new_tokens}) exceeds the cache length "
                             f"{self.max_len}; compile with a larger max_len")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        caches = self.new_caches({"batch": batch})
        self.last_cache_bytes_per_token = self.cache_bytes_per_token(caches, batch)
        outs = self.prefill_rt.run(input_ids, torch.arange(prompt), *caches)
        # tokens, positions and logits stay where the runtime left them (the GPU for the cuda
        # target): a step costs no logits copy to the host and no wait for the GPU, except to
        # test for the end of every sequence when eos_token_id is given, or to sample
        logits, caches = outs[0], outs[1:]
        dev = logits.device
        tokens = [input_ids.to(dev)]
        done = torch.zeros(batch, dtype=torch.bool, device=dev)
        for step in range(max_new_tokens):
            nxt = self._pick(logits[:, -1, :], do_sample, temperature, top_k, gen).to(dev)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            tokens.append(nxt[:, None])
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            args = (nxt[:, None], torch.full((1,), prompt + step, dtype=torch.int64, device=dev), *caches)
            if step == 0 and hasattr(self.step_rt, "capture") and not self.step_rt.captured(*args):
                self.step_rt.capture(*args)     # the cuda runtime records the step as a CUDA graph, once
            outs = self.step_rt.run(*args)
            logits, caches = outs[0], outs[1:]
        return torch.cat(tokens, dim=1).to(input_ids.device)

    @staticmethod
    def _pick(logits, do_sample, temperature, top_k, gen):
        if not do_sample:
            return logits.argmax(-1)
        logits = logits.float().cpu() / max(temperature, 1e-6)     # the seeded generator is a CPU one
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]


def _check_arguments(prompt: int, max_new_tokens, do_sample: bool, temperature, top_k, eos_token_id) -> None:
    """Typed errors for arguments torch would otherwise reject deep inside (or take silently: a
    negative token count, a negative temperature that inverts the distribution)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if prompt == 0:
        raise InputError("input_ids needs at least one prompt token per sequence, got [batch, 0]")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if eos_token_id is not None and (not is_int(eos_token_id) or eos_token_id < 0):
        raise InputError(f"eos_token_id must be a token id (an int >= 0) or None, got {eos_token_id!r}")
    if do_sample:
        if not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise InputError(f"temperature must be a number >= 0 (0 samples the most likely token), "
                             f"got {temperature!r}")
        if not is_int(top_k) or top_k < 0:
            raise InputError(f"top_k must be an int >= 0 (0 keeps every token), got {top_k!r}")
