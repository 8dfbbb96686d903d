"""Autoregressive generation over the decode program: preallocated KV-cache buffers, one prefill
run over the (left-padded) prompts, then single-token decode steps; each step's logits go through
``sampling`` (repetition penalty, greedy or temperature / top-k / top-p sampling) and its stopping
criteria (eos ids, stop sequences, a time budget). Tokens can be streamed as they come."""
from __future__ import annotations

import inspect
from typing import Iterator, Optional

import torch

from ..errors import InputError
from ..ir.graph import Graph
from .prompts import PromptBatch, batch_prompts
from ..ir.interpret import ReferenceRuntime
from .sampling import GenerationOptions, StopCriteria, TokenPicker, check_options

OPTIONS = tuple(p for p in inspect.signature(check_options).parameters if p not in ("max_new_tokens", "vocab"))


class Generator:
    def __init__(self, decode_graph: Graph, step_graph: Graph, specs, max_len: int, device=None,
                 make_runtime=ReferenceRuntime):
        self.graph, self.step, self.specs, self.max_len = decode_graph, step_graph, specs, max_len
        self.prefill_rt = make_runtime(decode_graph)
        self.step_rt = make_runtime(step_graph)
        self.device = device or getattr(self.step_rt, "device", "cpu")
        vocab = step_graph.outputs[0].type.shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else None
        # why this model cannot decode a ragged batch (positions feeding more than RoPE and
        # absolute position tables), or None
        self.ragged_refusal = decode_graph.meta.get("decode", {}).get("ragged_refusal")

    def new_caches(self, batch_bindings: dict) -> list[torch.Tensor]:
        """Zeroed cache buffers, allocated once for the whole generation."""
        return [torch.zeros(s.type.concrete_shape(batch_bindings), dtype=s.type.dtype.torch, device=self.device)
                for s in self.specs]

    def cache_bytes_per_token(self, caches: list[torch.Tensor], batch: int) -> int:
        """Bytes the real cache buffers hold per token (per sequence of the batch)."""
        return sum(c.numel() * c.element_size() for c in caches) // (batch * self.max_len)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, attention_mask: Optional[torch.Tensor] = None,
                 streamer=None, **options):
        """Prompt + new tokens: i64[batch, seq + new] for a tensor (finished sequences filled with
        the pad id), or for a list of prompts a list of 1-D tensors, each its prompt and its new
        tokens up to its eos or stop sequence. ``streamer``: called with each step's new tokens
        (i64[batch], on the CPU), or an object with Hugging Face's ``put`` / ``end`` (``put`` gets
        the prompt ids first, as ``TextStreamer`` expects)."""
        hf_protocol = hasattr(streamer, "put") and hasattr(streamer, "end")
        if streamer is not None and not callable(streamer) and not hf_protocol:
            raise InputError(f"streamer must be a callable taking each step's tokens, or an object with put() and "
                             f"end() (a transformers streamer), got {type(streamer).__name__}")
        batch, opts = self._prepare(input_ids, max_new_tokens, attention_mask, options)
        put = streamer.put if hf_protocol else streamer
        if hf_protocol:
            streamer.put(batch.ids.cpu())
        picker, crit = self._processors(batch, opts)
        new = []
        for nxt in self._steps(batch, opts, picker, crit):
            new.append(nxt)
            if streamer is not None:
                put(nxt.cpu())
        if hf_protocol:
            streamer.end()
        return self._result(batch, new, crit)

    def stream(self, input_ids, max_new_tokens: int, attention_mask: Optional[torch.Tensor] = None,
               **options) -> Iterator[torch.Tensor]:
        """The new tokens of each step (i64[batch], on the CPU) as they come; the arguments are
        those of ``generate`` and are checked before this returns."""
        batch, opts = self._prepare(input_ids, max_new_tokens, attention_mask, options)
        picker, crit = self._processors(batch, opts)

        def tokens():
            with torch.no_grad():
                for nxt in self._steps(batch, opts, picker, crit):
                    yield nxt.cpu()
        return tokens()

    def _prepare(self, input_ids, max_new_tokens, attention_mask, options) -> tuple[PromptBatch, GenerationOptions]:
        unknown = [k for k in options if k not in OPTIONS]
        if unknown:
            raise InputError(f"unknown generate option(s) {', '.join(unknown)}; allowed: attention_mask, streamer, "
                             f"{', '.join(OPTIONS)}")
        opts = check_options(max_new_tokens, vocab=self.vocab, **options)
        batch = batch_prompts(input_ids, attention_mask, opts.pad_token_id, self.vocab)
        if batch.ragged and self.ragged_refusal:
            raise InputError(f"this model cannot decode prompts of different lengths in one batch: "
                             f"{self.ragged_refusal}; generate them one by one")
        prompt = batch.ids.shape[1]
        if prompt + max_new_tokens > self.max_len:
            raise InputError(f"prompt ({prompt}) + max_new_tokens ({max_new_tokens}) exceeds the cache length "
                             f"{self.max_len}; compile with a larger max_len")
        return batch, opts

    def _processors(self, batch: PromptBatch, opts: GenerationOptions) -> tuple[TokenPicker, StopCriteria]:
        vocab = self.vocab or int(self.step.outputs[0].type.shape[-1])
        return TokenPicker(opts, batch.ids, batch.real, vocab), StopCriteria(opts, batch.ids, batch.real)

    def _steps(self, batch: PromptBatch, opts: GenerationOptions, picker: TokenPicker,
               crit: StopCriteria) -> Iterator[torch.Tensor]:
        """Prefill, then one decode step per new token; yields each step's tokens where the
        runtime left them (the GPU for the cuda target): a step costs no copy to the host and no
        wait for the GPU unless the caller reads the tokens, or a stopping criterion watches them,
        or sampling draws on the CPU."""
        n, prompt = batch.ids.shape
        caches = self.new_caches({"batch": n})
        self.last_cache_bytes_per_token = self.cache_bytes_per_token(caches, n)
        outs = self.prefill_rt.run(batch.ids, torch.arange(prompt, device=batch.ids.device), batch.starts, *caches)
        logits, caches = outs[0], outs[1:]
        dev = logits.device
        starts = batch.starts.to(dev)
        for step in range(opts.max_new_tokens):
            nxt = crit.update(picker(logits[:, -1, :]).to(dev))
            yield nxt
            if step == opts.max_new_tokens - 1 or crit.over():
                break
            args = (nxt[:, None], torch.full((1,), prompt + step, dtype=torch.int64, device=dev), starts, *caches)
            if step == 0 and hasattr(self.step_rt, "capture") and not self.step_rt.captured(*args):
                self.step_rt.capture(*args)     # the cuda runtime records the step as a CUDA graph, once
            outs = self.step_rt.run(*args)
            logits, caches = outs[0], outs[1:]

    @staticmethod
    def _result(batch: PromptBatch, new: list, crit: StopCriteria):
        ids = batch.ids
        out = torch.cat([ids] + [t[:, None].to(ids.device) for t in new], dim=1) if new else ids
        if not batch.as_list:
            return out
        ended = crit.ended_at.cpu()
        starts = batch.starts.cpu()
        return [out[i, int(starts[i]):out.shape[1] if ended[i] < 0 else ids.shape[1] + int(ended[i]) + 1]
                for i in range(out.shape[0])]
