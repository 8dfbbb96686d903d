"""The ``cuda`` target: whole zoo models through the generated Triton kernels under
``TRITON_INTERPRET=1`` on CPU tensors (a subprocess, so the flag is set before Triton loads),
compared with the reference runtime; and a clear error where neither a GPU nor the interpreter is."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, torch
    os.environ["TRITON_INTERPRET"] = "1"
    import presso
    from presso.models import ZOO, make_llama
    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
    for name in sorted(ZOO):
        m, ex = ZOO[name]()
        cm = presso.compile(m, example_inputs=ex, target="cuda")
        err = rel(cm(*ex), presso.compile(m, example_inputs=ex)(*ex))
        assert err < 1e-5, (name, err)
        print("zoo", name, sorted(set(cm._runtime.program.kernels.values())))
    m, ex = make_llama(batch=1, seq=5)
    for recipe in ["quantize{weights=int4,group_size=16}", "quantize{weights=int8,symmetric=false}",
                   "sparsify{pattern=2:4}", "sparsify{pattern=4:8}"]:
        cm = presso.compile(m, example_inputs=ex, target="cuda", recipe=recipe)
        assert any(k.startswith(("triton:int", "triton:nm")) for k in cm._runtime.program.kernels.values())
        err = rel(cm(*ex), presso.compile(m, example_inputs=ex, recipe=recipe)(*ex))
        assert err < 1e-5, (recipe, err)
        print("recipe", recipe)
    # a cuda artifact loads (kernels regenerated from the graph, cached by source hash)
    import tempfile
    cm = presso.compile(m, example_inputs=ex, target="cuda", recipe="quantize{weights=int4,group_size=16}")
    with tempfile.TemporaryDirectory() as d:
        loaded = presso.load(cm.save(d + "/m.presso"))
        assert loaded.target == "cuda" and torch.equal(loaded(*ex), cm(*ex))
    print("artifact ok")
    # generation: prefill + decode steps through the kernels give the reference's tokens
    ids = torch.randint(0, 256, (2, 4))
    kw = dict(example_inputs=(ids,), recipe="quantize{weights=int4,group_size=16}", generation=True, max_len=16)
    got = presso.compile(m, target="cuda", **kw).generate(ids, 6)
    want = presso.compile(m, **kw).generate(ids, 6)
    assert torch.equal(got, want), (got, want)
    print("generate ok")
""")


def test_whole_models_run_through_the_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("zoo ") == 6 and r.stdout.count("recipe ") == 4 and "generate ok" in r.stdout
    assert "artifact ok" in r.stdout
    assert "triton:fused_elementwise" in r.stdout and "triton:rms_norm" in r.stdout


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
