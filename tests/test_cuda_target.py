"""The ``cuda`` target: whole zoo models through the generated Triton kernels under
``TRITON_INTERPRET=1`` on CPU tensors (a subprocess, so the flag is set before Triton loads),
compared with the reference runtime; and a clear error where neither a GPU nor the interpreter is."""
import os
import subprocess
import sys
import textwrap

import pytest

# What every section runs first: the interpreter flag before Triton loads, and the small Llama.
PRELUDE = textwrap.dedent("""
    import os, torch
    os.environ["TRITON_INTERPRET"] = "1"
    import presso
    from presso.models import ZOO, make_llama
    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
    m, ex = make_llama(batch=1, seq=5)
""")

# The whole-model runs, one fresh interpreter each (each compiles its own models): section -> (code, what
# its output must hold: (text, how many times), or (text, None) for at least once).
SECTIONS = {
    "zoo": (textwrap.dedent("""
    for name in sorted(ZOO):
        m, ex = ZOO[name]()
        cm = presso.compile(m, example_inputs=ex, target="cuda")
        err = rel(cm(*ex), presso.compile(m, example_inputs=ex)(*ex))
        assert err < 1e-5, (name, err)
        print("zoo", name, sorted(set(cm._runtime.program.kernels.values())))
"""), [("zoo ", 6), ("triton:fused_elementwise", None), ("triton:rms_norm", None)]),
    "recipes": (textwrap.dedent("""
    from presso.codegen.triton.int4 import Int4Weight
    for recipe in ["quantize{weights=int4,group_size=16}", "quantize{weights=int4,group_size=32,symmetric=false}",
                   "quantize{weights=int8,symmetric=false}", "sparsify{pattern=2:4}", "sparsify{pattern=4:8}",
                   "sparsify{pattern=2:4},quantize{weights=int4,group_size=16}"]:     # int4 kept values
        cm = presso.compile(m, example_inputs=ex, target="cuda", recipe=recipe)
        rt = cm._runtime
        assert any(k.startswith(("triton:int", "triton:nm")) for k in rt.program.kernels.values())
        if "group_size=32" in recipe:   # repacked once at load; the graph's codes are not kept on the device
            tiled = [w for p in rt._prepared for w in p.values() if isinstance(w, Int4Weight)]
            assert tiled and all(w.q.dtype == torch.int32 for w in tiled)
            assert not any(v.name.endswith(".q") for v in rt._params), [v.name for v in rt._params]
        # residual adds run as the linears' epilogues (2 layers x 2); the gate / up pair is stacked:
        # with int4 in the tiled layout one kernel computes both halves and SwiGLU, else the
        # stacked linear's halves meet in one elementwise kernel
        kernels = list(rt.program.kernels.values())
        assert kernels.count("triton:int4_linear+glu") == (2 if "group_size=32" in recipe else 0), kernels
        assert sum(k.endswith("+epilogue") for k in kernels) == 4, kernels
        err = rel(cm(*ex), presso.compile(m, example_inputs=ex, recipe=recipe)(*ex))
        assert err < 1e-5, (recipe, err)
        print("recipe", recipe)
"""), [("recipe ", 6)]),
    "fp16": (textwrap.dedent("""
    # fp16 2:4 and 4:8 linears (fp16 or int4 kept values) run the select kernel on its layout (5 rows: one block)
    m16 = make_llama(batch=1, seq=5)[0].half()
    for recipe, kernel in [("sparsify{pattern=2:4}", "triton:nm_select_2_4"),
                           ("sparsify{pattern=2:4},quantize{weights=int4,group_size=16}", "triton:nm_select_int4_2_4"),
                           ("sparsify{pattern=4:8}", "triton:nm_select_4_8"),
                           ("sparsify{pattern=4:8},quantize{weights=int4,group_size=16}", "triton:nm_select_int4_4_8")]:
        cm = presso.compile(m16, example_inputs=ex, target="cuda", recipe=recipe)
        assert kernel in cm._runtime.program.kernels.values(), cm._runtime.program.kernels
        err = rel(cm(*ex), presso.compile(m16, example_inputs=ex, recipe=recipe)(*ex))
        assert err < 2e-3, (recipe, "fp16", err)
        print("fp16 recipe", recipe)
"""), [("fp16 recipe ", 4)]),
    "artifact_and_generate": (textwrap.dedent("""
    # a cuda artifact loads (kernels regenerated from the graph, cached by source hash)
    import tempfile
    cm = presso.compile(m, example_inputs=ex, target="cuda", recipe="quantize{weights=int4,group_size=16}")
    with tempfile.TemporaryDirectory() as d:
        loaded = presso.load(cm.save(d + "/m.presso"))
        assert loaded.target == "cuda" and torch.equal(loaded(*ex), cm(*ex))
    print("artifact ok")
    # generation: prefill + decode steps through the kernels give the reference's tokens
    ids = torch.randint(0, 256, (2, 4))
    kw = dict(example_inputs=(ids,), recipe="quantize{weights=int4,group_size=32}", generation=True, max_len=16)
    cm = presso.compile(m, target="cuda", **kw)
    got = cm.generate(ids, 6)
    want = presso.compile(m, **kw).generate(ids, 6)
    assert torch.equal(got, want), (got, want)
    # the step's attention reads only the filled cache slots (GQA decode kernel), no SDPA over the cache
    step_kernels = set(cm.decode_program().step_rt.program.kernels.values())
    assert "triton:gqa_decode_attention" in step_kernels and "torch:sdpa_masked" not in step_kernels, step_kernels
    # (the prefill runs the gate / up pair as its stacked GEMM and SwiGLU's kernel, the steps as one GEMV)
    assert "triton:int4_linear+glu" in step_kernels, step_kernels
    # each layer's q / k RoPE and its two cache writes are one launch
    assert "triton:rotary_cache_write" in step_kernels and not {"triton:rotary", "torch:index_copy_"} & step_kernels, \
        step_kernels
    print("generate ok")
"""), [("artifact ok", None), ("generate ok", None)]),
    "latent_attention": (textwrap.dedent("""
    # GPT-2 (no RoPE) with Palu latent caches: the decode step's attention is the latent-attention
    # kernel over the caches as stored ([B, L, groups * rank]), and generation matches the reference
    from presso.models import make_gpt2
    g2, gin = make_gpt2(batch=2)
    kw = dict(example_inputs=gin, generation=True, max_len=48, recipe="kv_cache{rank_ratio=0.5}",
              calibration=[(torch.randint(0, 256, (2, 16)),) for _ in range(4)])
    cm = presso.compile(g2, target="cuda", **kw)
    step_kernels = cm.decode_program().step_rt.program.kernels
    # the query's absorption (q B_k^T) and the value up-projection run inside its kernels: no torch matmul
    assert list(step_kernels.values()).count("triton:latent_attention+absorb+up_v") == 2, step_kernels
    assert not any(n.op == "matmul" for n in (s.node for s in cm.decode_program().step_rt.program.steps)
                   if not step_kernels[n.name].startswith("triton:")), step_kernels
    assert torch.equal(cm.generate(gin[0][:, :8], 20), presso.compile(g2, **kw).generate(gin[0][:, :8], 20))
    # a latent rank the kernel cannot tile (48: not a power of two) keeps masked SDPA, still exact
    kw["recipe"] = "kv_cache{rank_ratio=0.75}"
    cm = presso.compile(g2, target="cuda", **kw)
    step_kernels = set(cm.decode_program().step_rt.program.kernels.values())
    assert not any(k.startswith("triton:latent") for k in step_kernels) and "torch:sdpa_masked" in step_kernels, \
        step_kernels
    assert torch.equal(cm.generate(gin[0][:, :8], 12), presso.compile(g2, **kw).generate(gin[0][:, :8], 12))
    # Llama (RoPE, GQA: 4 query heads, 2 KV heads of 32 dims) with Palu latent caches: keys are
    # rebuilt and rotated tile by tile inside the kernel (no linear / rotary over the whole cache);
    # one latent group for both KV heads, or one per head
    from presso.models import LlamaConfig
    lm, lex = make_llama(batch=2, seq=8, config=LlamaConfig(dim=128, heads=4, kv_heads=2))
    for gs in (2, 1):
        kw = dict(example_inputs=lex, generation=True, max_len=32, calibration=[lex],
                  recipe=f"kv_cache{{rank_ratio=0.5,group_size={gs}}}")
        cm = presso.compile(lm, target="cuda", **kw)
        kernels = list(cm.decode_program().step_rt.program.kernels.values())
        assert kernels.count("triton:latent_attention+rope+up_v") == 2, kernels
        # keys rotate inside the attention; each layer's q RoPE and both latent cache writes are one launch
        assert kernels.count("triton:rotary_cache_write") == 2, kernels
        assert not {"triton:rotary", "torch:index_copy_"} & set(kernels), kernels
        assert torch.equal(cm.generate(lex[0][:, :5], 12), presso.compile(lm, **kw).generate(lex[0][:, :5], 12))
    print("latent attention ok")
"""), [("latent attention ok", None)]),
}


@pytest.mark.parametrize("section", SECTIONS)
def test_whole_models_run_through_the_kernels_under_the_interpreter(section):
    code, want = SECTIONS[section]
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    for text, times in want:
        assert (r.stdout.count(text) == times) if times else text in r.stdout, (text, r.stdout)


def test_cuda_without_a_gpu_says_how_to_test_on_a_cpu():
    script = textwrap.dedent("""
        import torch, presso
        from presso.errors import TargetUnavailableError
        from presso.models import make_mlp
        m, ex = make_mlp()
        try:
            presso.compile(m, example_inputs=ex, target="cuda")
        except TargetUnavailableError as e:
            print("ERR", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERR target='cuda' needs an NVIDIA GPU" in r.stdout and "TRITON_INTERPRET=1" in r.stdout


RAGGED = textwrap.dedent("""
    import torch, presso
    from presso.models import LlamaConfig, make_gpt2, make_llama
    torch.manual_seed(0)
    # prompts of 3, 7, 12 and 20 tokens in one left-padded batch: each row's decode attention skips its
    # pads inside the kernel (GQA caches, Palu latents absorbed, Palu latents with RoPE keys rebuilt)
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 7, 12, 20)]
    m, ex = make_llama(batch=2, seq=8, config=LlamaConfig(dim=128, heads=4, kv_heads=2))
    g2, gex = make_gpt2(batch=2)
    calib = [(torch.randint(0, 256, (2, 16)),) for _ in range(2)]
    for name, model, ins, recipe, kernel in [
            ("gqa", m, ex, None, "triton:gqa_decode_attention"),
            ("latent", g2, gex, "kv_cache{rank_ratio=0.5}", "triton:latent_attention+absorb+up_v"),
            ("latent rope", m, ex, "kv_cache{rank_ratio=0.5}", "triton:latent_attention+rope+up_v")]:
        kw = dict(example_inputs=ins, generation=True, max_len=32, recipe=recipe, calibration=calib if recipe else None)
        cm = presso.compile(model, target="cuda", **kw)
        got = cm.generate(prompts, 6)
        assert kernel in cm.decode_program().step_rt.program.kernels.values(), name
        ref = presso.compile(model, **kw)
        want = ref.generate(prompts, 6)
        alone = [ref.generate(p[None], 6)[0] for p in prompts]
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(got, want, alone)), (name, got, want)
        print("ragged", name)
""")


def test_ragged_batches_decode_through_the_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", RAGGED], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ragged ") == 3, r.stdout


def test_softcapped_decode_attention_runs_the_references_form_on_the_cuda_target():
    # no kernel caps scores: a decode step's soft-capped attention runs the reference's form
    # (with the program's position mask), where the uncapped one runs the GQA decode kernel
    import torch
    from presso import parse
    from presso.codegen.triton.program import build_program
    from presso.runtime import run_graph
    text = """
graph @g(%q: f32[1, 4, 1, 16], %k: f32[1, 2, 16, 16], %v: f32[1, 2, 16, 16], %positions: i64[1]) {
  %a: f32[1, 4, 1, 16] = attention_cached(%q, %k, %v, %positions) CAP
  return %a
}"""
    capped, plain = parse(text.replace("CAP", "{softcap=2.0}")), parse(text.replace("CAP", ""))
    assert build_program(plain.copy()).kernels == {"a": "triton:gqa_decode_attention"}
    lowered = capped.copy()
    step = build_program(lowered).steps[0]
    assert lowered.nodes[0].op == "cuda.masked_attention" and step.kernel == "torch:softcapped_attention"
    ins = [4 * torch.randn(1, 4, 1, 16), 4 * torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16), torch.tensor([9])]
    want = run_graph(capped, *ins)[0]
    torch.testing.assert_close(step.run(*ins)[0], want)
    assert not torch.allclose(run_graph(plain, *ins)[0], want, atol=1e-3)
