import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, dims=(32, 64, 64, 10)):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, fc in enumerate(self.fc):
            x = fc(x)
            if i < len(self.fc) - 1:
                x = torch.nn.functional.gelu(x) if i % 2 == 0 else torch.relu(x)
        return x


def make_mlp(batch: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    m = MLP().eval()
    return m, (torch.randn(batch, 32),)
