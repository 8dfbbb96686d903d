"""The model zoo used by tests, examples and benchmarks. Each entry builds ``(module, example_inputs)``."""
from __future__ import annotations

from typing import Callable

from .cnn import make_cnn
from .gpt2 import make_gpt2
from .llama import LlamaConfig, make_llama
from .minilm import make_minilm, minilm_available
from .mlp import make_mlp
from .vit import make_vit

ZOO: dict[str, Callable] = {
    "mlp": make_mlp,
    "cnn": make_cnn,
    "vit": make_vit,
    "gpt2": make_gpt2,
    "llama": make_llama,
    "minilm": make_minilm,
}

__all__ = ["ZOO", "make_mlp", "make_cnn", "make_vit", "make_gpt2", "make_llama", "make_minilm", "LlamaConfig",
           "minilm_available"]
