"""Greedy decode of the real SmolLM2-135M on this CPU: presso ``target="llvm"`` (TVM; the decode
program's caches updated in place) against Hugging Face ``generate`` in torch eager and under
``torch.compile`` (inductor) over one ``StaticCache`` reset per call, as HF documents it (a cache
of another length per call would recompile every time), all in one run.

Rows: tokens per second of the decode steps alone (the time of ``generate`` with 1 + N new tokens
minus that of 1 new token, so the prefill cancels), each after warm-up calls (compilation is not
timed). Every presso row first checks that its tokens equal the reference target's for the same
compiled recipe; the torch rows run the uncompressed model.

    python benchmarks/decode_cpu.py [--new 32] [--prompt 64] [--layers 30] [--recipes "r1|r2"]
"""
import argparse
import os
import statistics
import sys
import time

import torch

import presso
from presso.eval import calibration_text, evaluation_text
from presso.models.smollm2 import load_smollm2

DEFAULT_RECIPES = "kv_cache{rank_ratio=0.5,loss=attention,key_share=0.33},quantize{weights=int8}|quantize{weights=int8}|none"


def decode_seconds(generate, new: int, rounds: int) -> float:
    """Median seconds of ``new`` decode steps: generate(1 + new) - generate(1), per round."""
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        generate(1)
        t1 = time.perf_counter()
        generate(1 + new)
        t2 = time.perf_counter()
        ts.append((t2 - t1) - (t1 - t0))
    return statistics.median(ts)


def hf_runner(model, ids, max_len: int = 0):
    """HF ``generate``; with ``max_len``, over one ``StaticCache`` of that length, reset per call
    (HF's recipe for torch.compile: the cache's shape never changes, so nothing recompiles)."""
    cache = None
    if max_len:
        from transformers import StaticCache
        cache = StaticCache(config=model.config, max_cache_len=max_len)

    def run(n):
        kw = {}
        if cache is not None:
            cache.reset()
            kw["past_key_values"] = cache
        return model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0, **kw)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--recipes", default=DEFAULT_RECIPES, help="'|'-separated; 'none' = uncompressed")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_smollm2(args.layers)
    ids = tok(evaluation_text(), return_tensors="pt").input_ids[:, :args.prompt]
    cal = tok(calibration_text(), return_tensors="pt").input_ids[0][:8 * 128].reshape(8, 128)
    max_len = args.prompt + args.new + 8
    print(f"SmolLM2-135M ({model.config.num_hidden_layers} layers), prompt {ids.shape[1]}, {args.new} new tokens, "
          f"{torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    with torch.no_grad():
        eager = hf_runner(model, ids)
        want = eager(args.new)
        s = decode_seconds(eager, args.new, args.rounds)
        rows.append(("torch eager (HF generate, dynamic cache)", args.new / s, "-"))
        print(rows[-1], flush=True)
        if not args.no_compile:
            cmodel, _ = load_smollm2(args.layers)
            cmodel.forward = torch.compile(cmodel.forward, fullgraph=True)
            comp = hf_runner(cmodel, ids, max_len)
            t0 = time.perf_counter()
            comp(args.new)
            comp(1)
            warm = time.perf_counter() - t0
            same = torch.equal(comp(args.new), want)
            s = decode_seconds(comp, args.new, args.rounds)
            rows.append((f"torch.compile inductor (HF static cache; warm-up {warm:.0f} s)", args.new / s,
                         "tokens = eager" if same else "tokens differ from eager"))
            print(rows[-1], flush=True)
    for recipe in args.recipes.split("|"):
        recipe = None if recipe.strip() == "none" else recipe.strip()
        kw = dict(example_inputs={"input_ids": ids, "use_cache": False}, generation=True, max_len=max_len,
                  recipe=recipe, calibration=[(c[None],) for c in cal] if recipe else None, verbose=False)
        ref = presso.compile(model, target="reference", **kw)
        t0 = time.perf_counter()
        cm = presso.compile(model, target="llvm", **kw)
        run = lambda n: cm.generate(ids, n)  # noqa: E731
        got = run(args.new)
        built = time.perf_counter() - t0
        agree = torch.equal(got, ref.generate(ids, args.new))
        s = decode_seconds(run, args.new, args.rounds)
        kvb = cm.kv_cache_bytes_per_token
        rows.append((f"presso llvm {recipe or 'uncompressed'} (compile+build {built:.0f} s, KV {kvb} B/token)",
                     args.new / s, "tokens = reference target" if agree else "TOKENS DIFFER from the reference target"))
        print(rows[-1], flush=True)
    base = next((r[1] for r in rows if r[0].startswith("torch.compile")), rows[0][1])
    print("\n| runtime | tokens/s | x torch.compile | check |\n|---|---|---|---|")
    for name, tps, check in rows:
        print(f"| {name} | {tps:.1f} | {tps / base:.2f} | {check} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
