"""Hugging Face causal LMs (``LlamaForCausalLM``, ``Qwen2ForCausalLM``) built from a small config
with random weights — no hub access.

``presso.compile`` takes HF models as they are (``presso.frontend.hf``; with ``generation=True`` it
wraps a causal LM itself). ``CausalLMLogits`` is the zoo's fixed ``input_ids -> logits`` form of one,
for tests and benchmarks that want a single tensor output. With ``decoder_only=True`` it drives the
model's own modules (embedding, rotary embedding, decoder layers, norm, head) as
``LlamaModel.forward`` does, with no attention mask: for unpadded input the layers then run SDPA
with ``is_causal``, what HF's mask says, without HF's mask code in the graph."""
from __future__ import annotations

import torch
from torch import nn


class CausalLMLogits(nn.Module):
    def __init__(self, model, decoder_only: bool = False):
        super().__init__()
        self.model, self.decoder_only = model, decoder_only

    def forward(self, input_ids):
        if not self.decoder_only:
            return self.model(input_ids=input_ids, use_cache=False).logits
        inner = self.model.model
        h = inner.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        rope = inner.rotary_emb(h, pos)
        for layer in inner.layers[: inner.config.num_hidden_layers]:
            h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=pos)
        return self.model.lm_head(inner.norm(h))


def make_hf_causal_lm(kind: str = "llama", batch: int = 2, seq: int = 16, seed: int = 0, decoder_only: bool = False):
    import transformers
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        raise ValueError(f"kind must be 'llama' or 'qwen2', got {kind!r}")
    return CausalLMLogits(model.eval(), decoder_only).eval(), (torch.randint(0, 256, (batch, seq)),)
