"""End to end: compile the real all-MiniLM-L6-v2 sentence encoder from PyTorch and from its own
ONNX export, run both on real sentences, and compare with PyTorch; then compress it to int8
(calibrated on other real sentences) and compile it for this CPU through TVM."""
import contextlib
import io
import os
import sys
import tempfile
import warnings

import torch

import presso
from presso.models.minilm import make_minilm
from presso.models.minilm import Tokenizer
from presso.models.sentences import CALIBRATION, EVALUATION, SENTENCES

TEXTS = EVALUATION[:6] + ["A cat was dozing on the sunny window ledge.", SENTENCES[0]]


def main() -> int:
    model, example = make_minilm(TEXTS, pad_to=24)
    with torch.no_grad():
        expected = model(*example)

    compiled = presso.compile(model, target="reference", example_inputs=example, check="numeric")
    got = compiled(*example)
    cos = torch.nn.functional.cosine_similarity(got, expected).min().item()
    print(f"torch  -> presso: {compiled}")
    print(f"  max |diff| vs PyTorch = {(got - expected).abs().max().item():.2e}, min cosine = {cos:.6f}")

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "minilm.onnx")
        torch.onnx.export(model, example, path, dynamo=True, verbose=False)
        from_onnx = presso.compile(path, example_inputs=example)
    got2 = from_onnx(*example)
    print(f"ONNX   -> presso: {from_onnx}")
    print(f"  max |diff| vs PyTorch = {(got2 - expected).abs().max().item():.2e}")
    same = compiled.graph.op_histogram() == from_onnx.graph.op_histogram()
    print(f"  torch and ONNX imports canonicalize to the same ops: {same}")

    rep = compiled.report()
    print("\nops:", ", ".join(f"{k}x{v}" for k, v in rep["ops"].items()))
    print(f"params: {rep['totals']['params']:,}  bytes: {rep['totals']['bytes']:,}  "
          f"GFLOPs at batch {example[0].shape[0]}: {rep['totals']['flops'] / 1e9:.3f}")
    print("\nfirst lines of the IR:")
    print("\n".join(line for line in str(compiled.graph).splitlines() if not line.strip().startswith("param"))[:1200])
    sims = got @ got.T
    print("\nmost similar pair:", end=" ")
    sims.fill_diagonal_(-1)
    i, j = divmod(int(sims.argmax()), sims.shape[0])
    print(f"{TEXTS[i]!r} ~ {TEXTS[j]!r} ({sims[i, j].item():.3f})")
    # int8 for the CPU: 7-bit per-token activations after a Hadamard rotation, int8 weights; the
    # llvm target runs them on AVX2 integer dot products where the CPU has them
    recipe = "quantize{weights=int8,activations=int7,rotate=hadamard}"
    tok = Tokenizer()
    calib = [tok(CALIBRATION[i:i + 8], pad_to=24) for i in range(0, 64, 8)]
    cpu = presso.compile(model, target="llvm", example_inputs=example, recipe=recipe, calibration=calib)
    got3 = cpu(*example)
    cos3 = torch.nn.functional.cosine_similarity(got3, expected).min().item()
    layers = cpu.report()["compression"]["layers"]
    before, after = sum(l["bytes_before"] for l in layers), sum(l["bytes_after"] for l in layers)
    print(f"\n{recipe} -> llvm: {len(layers)} linears {before:,} -> {after:,} bytes; min cosine to PyTorch "
          f"= {cos3:.5f}")
    ok = cos > 0.99999 and same and (got2 - expected).abs().max().item() < 1e-4 and cos3 > 0.998
    print("\nOK" if ok else "\nMISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
