"""Accuracy and size of presso's compression recipes on the real all-MiniLM-L6-v2 encoder.

Calibrated on CALIBRATION sentences, measured on the disjoint EVALUATION sentences: mean cosine
similarity of sentence embeddings to the uncompressed model, model bytes of real storage.

    python benchmarks/compression_minilm.py
"""
import time

import torch

import presso
from presso.models import make_minilm
from presso.models.minilm import Tokenizer
from presso.models.sentences import CALIBRATION, EVALUATION

RECIPES = [
    "quantize{weights=int8}",
    "quantize{weights=int8,embeddings=int8}",
    "quantize{weights=int8,activations=int8}",
    "quantize{weights=int8,activations=int7}",
    "quantize{weights=int8,activations=int7,rotate=hadamard}",
    "quantize{weights=int4,group_size=128}",
    "quantize{weights=int4,group_size=128,method=gptq}",
    "quantize{weights=int4,group_size=128,symmetric=false,rotate=hadamard}",
    "quantize{weights=int4,group_size=128,method=gptq,symmetric=false,rotate=hadamard,act_order=true,damp=0.1}",
    "sparsify{pattern=2:4,method=magnitude}",
    "sparsify{pattern=2:4,method=wanda}",
    "sparsify{pattern=4:8,method=wanda}",
    "sparsify{pattern=auto,method=wanda,density=0.5}",
    "sparsify{pattern=auto,method=wanda,density=0.75}",
    "lowrank{method=svd,ratio=0.9}",
    "lowrank{method=whitened,ratio=0.9,sequential=false}",
    "lowrank{method=svd,ratio=0.7}",
    "lowrank{method=whitened,ratio=0.7,sequential=false}",
    "lowrank{method=whitened,ratio=0.9,share_input=true,sequential=false}",
]


def main():
    tok = Tokenizer()
    model, example = make_minilm(EVALUATION[:4], pad_to=24)
    n = len(CALIBRATION) // 4 * 4
    calib = [tok(CALIBRATION[i:i + 4], pad_to=24) for i in range(0, n, 4)]
    evals = [tok(EVALUATION[i:i + 4], pad_to=24) for i in range(0, len(EVALUATION), 4)]
    with torch.no_grad():
        ref = [model(*e) for e in evals]
    base = presso.compile(model, example_inputs=example).graph.param_bytes()
    print(f"all-MiniLM-L6-v2, {n} calibration / {len(EVALUATION)} evaluation sentences; uncompressed {base:,} bytes")
    print("| recipe | mean cos | min cos | model bytes | ratio on compressed layers | compile s |")
    print("|---|---|---|---|---|---|")
    for r in RECIPES:
        t = time.perf_counter()
        cm = presso.compile(model, example_inputs=example, recipe=r, calibration=calib)
        dt = time.perf_counter() - t
        cos = torch.cat([torch.nn.functional.cosine_similarity(cm(*e), y) for e, y in zip(evals, ref)])
        layers = cm.report()["compression"]["layers"]
        before = sum(l["bytes_before"] for l in layers)
        after = sum(l["bytes_after"] for l in layers)
        print(f"| `{r}` | {cos.mean():.5f} | {cos.min():.5f} | {cm.graph.param_bytes():,} | "
              f"{before / max(after, 1):.2f}x | {dt:.1f} |", flush=True)


if __name__ == "__main__":
    main()
