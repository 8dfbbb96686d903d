"""Llama-style decode step, 1B config (Llama-3.2-1B shapes, random weights), batch 1 (or --batch), fp16:
presso ``target="cuda"`` (int4 g128 weights; generated kernels; CUDA graph) vs the same model in
torch eager fp16 and under ``torch.compile`` run as gpt-fast runs it: the KV caches are module
buffers updated in place (index_copy_ at the position), ``mode="reduce-overhead"``,
``fullgraph=True``, so the step is replayed as a CUDA graph. (Caches passed as function inputs
that the step mutates make reduce-overhead skip CUDA graphs: a host-bound peer no user runs.)
``--torchao``: also torchao's int4 g128 weight-only config (tinygemm, bf16) under that compile.

The torch baselines run the *dequantized* int4 weights in fp16 (what a user without presso runs:
dense fp16), with the same static KV cache (index_copy at the position, masked SDPA over the
cache), so the logits of every side are compared before timing. Each row has its physical limit:
the bytes a step must read (the linears' weights as that runtime stores them, one embedding row,
the KV cache up to the position) over the copy bandwidth measured in the same run.

    python benchmarks/decode_gpu.py [--layers 16] [--max-len 1024] [--pos 512] [--batch 1] [--recipe ...] [--profile]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import presso  # noqa: E402
from presso.models import LlamaConfig, make_llama
from presso.passes.quantize import dequant, rtn
from presso.runtime.reference import ReferenceRuntime


def eager_step_fn(model, cfg):
    """A cached single-token forward over the module's own weights (gpt-fast style)."""
    hd, nq, nkv = cfg.head_dim, cfg.heads, cfg.kv_heads

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    def step(ids, pos, kcs, vcs):
        B = ids.shape[0]
        x = model.embed_tokens(ids)
        cos = model.cos_cached.index_select(0, pos).to(x.dtype)
        sin = model.sin_cached.index_select(0, pos).to(x.dtype)
        mask = torch.arange(kcs[0].shape[2], device=ids.device)[None, :] <= pos[:, None]
        for layer, kc, vc in zip(model.layers, kcs, vcs):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(B, 1, nq, hd).transpose(1, 2)
            k = a.k_proj(h).view(B, 1, nkv, hd).transpose(1, 2)
            v = a.v_proj(h).view(B, 1, nkv, hd).transpose(1, 2)
            q = q * cos + rot(q) * sin
            k = k * cos + rot(k) * sin
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, 1, nq * hd))
            m = layer.mlp
            hh = layer.post_attention_layernorm(x)
            x = x + m.down_proj(F.silu(m.gate_proj(hh)) * m.up_proj(hh))
        return model.lm_head(model.norm(x))
    return step


class StaticStep(torch.nn.Module):
    """The gpt-fast decode step over the model's own modules: KV caches are buffers of this
    module, written in place at the position, so ``torch.compile(mode="reduce-overhead")`` treats
    them as static and captures the step as a CUDA graph."""

    def __init__(self, model, cfg, kcs, vcs):
        super().__init__()
        self.model, self.cfg = model, cfg
        for i, (kc, vc) in enumerate(zip(kcs, vcs)):
            self.register_buffer(f"k{i}", kc.clone())
            self.register_buffer(f"v{i}", vc.clone())
        self.step = eager_step_fn(model, cfg)

    def forward(self, ids, pos):
        n = self.cfg.layers
        return self.step(ids, pos, [getattr(self, f"k{i}") for i in range(n)],
                         [getattr(self, f"v{i}") for i in range(n)])


def step_bytes(model, cfg, B, pos, linear_bytes) -> float:
    """Bytes a step must read at least: every linear's weights (``linear_bytes(module)``), one
    embedding row per sequence, keys and values up to the position."""
    lin = sum(linear_bytes(m) for m in model.modules() if isinstance(m, torch.nn.Linear))
    emb = B * cfg.dim * 2
    kv = cfg.layers * 2 * B * cfg.kv_heads * (pos + 1) * cfg.head_dim * 2
    return lin + emb + kv


def copy_tbps() -> float:
    from gpu_timing import kernel_us
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / kernel_us(lambda: dst.copy_(src), calls=10) / 1e6


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, iters=50):
    for _ in range(5):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def profile_step(fn, step_ms, calls=20):
    """Device time per step by kernel (CUPTI) against the step's wall time: the rest is the gaps
    between dependent launches inside the graph."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    launches, by_name = len(kernels), {}
    for e in kernels:
        by_name[e.name[:60]] = by_name.get(e.name[:60], 0.0) + e.device_time / calls / 1e3
    total = sum(by_name.values())
    print(f"\nprofile: {launches / calls:.0f} kernels / step, kernel time {total:.3f} ms of {step_ms:.3f} ms "
          f"({step_ms - total:.3f} ms between kernels)")
    for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {ms:.3f} ms  {name}")
    step = kernels[-launches // calls:]
    print("one step's first kernels in launch order (us):", ", ".join(f"{e.name[:18]} {e.device_time:.1f}"
                                                               for e in step[:24]))


def torch_ops_in_step(fn):
    """The torch ops a plain step runs besides presso's kernels (copies, fills, casts), each with
    the presso line that asked for it: what the graph replays as extra kernels."""
    import collections
    import traceback
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if not any(v in name for v in ("view", "empty", "_unsafe", "as_strided", "detach", "alias", "select",
                                           "slice", "split", "transpose", "unsqueeze", "squeeze", "expand",
                                           "permute", "t.default", "_reshape_alias", "lift_fresh")):
                frames = [f for f in traceback.extract_stack() if "/presso/" in f.filename]
                where = f"{frames[-1].filename.split('/presso/')[-1]}:{frames[-1].lineno}" if frames else "?"
                shapes = [tuple(x.shape) for x in args if isinstance(x, torch.Tensor)][:2]
                self.seen[(name, where, str(shapes))] += 1
            return func(*args, **(kwargs or {}))

    with Log() as log:
        fn()
    sync()
    print("\ntorch ops in one plain step (count, op, where, first shapes):")
    for (name, where, shapes), n in log.seen.most_common(15):
        print(f"  {n:4d}  {name}  {where}  {shapes}")


def generate_rows(cm, cfg, row, new_tokens=256):
    """What a user of ``cm.generate`` gets per new token, end to end (greedy pick, position, graph
    replay, the loop's host work): the time of a call making 2 + new_tokens tokens minus one
    making 2 (both after a warm-up call), over new_tokens. Printed as a ms / step row."""
    prompt = torch.randint(0, cfg.vocab, (1, 8))

    def gen_ms(n):
        sync()
        t = time.perf_counter()
        cm.generate(prompt, n)
        sync()
        return (time.perf_counter() - t) * 1e3
    gen_ms(2 + new_tokens)                     # warm-up: the step graph is captured here
    short = min(gen_ms(2) for _ in range(3))
    long = min(gen_ms(2 + new_tokens) for _ in range(3))
    row(f"presso generate(), per new token (greedy, end to end; prefill + first step {short:.1f} ms)",
        (long - short) / new_tokens)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--pos", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (one position)")
    ap.add_argument("--recipe", default="quantize{weights=int4,group_size=128}")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--torchao", action="store_true", help="also torchao int4 g128 (tinygemm, bf16) + the same compile")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--profile", action="store_true", help="the captured step's kernel time by kernel, and the gaps")
    a = ap.parse_args()
    dev = "cpu" if a.smoke else "cuda"
    base = LlamaConfig(vocab=256, dim=64, layers=2, heads=4, kv_heads=2, hidden=160) if a.smoke else LlamaConfig.llama_1b()
    cfg = LlamaConfig(**{**base.__dict__, "layers": a.layers, "max_seq": 2 * a.max_len})
    t0 = time.time()
    model, _ = make_llama(batch=2, seq=8, config=cfg)
    model = model.float() if a.smoke else model.half()
    ex = (torch.randint(0, cfg.vocab, (2, 8)),)
    cm = presso.compile(model, example_inputs=ex, recipe=a.recipe, calibration=[ex], generation=True, max_len=a.max_len,
                        target="cuda")
    gen = cm.decode_program()
    step_rt = gen.step_rt
    print(f"compiled in {time.time() - t0:.0f}s; step graph {len(gen.step.nodes)} nodes; kernels: "
          f"{sorted(set(step_rt.program.kernels.values()))}", flush=True)
    # the torch side runs the same (dequantized) weights in dense fp16; other compressions (N:M,
    # low-rank KV) change what the model computes, so only presso's reference runtime checks them
    weight_only = all(p.startswith("quantize{weights=int") for p in a.recipe.replace("},", "}\n").splitlines())
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and "int4" in a.recipe:
                g = int(a.recipe.split("group_size=")[1].split("}")[0].split(",")[0])
                codes, s, z = rtn(mod.weight.float(), 4, g, True)
                mod.weight.copy_(dequant(codes, s.half().double(), None, g).to(mod.weight.dtype))
    model = model.to(dev)
    B = a.batch
    ids = torch.randint(0, cfg.vocab, (B, 1), device=dev)
    pos = torch.tensor([a.pos], device=dev)
    caches = gen.new_caches({"batch": B})
    # the step's inputs before its caches: ids, position (and each row's start, for ragged batches)
    head_in = [ids, pos] + [torch.zeros(B, dtype=torch.long, device=dev)] * (len(gen.step.inputs) - 2 - len(caches))
    torch.manual_seed(1)
    for c in caches:
        c.normal_()
    if weight_only:     # the same cache contents on both sides
        kcs = [c.clone() for s, c in zip(gen.specs, caches) if s.which == "k"]
        vcs = [c.clone() for s, c in zip(gen.specs, caches) if s.which == "v"]
    else:               # presso's caches hold latents; eager keeps full keys and values
        shape = (B, cfg.kv_heads, a.max_len, cfg.head_dim)
        kcs = [torch.randn(shape, device=dev, dtype=caches[0].dtype) for _ in range(cfg.layers)]
        vcs = [torch.randn(shape, device=dev, dtype=caches[0].dtype) for _ in range(cfg.layers)]
    step = eager_step_fn(model, cfg)
    with torch.no_grad():
        want = step(ids, pos, [k.clone() for k in kcs], [v.clone() for v in vcs]).float()
        got = step_rt.run(*head_in, *[c.clone() for c in caches])[0].float()
        oracle = ReferenceRuntime(gen.step, device=dev).run(*head_in, *[c.clone() for c in caches])[0].float()
        err = ((got - oracle).abs().max() / oracle.abs().max()).item()
        print(f"presso cuda vs presso reference runtime logits: max rel err {err:.2e}", flush=True)
        assert err < 2e-2
        if weight_only:    # same weights on both sides: the eager logits must agree too
            err = ((got - want).abs().max() / want.abs().max()).item()
            print(f"presso vs eager logits: max rel err {err:.2e}", flush=True)
            assert err < 2e-2
        print(f"\ndecode step, {cfg.layers} layers x dim {cfg.dim} (vocab {cfg.vocab}), batch {B}, position {a.pos} "
              f"of {a.max_len}, {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (smoke)'}")
        bw = copy_tbps() if dev == "cuda" else float("nan")
        g = int(a.recipe.split("group_size=")[1].split("}")[0].split(",")[0]) if "int4" in a.recipe else 0
        fp16_ms = step_bytes(model, cfg, B, a.pos, lambda m: m.weight.numel() * 2) / bw / 1e9
        int4_ms = step_bytes(model, cfg, B, a.pos, lambda m: m.weight.numel() // 2 + m.weight.numel() // max(g, 1) * 2
                             ) / bw / 1e9
        print(f"copy bandwidth {bw:.3f} TB/s; physical limit (bytes a step reads / copy bandwidth): fp16 weights "
              f"{fp16_ms:.3f} ms, int4 g{g} weights {int4_ms:.3f} ms (the int4 figure only for weight-only recipes)")
        print("| runtime | ms / step | tokens/s | vs eager | physical limit ms (% reached) |")
        print("|---|---|---|---|---|", flush=True)
        t_eager = timed(lambda: step(ids, pos, kcs, vcs))

        def row(label, ms, limit=None):
            lim = f"{limit:.3f} ({limit / ms:.0%})" if limit else "-"
            print(f"| {label} | {ms:.3f} | {B * 1e3 / ms:.0f} | {t_eager / ms:.2f}x | {lim} |", flush=True)
        presso_limit = int4_ms if weight_only and g else None
        row("torch eager fp16", t_eager, fp16_ms)
        row(f"presso cuda, {a.recipe}, no CUDA graph", timed(lambda: step_rt.run(*head_in, *caches)), presso_limit)
        if dev == "cuda":
            step_rt.capture(*head_in, *caches)
            static = step_rt._graph_exec.static_in
            t_graph = timed(lambda: step_rt.run(*head_in, *static[len(head_in):]))
            row(f"presso cuda, {a.recipe}, CUDA graph", t_graph, presso_limit)
            if a.profile:
                profile_step(lambda: step_rt.run(*head_in, *static[len(head_in):]), t_graph)
                torch_ops_in_step(lambda: step_rt._run_steps([ids, pos, *static[2:]]))
            if B == 1:
                generate_rows(cm, cfg, lambda label, ms: row(label, ms, presso_limit))
        if not a.no_compile:
            peers = [("torch.compile fp16, gpt-fast style (caches as buffers, reduce-overhead, fullgraph)", None)]
            if a.torchao:
                peers.append(("torchao int4 g128 tinygemm (bf16) + the same compile", "torchao"))
            for label, quant in peers:
                try:
                    ms = compiled_peer(model, cfg, kcs, vcs, ids, pos, want, quant, g)
                    row(label, ms, fp16_ms if quant is None else int4_ms)
                except Exception as e:  # noqa: BLE001 - report, keep going
                    print(f"| {label} failed: {type(e).__name__}: {str(e)[:120]} | | | | |", flush=True)


def compiled_peer(model, cfg, kcs, vcs, ids, pos, want, quant, g):
    """ms per step of the gpt-fast style compiled step (``StaticStep``), its logits checked
    against the eager step's first (``want``; 1e-1 for torchao's bf16 tinygemm)."""
    import copy
    m, dtype = model, torch.float16
    if quant == "torchao":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
        m, dtype = copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16
        quantize_(m, Int4WeightOnlyConfig(group_size=g, int4_packing_format="tile_packed_to_4d"))
    st = StaticStep(m, cfg, [k.to(dtype) for k in kcs], [v.to(dtype) for v in vcs])
    cst = torch.compile(st, mode="reduce-overhead", fullgraph=True)
    tc = time.time()
    for _ in range(3):
        got = cst(ids, pos).float().clone()
    print(f"  (compiled in {time.time() - tc:.0f}s)", flush=True)
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"  logits vs eager: max rel err {err:.2e}", flush=True)
    assert err < (1e-1 if quant else 2e-2)      # (torchao: bf16 activations, its own requantization)
    ms = timed(lambda: cst(ids, pos))
    torch._dynamo.reset()
    return ms

if __name__ == "__main__":
    main()
