"""``presso.eval``: how good is a (compressed) language model on real text.

* ``perplexity(model, token_ids, window=256, stride=None)`` — exp of the mean next-token negative
  log-likelihood over fixed-size windows of a token stream. ``stride < window`` slides the window
  and scores only the tokens each window adds, every one of them with ``window - stride`` tokens of
  left context or more (the sliding evaluation of the HF perplexity guide).
* ``greedy_agreement(model, reference, prompts, max_new_tokens)`` — how often two models' greedy
  continuations pick the same token (positionwise) and how long their common prefix is.

``model`` is anything that maps token ids to logits: a torch module (a Hugging Face causal LM, or
a module returning logits), a ``CompiledModel``, or the path of a saved artifact. Windows have one
fixed length, so a model compiled with a static ``[1, window]`` example input scores text too.
Every result carries the number of tokens scored and the wall time. ``presso.eval.harness.PressoLM``
(the ``lmeval`` extra) runs the same models under lm-evaluation-harness tasks."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import InputError
from .text import calibration_text, evaluation_text

__all__ = ["Perplexity", "Agreement", "perplexity", "greedy_agreement", "windows", "logits_of", "as_callable",
           "evaluation_text", "calibration_text"]


@dataclass
class Perplexity:
    perplexity: float
    nll: float              # mean negative log-likelihood per scored token (nats)
    tokens: int             # tokens scored
    windows: int
    seconds: float

    def __str__(self):
        return (f"perplexity {self.perplexity:.3f} over {self.tokens} tokens ({self.windows} windows), "
                f"{self.seconds:.1f} s")


@dataclass
class Agreement:
    token_agreement: float  # fraction of generated positions where both models chose the same token
    prefix: float           # mean length of the common prefix, as a fraction of max_new_tokens
    prompts: int
    seconds: float

    def __str__(self):
        return (f"greedy agreement {self.token_agreement:.3f} (common prefix {self.prefix:.3f}) over "
                f"{self.prompts} prompts, {self.seconds:.1f} s")


def logits_of(output) -> torch.Tensor:
    """The logits in a model's output: a tensor, the first of a tuple, ``.logits`` or ``["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(f"cannot find logits in a model output of type {type(output).__name__}: "
                     "return a tensor, a tuple starting with the logits, or an object with .logits")


def as_callable(model):
    """``ids -> logits`` for a torch module, a ``CompiledModel`` or an artifact path."""
    from ..api import CompiledModel, load
    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    if isinstance(model, CompiledModel):
        return lambda ids: logits_of(model(ids))
    if isinstance(model, torch.nn.Module):
        hf = hasattr(model, "config") and hasattr(model, "can_generate")

        def run(ids):
            with torch.no_grad():
                return logits_of(model(input_ids=ids, use_cache=False) if hf else model(ids))
        return run
    if callable(model):
        return lambda ids: logits_of(model(ids))
    raise InputError(f"cannot evaluate a {type(model).__name__}: pass a torch module, a CompiledModel, an artifact "
                     "path or a callable mapping token ids to logits")


def windows(token_ids, window: int, stride: Optional[int] = None, max_windows: Optional[int] = None):
    """``(ids [1, window], first scored position)`` over a 1-D token stream; the last partial
    window is dropped so that every call has one shape."""
    ids = torch.as_tensor(token_ids).reshape(-1).long()
    stride = stride or window
    if window < 2 or not 0 < stride <= window:
        raise InputError(f"perplexity needs window >= 2 and 0 < stride <= window, got window={window}, stride={stride}")
    if ids.numel() < window:
        raise InputError(f"the text has {ids.numel()} tokens, fewer than one window of {window}")
    out = []
    for start in range(0, ids.numel() - window + 1, stride):
        out.append((ids[start:start + window][None], 1 if start == 0 else max(1, window - stride)))
        if max_windows and len(out) == max_windows:
            break
    return out


def perplexity(model, token_ids, window: int = 256, stride: Optional[int] = None,
               max_windows: Optional[int] = None, batch_size: int = 1) -> Perplexity:
    """Perplexity of ``model`` on ``token_ids`` (see the module docstring). ``batch_size`` windows
    run per call (a model compiled with a symbolic batch takes them at once)."""
    run = as_callable(model)
    t0 = time.perf_counter()
    total, count = 0.0, 0
    spans = windows(token_ids, window, stride, max_windows)
    for b in range(0, len(spans), batch_size):
        chunk = spans[b:b + batch_size]
        ids = torch.cat([c[0] for c in chunk])
        logits = run(ids)
        if logits.shape[:2] != ids.shape:
            raise InputError(f"the model returned logits of shape {tuple(logits.shape)} for ids of shape "
                             f"{tuple(ids.shape)}: perplexity needs [batch, seq, vocab] logits")
        for row, (_, first) in enumerate(chunk):
            logp = torch.log_softmax(logits[row, first - 1:-1].double(), -1)
            target = ids[row, first:]
            total -= float(logp.gather(1, target[:, None]).sum())
            count += target.numel()
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(spans), time.perf_counter() - t0)


def _greedy(model, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation: ``generate`` where the model has one, else a full forward per token."""
    from ..api import CompiledModel
    if isinstance(model, CompiledModel) and "max_len" in model.graph.meta:
        return model.generate(prompt, max_new_tokens=max_new_tokens)[0, prompt.shape[1]:]
    if isinstance(model, torch.nn.Module) and hasattr(model, "generate") and hasattr(model, "config"):
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, attention_mask=torch.ones_like(prompt))
        return out[0, prompt.shape[1]:]
    run, ids = as_callable(model), prompt
    for _ in range(max_new_tokens):
        ids = torch.cat([ids, run(ids)[:, -1:].argmax(-1)], 1)
    return ids[0, prompt.shape[1]:]


def greedy_agreement(model, reference, prompts: Sequence, max_new_tokens: int = 32) -> Agreement:
    """Agreement of ``model``'s greedy continuations of ``prompts`` (1-D id tensors) with ``reference``'s."""
    if not prompts:
        raise InputError("greedy_agreement needs at least one prompt")
    t0 = time.perf_counter()
    same = prefix = 0.0
    for p in prompts:
        p = torch.as_tensor(p).reshape(1, -1).long()
        a, b = _greedy(model, p, max_new_tokens), _greedy(reference, p, max_new_tokens)
        n = min(a.numel(), b.numel(), max_new_tokens)
        eq = (a[:n] == b[:n]).tolist()
        same += sum(eq) / max_new_tokens
        prefix += (eq.index(False) if False in eq else n) / max_new_tokens
    k = len(prompts)
    return Agreement(same / k, prefix / k, k, time.perf_counter() - t0)
