"""target="cuda" on the GPU: every zoo model (and compressed Llama) against the reference runtime.

    python benchmarks/zoo_cuda.py
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import presso
from presso.models import ZOO, make_llama, minilm_available


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max()).item()


def main():
    print("| model | recipe | kernels | max rel err vs reference |")
    print("|---|---|---|---|")
    cases = [(name, None) for name in sorted(ZOO) if name != "minilm" or minilm_available()]
    cases += [("llama", r) for r in ("quantize{weights=int4,group_size=16}", "quantize{weights=int8}",
                                     "sparsify{pattern=2:4}", "sparsify{pattern=4:8}")]
    for name, recipe in cases:
        m, ex = ZOO[name]() if recipe is None else make_llama()
        ref = presso.compile(m, example_inputs=ex, recipe=recipe)(*ex)
        cm = presso.compile(m, example_inputs=ex, recipe=recipe, target="cuda")
        err = rel(cm(*ex), ref)
        ks = sorted({k for k in cm._runtime.program.kernels.values() if k != "torch"})
        print(f"| {name} | {recipe or '-'} | {', '.join(ks)} | {err:.2e} |", flush=True)
        assert err < 1e-4, (name, recipe, err)
    # plain calls: from the third call at one shape the runtime replays a CUDA graph; every call
    # still equals the reference on its own inputs, and returned outputs stay the caller's
    import time
    print("\n| model | recipe | plain call ms, launched per node | auto CUDA graph ms | speedup |")
    print("|---|---|---|---|---|")
    for name, recipe in [(n, None) for n in sorted(ZOO) if n != "minilm" or minilm_available()] + \
            [("llama", "quantize{weights=int4,group_size=16}")]:
        m, ex = ZOO[name]() if recipe is None else make_llama()
        ref = presso.compile(m, example_inputs=ex, recipe=recipe)
        cm = presso.compile(m, example_inputs=ex, recipe=recipe, target="cuda")
        rt = cm._runtime
        calls = [tuple(torch.randn_like(t) if t.is_floating_point() else t[..., torch.randperm(t.shape[-1])]
                       for t in ex) for _ in range(5)]
        outs = [cm(*c) for c in calls]
        assert rt._auto, f"{name}: no CUDA graph captured after {len(calls)} calls at one shape"
        for c, o in zip(calls, outs):
            assert rel(o, ref(*c)) < 1e-4, (name, "auto graph", rel(o, ref(*c)))

        def per_call(n=20):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                cm(*ex)
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / n * 1e3
        t_graph = per_call()
        rt.auto_graph = False
        t_plain = per_call()
        print(f"| {name} | {recipe or '-'} | {t_plain:.3f} | {t_graph:.3f} | {t_plain / t_graph:.1f}x |", flush=True)
    # generation with the decode step captured as a CUDA graph gives the reference's tokens
    m, ex = make_llama()
    ids = torch.randint(0, 256, (2, 5))
    kw = dict(example_inputs=(ids,), recipe="quantize{weights=int4,group_size=16}", generation=True, max_len=32)
    got = presso.compile(m, target="cuda", **kw).generate(ids, 12)
    want = presso.compile(m, **kw).generate(ids, 12)
    print("generation (CUDA graph) matches the reference:", torch.equal(got, want))
    assert torch.equal(got, want)
    # GPT-2 with Palu latent caches: the decode step's attention (query absorption and value
    # up-projection included) runs in the latent-attention kernels, tokens as the reference's
    from presso.models import make_gpt2
    g2, gin = make_gpt2(batch=2)
    kw = dict(example_inputs=gin, generation=True, max_len=48, recipe="kv_cache{rank_ratio=0.5}",
              calibration=[(torch.randint(0, 256, (2, 16)),) for _ in range(4)])
    cm = presso.compile(g2, target="cuda", **kw)
    got, want = cm.generate(gin[0][:, :8], 24), presso.compile(g2, **kw).generate(gin[0][:, :8], 24)
    ks = sorted(set(cm.decode_program().step_rt.program.kernels.values()) - {"torch"})
    print(f"GPT-2 kv_cache 0.5 generation (CUDA graph; {', '.join(ks)}) matches the reference:", torch.equal(got, want))
    assert torch.equal(got, want) and "triton:latent_attention+absorb+up_v" in ks
    # AOT: a cuda artifact loaded in a fresh process (which never imports the model's code) gives
    # the same outputs, bit for bit
    for name, recipe in (("cnn", None), ("llama", "quantize{weights=int4,group_size=16}"),
                         ("llama", "sparsify{pattern=2:4}")):
        m, ex = ZOO[name]() if recipe is None else make_llama()
        cm = presso.compile(m, example_inputs=ex, recipe=recipe, target="cuda")
        with tempfile.TemporaryDirectory() as d:
            art = cm.save(Path(d) / "model.presso")
            save_file({f"i{k}": t for k, t in enumerate(ex)}, str(Path(d) / "in.safetensors"))
            code = ("import sys, presso; from safetensors.torch import load_file, save_file; "
                    "ins = load_file(sys.argv[2]); m = presso.load(sys.argv[1]); "
                    "out = m(*[ins[f'i{k}'] for k in range(len(ins))]); "
                    "save_file({'out': out.cpu().contiguous()}, sys.argv[3]); "
                    "assert 'presso.models' not in sys.modules")
            subprocess.run([sys.executable, "-c", code, str(art), str(Path(d) / "in.safetensors"),
                            str(Path(d) / "out.safetensors")], check=True)
            same = torch.equal(load_file(str(Path(d) / "out.safetensors"))["out"], cm(*ex).cpu())
        print(f"cuda artifact of {name} {recipe or ''} loads in a fresh process, identical outputs: {same}")
        assert same


if __name__ == "__main__":
    main()
