"""lm-evaluation-harness adapter: ``PressoLM`` scores a (compressed) language model on harness tasks.

Optional extra (``pip install presso[lmeval]``); importing this module registers the model type
``presso`` with the harness, so both of these work::

    lm_eval.simple_evaluate(model=PressoLM(compiled, tokenizer), tasks=[...])
    lm_eval --model presso --model_args model=model.presso,tokenizer=PATH --tasks ...

``model`` is anything ``presso.eval.as_callable`` takes (a ``CompiledModel``, an artifact path, a
torch module); ``tokenizer`` a Hugging Face tokenizer or the name/path to load one from. Each
request runs as one ``[1, T]`` call. A model compiled with a static sequence length gets
``seq_len=``: every call is right-padded to it (the model is causal, so padding after the scored
tokens changes none of their logits) and longer inputs keep their last ``seq_len`` tokens.
The three request types: ``loglikelihood`` (sum of log p(continuation | context) and whether the
continuation is the greedy one), ``loglikelihood_rolling`` (a whole text's log-likelihood in
windows of ``max_length``), and ``generate_until`` (greedy, a full forward per new token).
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:         # pragma: no cover - the extra is not installed
    raise ImportError("presso.eval.harness needs lm-evaluation-harness: pip install 'presso[lmeval]'") from e

from ..errors import InputError
from . import as_callable


@register_model("presso")
class PressoLM(LM):
    """An ``lm_eval`` model over presso's ids -> logits callables (see the module docstring)."""

    def __init__(self, model, tokenizer, max_length: int = 2048, seq_len: Optional[int] = None,
                 max_gen_toks: int = 64):
        super().__init__()
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.run = as_callable(model)
        self.tok = tokenizer
        self.seq_len = int(seq_len) if seq_len else None
        self.max_length = min(int(max_length), self.seq_len or int(max_length))
        if self.max_length < 2:
            raise InputError(f"PressoLM: max_length / seq_len must be >= 2, got {self.max_length}")
        self.max_gen_toks = int(max_gen_toks)
        eot = getattr(tokenizer, "eos_token_id", None)
        self.prefix_id = eot if eot is not None else getattr(tokenizer, "bos_token_id", None)
        if self.prefix_id is None:
            raise InputError("PressoLM: the tokenizer has neither an eos nor a bos token to condition the first "
                             "token of a text on")

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """log-softmax of the logits at every position of ``ids`` (its last ``max_length`` tokens)."""
        ids = ids[-self.max_length:]
        x = torch.tensor([ids + [self.prefix_id] * ((self.seq_len or len(ids)) - len(ids))], dtype=torch.long)
        logits = self.run(x)
        if logits.shape[:2] != x.shape:
            raise InputError(f"PressoLM: the model returned logits of shape {tuple(logits.shape)} for ids of shape "
                             f"{tuple(x.shape)}: it needs [batch, seq, vocab] logits")
        return torch.log_softmax(logits[0, :len(ids)].double(), -1)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it."""
        if len(continuation) > self.max_length:
            raise InputError(f"PressoLM: a continuation of {len(continuation)} tokens does not fit max_length "
                             f"{self.max_length}")
        ids = (context + continuation)[-(self.max_length + 1):]
        logp = self._logprobs(ids[:-1])[-len(continuation):]
        target = torch.tensor(continuation)
        return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokens of context and continuation, split where the harness splits them: the whole text is
        encoded once (so a word spanning the boundary keeps its merge) and the context's tokens
        are its prefix; trailing spaces of the context move to the continuation."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        n = len(self._encode(context))
        ctx = whole[:n] or [self.prefix_id]
        return ctx, whole[n:]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._split(context, continuation)
            if not cont:
                raise InputError(f"PressoLM: empty continuation for context {context[-40:]!r}")
            out.append(self._score(ctx, cont))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            ids = [self.prefix_id] + self._encode(req.args[0])
            total, start = 0.0, 1               # ids[start:end] are scored, each with the window's left context
            while start < len(ids):
                end = min(start + self.max_length - 1, len(ids) - 1) + 1
                lo = max(0, end - 1 - self.max_length)
                logp = self._logprobs(ids[lo:end - 1])[start - 1 - lo:]
                total += float(logp.gather(1, torch.tensor(ids[start:end])[:, None]).sum())
                start = end
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids, new = self._encode(context) or [self.prefix_id], []
            text = ""
            for _ in range(int(kwargs.get("max_gen_toks", self.max_gen_toks))):
                nxt = int(self._logprobs(ids + new)[-1].argmax())
                if nxt == getattr(self.tok, "eos_token_id", None):
                    break
                new.append(nxt)
                text = self.tok.decode(new)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out
