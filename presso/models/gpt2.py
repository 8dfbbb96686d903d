"""GPT-2 as Hugging Face writes it: ``Conv1D`` (addmm, weight stored in x out), learned
positions, eager attention with a ``where`` causal mask, tanh-approximate GELU."""
import math

import torch
from torch import nn


class Conv1D(nn.Module):
    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Block(nn.Module):
    def __init__(self, dim: int, heads: int, max_pos: int):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = Conv1D(3 * dim, dim), Conv1D(dim, dim)
        self.c_fc, self.mlp_proj = Conv1D(4 * dim, dim), Conv1D(dim, 4 * dim)
        self.register_buffer("bias", torch.tril(torch.ones(max_pos, max_pos, dtype=torch.bool)).view(1, 1, max_pos, max_pos),
                             persistent=False)

    def attn(self, x):
        B, T, C = x.shape
        hd = C // self.heads
        q, k, v = self.c_attn(x).split(self.dim, dim=2)
        q, k, v = (t.view(B, T, self.heads, hd).transpose(1, 2) for t in (q, k, v))
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], math.sqrt(hd), dtype=w.dtype)
        causal = self.bias[:, :, :T, :T]
        w = torch.where(causal, w, torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype))
        w = nn.functional.softmax(w, dim=-1)
        a = torch.matmul(w, v).transpose(1, 2).reshape(B, T, C)
        return self.c_proj(a)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        h = nn.functional.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")
        return x + self.mlp_proj(h)


class GPT2(nn.Module):
    def __init__(self, vocab=256, dim=64, layers=2, heads=4, max_pos=128):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(max_pos, dim)
        self.h = nn.ModuleList(GPT2Block(dim, heads, max_pos) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], dtype=torch.long)
        x = self.wte(input_ids) + self.wpe(pos)
        for b in self.h:
            x = b(x)
        return nn.functional.linear(self.ln_f(x), self.wte.weight)  # tied LM head


def make_gpt2(batch: int = 2, seq: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    m = GPT2().eval()
    return m, (torch.randint(0, 256, (batch, seq)),)
