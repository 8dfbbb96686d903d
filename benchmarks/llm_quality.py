"""Perplexity of compressed SmolLM2-135M-Instruct (the real pretrained Llama-architecture model of
``presso.models.smollm2``) on real held-out text, next to naive plain-torch baselines from the
same run, with each recipe's compile time (calibration included).

Evaluation text: ``presso.eval.evaluation_text()`` (Python standard-library prose); calibration:
``presso.eval.calibration_text()`` (other modules: disjoint). The model is compiled with a symbolic
batch so that calibration windows run 8 at a time.

    python benchmarks/llm_quality.py                       # every recipe below
    python benchmarks/llm_quality.py --recipes int4-g128-awq+gptq,int4-g64-gptq --layers 30
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import presso  # noqa: E402
from presso.eval import calibration_text, evaluation_text, perplexity  # noqa: E402
from presso.models.smollm2 import load_smollm2  # noqa: E402

RECIPES = {
    "int8": "quantize{weights=int8}",
    "int4-g32-asym-rtn": "quantize{weights=int4,group_size=32,symmetric=false}",
    "int4-g128-rtn": "quantize{weights=int4,group_size=128}",
    "int4-g128-gptq": "quantize{weights=int4,group_size=128,method=gptq,act_order=true}",
    "int4-g128-awq": "quantize{weights=int4,group_size=128,method=awq}",
    "int4-g128-awq+gptq": "quantize{weights=int4,group_size=128,method=awq+gptq,act_order=true}",
    "int4-g64-rtn": "quantize{weights=int4,group_size=64}",
    "int4-g64-gptq": "quantize{weights=int4,group_size=64,method=gptq,act_order=true}",
    "int4-g64-awq+gptq": "quantize{weights=int4,group_size=64,method=awq+gptq,act_order=true}",
    "int4-g64-awq+gptq-emb8": "quantize{weights=int4,group_size=64,method=awq+gptq,act_order=true,embeddings=int8}",
    "int4-g64-awq+gptq-emb4": "quantize{weights=int4,group_size=64,method=awq+gptq,act_order=true,embeddings=int4}",
    "int4-pc-gptq": "quantize{weights=int4,method=gptq,act_order=true}",
    "int4-g128-asym-gptq": "quantize{weights=int4,group_size=128,symmetric=false,method=gptq,act_order=true}",
    "int4-g64-asym-gptq": "quantize{weights=int4,group_size=64,symmetric=false,method=gptq,act_order=true}",
    "2:4-magnitude": "sparsify{pattern=2:4,method=magnitude}",
    "2:4-wanda": "sparsify{pattern=2:4,method=wanda}",
    "2:4-sparsegpt": "sparsify{pattern=2:4,method=sparsegpt}",
    "lowrank-svd-0.8": "lowrank{method=svd,ratio=0.8}",
    "lowrank-whitened-0.8": "lowrank{method=whitened,ratio=0.8}",
    "lowrank-whitened-0.8-oneshot": "lowrank{method=whitened,ratio=0.8,sequential=false}",
    "lowrank-whitened-0.8-noupdate": "lowrank{method=whitened,ratio=0.8,update=false}",
    "lowrank-whitened-0.8-uniform": "lowrank{method=whitened,ratio=0.8,allocation=uniform}",
    "lowrank-whitened-0.8-bytype": "lowrank{method=whitened,ratio=0.8,allocation=by-type}",
    "lowrank-whitened-0.8-damp0.01": "lowrank{method=whitened,ratio=0.8,damp=0.01}",
    "lowrank-whitened-0.8-fisher": "lowrank{method=whitened,ratio=0.8,allocation=fisher}",
    "lowrank-whitened-0.8-fisher-weighted": "lowrank{method=whitened,ratio=0.8,allocation=fisher,fisher_weighted=true}",
    "lowrank-whitened-0.8-fisher-refit-up": "lowrank{method=whitened,ratio=0.8,allocation=fisher,update=true,refit=up}",
    "kv-0.5": "kv_cache{rank_ratio=0.5,grouping=group-head,group_size=4}",
    "kv-0.5-attn": "kv_cache{rank_ratio=0.5,loss=attention,key_share=0.33}",
    "kv-0.5-attn-int4": "kv_cache{rank_ratio=0.5,loss=attention,key_share=0.33,latent_bits=4}",
    "kvq-int8": "kv_quant{bits=8,group_size=32}",
    "kvq-int4": "kv_quant{bits=4,group_size=32}",
}


def naive_kv_svd(model, ratio: float):
    """Plain torch: truncated (unwhitened) SVD of every k_proj / v_proj weight at ``ratio`` of its rank."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith(("k_proj", "v_proj")):
                U, S, Vh = torch.linalg.svd(mod.weight.double(), full_matrices=False)
                r = round(ratio * len(S))
                mod.weight.copy_((U[:, :r] * S[:r]) @ Vh[:r])
    return model


def naive_kv_quant(model, bits: int, group: int):
    """Plain torch: every k_proj / v_proj output (what a KV cache stores, keys before RoPE) rounded
    per token and group of ``group`` values, symmetric, f16 scales."""
    qmax = 2 ** (bits - 1) - 1

    def hook(mod, inp, out):
        g = out.reshape(*out.shape[:-1], -1, group)
        s = (g.abs().amax(-1, keepdim=True) / (qmax + 0.5)).clamp_min(1e-8).half().float()
        return (torch.clamp(torch.round(g / s), -qmax - 1, qmax) * s).reshape(out.shape)
    for name, mod in model.named_modules():
        if name.endswith(("k_proj", "v_proj")):
            mod.register_forward_hook(hook)
    return model


def kv_bytes(cm, fp16_bytes: float) -> str:
    """KV-cache bytes per token of the decode program's real buffers (batch 1), and % of f16."""
    kv = cm.report().get("kv_cache")
    if not kv:
        return ""
    b = kv["kv_cache_bytes_per_token"]
    return f"{b:,.0f} ({100 * b / fp16_bytes:.1f}% of f16)"


def naive_rtn(model, bits: int, group: int):
    """Plain torch: symmetric round-to-nearest of every decoder linear, group by group."""
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
                w = mod.weight
                cols = w.shape[1]
                g = group or cols
                pad = (-cols) % g
                wp = torch.nn.functional.pad(w, (0, pad)).reshape(w.shape[0], -1, g)
                scale = (wp.abs().amax(-1, keepdim=True) / (qmax + 0.5)).clamp_min(1e-8).half().float()
                q = torch.clamp(torch.round(wp / scale), -qmax - 1, qmax) * scale
                mod.weight.copy_(q.reshape(w.shape[0], -1)[:, :cols])
    return model


def row(recipe: str, ratio: float, ppl: float, wall: float, cpu: float, cm, kv_bytes: str, note: str) -> None:
    mb = cm.report()["totals"]["bytes"] / 1e6
    print(f"| `{recipe}` | {ppl:.2f} | {ratio:.3f} | {wall:.0f} | {cpu:.0f} | {mb:.1f} | {kv_bytes} | {note} |",
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows of --window tokens")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--calib", type=int, default=32, help="calibration windows")
    ap.add_argument("--tokens", help="safetensors with 'eval' and 'calib' token ids (from --save-tokens): the same "
                    "text on another Python version, whose docstrings differ")
    ap.add_argument("--save-tokens", dest="save_tokens", help="write the tokenized texts here and stop")
    ap.add_argument("--then", default="", help="recipes applied after each recipe to its compiled graph, each its "
                    "own row (e.g. the embedding alone: 'quantize{embeddings=int8,group_size=64,skip=layers}'), "
                    "separated by '|'")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_smollm2(args.layers)
    if args.tokens:
        from safetensors.torch import load_file
        t = load_file(args.tokens)
        ev, cal = t["eval"], t["calib"]
    else:
        ev = tok(evaluation_text(), return_tensors="pt").input_ids[0]
        cal = tok(calibration_text(), return_tensors="pt").input_ids[0]
    if args.save_tokens:
        from safetensors.torch import save_file
        save_file({"eval": ev.contiguous(), "calib": cal.contiguous()}, args.save_tokens)
        return
    ev, cal = ev[: args.windows * args.window], cal[: args.calib * args.window]
    calib = [(c,) for c in cal.reshape(-1, args.window).split(8)]
    example = {"input_ids": cal[: 2 * args.window].reshape(2, -1), "use_cache": False}
    dyn = {"input_ids": {0: torch.export.Dim("batch", min=1, max=64)}, "use_cache": None}
    fp = perplexity(model, ev, args.window, batch_size=8)
    print(f"# SmolLM2-135M ({model.config.num_hidden_layers} layers), {fp.tokens} eval tokens, "
          f"{len(cal)} calibration tokens; torch fp32 perplexity {fp.perplexity:.3f}", flush=True)
    t0 = time.perf_counter()
    base = presso.compile(model, example_inputs=example, dynamic_shapes=dyn)
    pfp = perplexity(base, ev, args.window, batch_size=8)
    print(f"# presso uncompressed: perplexity {pfp.perplexity:.3f} (compile {time.perf_counter() - t0:.1f} s)")
    cfg = model.config
    fp16_kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    gen_base = None
    print("| recipe | ppl | x fp | compile s | CPU s | MB | KV bytes/token | naive baseline (same run) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.recipes.split(";" if "{" in args.recipes else ","):
        recipe = RECIPES.get(name, name)
        kv = recipe.startswith("kv_")
        if kv and gen_base is None:   # symbolic sequence: the decode program's cache buffers can be built
            gen_base = presso.compile(model, example_inputs=(example["input_ids"],), generation=True,
                                      max_len=args.window)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            cm = presso.compile((gen_base if kv else base).graph, example_inputs=(example["input_ids"],),
                                recipe=recipe, calibration=calib)
            if kv:
                cm.graph.meta.setdefault("max_len", args.window)
        except presso.PressoError as e:
            print(f"| `{recipe}` | refused: {str(e).splitlines()[0][:90]} | | | | | |", flush=True)
            continue
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        p = perplexity(cm, ev, args.window, batch_size=8)
        naive = ""
        if name.startswith("int4-") and "-pc-" not in name:
            group = int(name.split("-g")[1].split("-")[0])
            nb = perplexity(naive_rtn(load_smollm2(args.layers)[0], 4, group), ev, args.window, batch_size=8)
            naive = f"torch symmetric RTN g{group}: {nb.perplexity:.2f} ({nb.perplexity / fp.perplexity:.2f}x)"
        if recipe.startswith("kv_cache"):
            ratio = float(recipe.split("rank_ratio=")[1].split(",")[0].rstrip("}"))
            nb = perplexity(naive_kv_svd(load_smollm2(args.layers)[0], ratio), ev, args.window, batch_size=8)
            naive = f"torch plain SVD of K/V at {ratio}: {nb.perplexity:.2f} ({nb.perplexity / fp.perplexity:.2f}x)"
        if "bits=" in recipe:
            bits = int(recipe.split("bits=")[1][0])
            nb = perplexity(naive_kv_quant(load_smollm2(args.layers)[0], bits, 32), ev, args.window, batch_size=8)
            naive += ("; " if naive else "") + (f"torch int{bits} K/V per token g32: {nb.perplexity:.2f} "
                                                 f"({nb.perplexity / fp.perplexity:.2f}x)")
        kvb = kv_bytes(cm, fp16_kv) if kv else ""
        row(recipe, p.perplexity / pfp.perplexity, p.perplexity, wall, cpu, cm, kvb, naive)
        for then in filter(None, args.then.split("|")):
            t0, c0 = time.perf_counter(), time.process_time()
            cm2 = presso.compile(cm.graph, example_inputs=(example["input_ids"],), recipe=then)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            p2 = perplexity(cm2, ev, args.window, batch_size=8)
            row(f"{recipe} -> {then}", p2.perplexity / pfp.perplexity, p2.perplexity, wall, cpu, cm2,
                kv_bytes(cm2, fp16_kv) if kv else "", f"{p2.perplexity / p.perplexity:.4f}x the row above")
    print(f"# peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
