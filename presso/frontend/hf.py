"""Hugging Face ``transformers`` models passed to presso as they are.

Three things stand between a ``PreTrainedModel`` and ``torch.export``, and this module handles each:

* **Cache outputs.** A causal LM called with ``use_cache=True`` returns a ``DynamicCache``, which
  ``torch.export`` cannot flatten unless it is registered as a pytree node. ``prepare`` registers it
  with transformers' own registration (``transformers.integrations.executorch``), so the compiled
  model returns the cache too, rebuilt as a ``DynamicCache`` holding the prompt's keys and values.
* **Output structure.** The model's outputs (a ``ModelOutput``, a dict, nested tuples) are flattened
  by the export; ``output_spec`` keeps torch's pytree spec as text in ``graph.meta`` and
  ``restore_outputs`` rebuilds it after every run (artifacts keep it too).
* **Generation.** HF builds an explicit boolean mask under ``torch.export`` (its ``is_causal``
  shortcut reads tensor values, which export cannot), and presso's decode program needs plain
  causal attention to give it a KV cache. ``for_generation`` wraps a causal LM so that, while it is
  traced, its mask functions return what HF's mask says for unpadded prompts (the case
  ``CompiledModel.generate`` serves) in a form presso recognises: no mask for SDPA (which then runs
  with ``is_causal``), and for eager attention (Gemma 2's soft-capped scores) a slice of a constant
  additive causal table.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import sys
import warnings
from typing import Any, Optional

import torch

from ..errors import FrontendError


def is_hf_model(module) -> bool:
    """True for a ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(module, torch.nn.Module) and isinstance(module, tf.PreTrainedModel)


def is_causal_lm(module) -> bool:
    """A decoder-only HF model that generates (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...)."""
    if not is_hf_model(module):
        return False
    config = module.config
    return bool(module.can_generate()) and not getattr(config, "is_encoder_decoder", False)


def prepare(module) -> None:
    """Register HF's cache classes as pytree nodes so that cache outputs export (idempotent)."""
    if not is_hf_model(module):
        return
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:     # a transformers without it: cache outputs fail with the hint below
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        register_dynamic_cache_export_support()


def export_hint(module, text: str) -> str:
    """What to do when the export of an HF model failed on something presso knows about."""
    if "Cache" in text and ("not a known type" in text or "pytree" in text):
        return (f". {type(module).__name__} returns a cache object that cannot be flattened; presso returns "
                "DynamicCache outputs only: call the model with use_cache=False (or set model.config.use_cache "
                "= False) to compile it without its cache, or compile with generation=True to get presso's "
                "own KV cache through CompiledModel.generate")
    return ""


# ---- output structure --------------------------------------------------------------------------
def output_spec(ep) -> Optional[str]:
    """The pytree spec of the model's outputs, as torch's JSON text (None when it cannot be written)."""
    spec = getattr(ep.call_spec, "out_spec", None)
    if spec is None:
        return None
    try:
        return torch.utils._pytree.treespec_dumps(spec)
    except Exception:  # noqa: BLE001 - a type registered without a serialized name: outputs stay flat
        return None


_SPEC_CACHE: dict[str, Any] = {}


def _load_spec(text: str):
    """``treespec_loads``, after importing the modules that define the spec's node types (a loaded
    artifact may be the first thing in the process to mention ``CausalLMOutputWithPast``)."""
    if text in _SPEC_CACHE:
        return _SPEC_CACHE[text]
    names = set()

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "type" and isinstance(v, str) and "." in v:
                    names.add(v)
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
        elif isinstance(o, str) and o.startswith(("{", "[")):
            try:
                walk(json.loads(o))
            except ValueError:
                pass

    walk(json.loads(text))
    for name in names:
        module = name.rsplit(".", 1)[0]
        if module.split(".")[0] == "transformers":
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
                from transformers.integrations.executorch import register_dynamic_cache_export_support
                register_dynamic_cache_export_support()
    spec = _SPEC_CACHE[text] = torch.utils._pytree.treespec_loads(text)
    return spec


def restore_outputs(meta: dict, outs: list):
    """The flat outputs of a run, in the model's own structure when ``meta`` has its spec; else a
    tensor for one output and a tuple for several."""
    text = meta.get("output_spec")
    if text:
        try:
            spec = _load_spec(text)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"the model's output structure cannot be rebuilt ({type(e).__name__}: {e}); "
                          "returning its outputs as a flat tuple")
            meta.pop("output_spec", None)
        else:
            if spec.num_leaves == len(outs):
                return torch.utils._pytree.tree_unflatten(list(outs), spec)
    return outs[0] if len(outs) == 1 else tuple(outs)


# ---- generation ----------------------------------------------------------------------------------
class CausalLMForGeneration(torch.nn.Module):
    """``input_ids -> logits`` of an HF causal LM, traced with a mask presso reads as plain causal
    attention (see the module docstring). ``max_len`` bounds the positions generation will reach: a
    sliding window shorter than it would need a real mask, which is refused."""

    def __init__(self, model, max_len: int):
        super().__init__()
        self.model, self.max_len = model, max_len
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in _CAUSAL_MASKS:
            raise FrontendError(f"{type(model).__name__} uses attention implementation {impl!r}; generation=True "
                                f"compiles HF causal LMs whose attention is one of {', '.join(_CAUSAL_MASKS)}: "
                                "build or load the model with attn_implementation='sdpa'")

    def forward(self, input_ids):
        kwargs = {}
        if "position_ids" in inspect.signature(self.model.forward).parameters:
            # positions as ``arange(seq)``, which the decode program turns into the step's positions
            # (OPT would otherwise count them with a cumsum over an all-ones mask, which it cannot)
            kwargs["position_ids"] = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        with _causal_masks(self.max_len, type(self.model).__name__):
            return self.model(input_ids=input_ids, use_cache=False, **kwargs).logits


def _no_mask(max_len: int, **_):
    """SDPA without a mask tensor: HF's SDPA attention then passes ``is_causal=True``."""
    return None


def _additive_causal_table(max_len: int, q_length, kv_length, dtype=torch.float32, **_):
    """Eager attention adds its mask to the scores: the top-left [q, kv] corner of a constant
    [max_len, max_len] table (0 on and below the diagonal, the dtype's minimum above, as HF's
    ``eager_mask``), which the attention recognizer reads as causal at any sequence length."""
    table = torch.full((max_len, max_len), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return table[None, None, :q_length, :kv_length]


_CAUSAL_MASKS = {"sdpa": _no_mask, "eager": _additive_causal_table}


@contextlib.contextmanager
def _causal_masks(max_len: int, name: str):
    """HF's mask functions replaced, while the model is traced, by the causal masks above."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    mapping = type(ALL_MASK_ATTENTION_FUNCTIONS)._global_mapping
    originals = {impl: mapping[impl] for impl in _CAUSAL_MASKS}

    def masked(make):
        def mask(local_size=None, **kwargs):
            if local_size is not None and local_size < max_len:
                raise FrontendError(f"{name} has a sliding attention window of {local_size} tokens, shorter than "
                                    f"max_len={max_len}; presso's KV cache is causal over the whole sequence: "
                                    f"compile with max_len <= {local_size}")
            return make(max_len, **kwargs)
        return mask

    mapping.update({impl: masked(make) for impl, make in _CAUSAL_MASKS.items()})
    try:
        yield
    finally:
        mapping.update(originals)


def for_generation(module, max_len: int):
    """The module ``compile(..., generation=True)`` traces: HF causal LMs wrapped, others as they are."""
    return CausalLMForGeneration(module, max_len) if is_causal_lm(module) else module
