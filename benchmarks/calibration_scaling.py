"""How sequential calibration's cost grows with depth: compile time and peak RSS of
``quantize{weights=int4,group_size=128,method=gptq}`` on random-weight Llama decoders of the
Llama-3.2-1B width (hidden 2048, MLP 8192, 32 / 8 heads) with 1, 2, 4, ... layers. Each depth runs
in a fresh process, so its peak RSS is its own.

    python benchmarks/calibration_scaling.py --layers 1,2,4 --calib 4 --seq 128
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(__file__), "..")


def one(layers: int, calib: int, seq: int, recipe: str) -> dict:
    sys.path.insert(0, ROOT)
    import torch
    import presso
    from presso.models.llama import LlamaConfig, make_llama
    cfg = LlamaConfig(vocab=2048, dim=2048, layers=layers, heads=32, kv_heads=8, hidden=8192, max_seq=seq)
    model, inputs = make_llama(batch=1, seq=seq, config=cfg)
    base = presso.compile(model, example_inputs=inputs)
    torch.manual_seed(0)
    samples = [(torch.randint(0, cfg.vocab, (1, seq)),) for _ in range(calib)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    presso.compile(base.graph, example_inputs=inputs, recipe=recipe, calibration=samples)
    return {"layers": layers, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "rss_before_gb": rss0 / 1e6}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="1,2,4")
    ap.add_argument("--calib", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--recipe", default="quantize{weights=int4,group_size=128,method=gptq}")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.one, a.calib, a.seq, a.recipe)))
        return
    print(f"# {a.recipe}, {a.calib} calibration samples of {a.seq} tokens, Llama-1B width, random weights")
    print("| layers | compile s | CPU s | s / layer | peak RSS GB | RSS before compile GB |")
    print("|---|---|---|---|---|---|")
    for n in map(int, a.layers.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--calib", str(a.calib), "--seq", str(a.seq),
                              "--recipe", a.recipe], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {n} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['seconds'] / n:.1f} | {r['peak_rss_gb']:.2f} | "
              f"{r['rss_before_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
