"""presso ``llvm`` (TVM) vs onnxruntime on this CPU: MiniLM (real weights) and a small Llama.

Same model, same inputs, one run: presso fp32 and int8 against onnxruntime fp32 and onnxruntime
``quantize_dynamic`` int8 (its MatMulInteger path). Reports median latency, ratio to ORT int8
(< 1.0 = presso faster) and, for MiniLM, the cosine similarity of embeddings to torch fp32.

    python benchmarks/cpu_tvm.py [--batch 8] [--seq 128] [--iters 20]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

import presso
from presso.models import LlamaConfig, make_llama, make_minilm
from presso.models.sentences import CALIBRATION, EVALUATION

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from zoo_util import export_onnx  # noqa: E402


def timeit(fns, iters, block=5):
    """Median ms of each callable, timed in rounds: per round each callable runs one untimed call
    and then ``block`` timed ones. The rounds spread the machine's drift (+-20% here between
    minutes) over every runtime alike; the untimed call lets the previous runtime's spinning
    thread pool (onnxruntime's, TVM's) wind down before the timing starts."""
    ts = [[] for _ in fns]
    for _ in range(max(1, iters // block)):
        for t, fn in zip(ts, fns):
            fn()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                t.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in ts]


def ort_session(proto, int8: bool):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    data = proto.SerializeToString()
    if int8:
        with tempfile.TemporaryDirectory() as d:
            src, dst = os.path.join(d, "m.onnx"), os.path.join(d, "q.onnx")
            open(src, "wb").write(data)
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
            data = open(dst, "rb").read()
    so = ort.SessionOptions()
    so.intra_op_num_threads = len(os.sched_getaffinity(0))
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def bench(name, model, inputs, recipes, calib, iters, cos_of=None):
    feeds_of = lambda sess: {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}  # noqa: E731
    proto = export_onnx(model, inputs)
    with torch.no_grad():
        ref = model(*inputs)
    rows = []
    for label, int8 in (("onnxruntime fp32", False), ("onnxruntime int8 (quantize_dynamic)", True)):
        sess = ort_session(proto, int8)
        feeds = feeds_of(sess)
        rows.append([label, lambda sess=sess, feeds=feeds: sess.run(None, feeds)])
    for label, recipe in recipes:
        cm = presso.compile(model, example_inputs=inputs, target="llvm", recipe=recipe, calibration=calib)
        rows.append([label, lambda cm=cm: cm(*inputs)])
    outs = [torch.from_numpy(r[1]()[0]) if i < 2 else r[1]() for i, r in enumerate(rows)]
    rows = [(label, ms, out) for (label, _), ms, out in zip(rows, timeit([r[1] for r in rows], iters), outs)]
    ort8 = rows[1][1]
    print(f"\n{name}")
    print("| runtime | ms | vs ORT int8 | " + ("cos to torch fp32 |" if cos_of else "max rel err vs torch |"))
    print("|---|---|---|---|")
    for label, ms, out in rows:
        if cos_of:
            acc = torch.nn.functional.cosine_similarity(out.float(), ref.float()).min().item()
        else:
            acc = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
        print(f"| {label} | {ms:.2f} | {ms / ort8:.2f} | {acc:.5f} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    sents = (EVALUATION * 8)[:a.batch]
    model, inputs = make_minilm(sents, pad_to=a.seq)
    from presso.models.minilm import Tokenizer
    tok = Tokenizer()
    calib = [tok(CALIBRATION[i:i + 8], pad_to=a.seq) for i in range(0, 32, 8)]
    recipes = [("presso llvm fp32", None), ("presso llvm int8 weights (W8A16)", "quantize{weights=int8}"),
               ("presso llvm int8 W8A8", "quantize{weights=int8,activations=int8}"),
               ("presso llvm int8 W8A7 (AVX2 u8 x s8 kernel)", "quantize{weights=int8,activations=int7}"),
               ("presso llvm int8 W8A7 + Hadamard rotation", "quantize{weights=int8,activations=int7,rotate=hadamard}")]
    bench(f"all-MiniLM-L6-v2, batch {a.batch} x seq {a.seq}", model, inputs, recipes, calib, a.iters, cos_of=True)
    cfg = LlamaConfig(vocab=512, dim=256, layers=4, heads=8, kv_heads=4, hidden=688, max_seq=a.seq)
    model, inputs = make_llama(batch=1, seq=a.seq, config=cfg)
    bench(f"Llama-style dim 256 x 4 layers, batch 1 x seq {a.seq} (prefill)", model, inputs, recipes, None, a.iters)


if __name__ == "__main__":
    main()
