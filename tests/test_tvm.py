"""The TVM targets: every zoo model compiled for ``llvm`` matches the reference runtime, compressed
layers run from their packed storage, aarch64 builds are Arm shared libraries, and artifacts
load in a fresh process without recompiling."""
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import presso
from presso.errors import CodegenError, TargetUnavailableError
from presso.models import ZOO, make_llama, make_mlp
from presso.runtime.artifact import ArtifactError
from zoo_util import max_rel_err

pytest.importorskip("tvm")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_matches_the_reference_on_llvm(name):
    model, inputs = ZOO[name]()
    ref = presso.compile(model, example_inputs=inputs)
    cm = presso.compile(model, example_inputs=inputs, target="llvm")
    assert max_rel_err(cm(*inputs), ref(*inputs)) < 1e-5


RECIPES = ["quantize{weights=int8}", "quantize{weights=int4,group_size=16}",
           "quantize{weights=int4,group_size=16,symmetric=false}", "sparsify{pattern=2:4}", "sparsify{pattern=4:8}",
           "lowrank{ratio=0.5}", "quantize{weights=int8,activations=int8,rotate=hadamard}",
           "sparsify{pattern=2:4},quantize{weights=int4,group_size=16}", "quantize{weights=int8,activations=int7}",
           "quantize{weights=int4,group_size=48,symmetric=false}"]    # 48 does not divide 64: a shorter last group


@pytest.mark.parametrize("recipe", RECIPES)
def test_compressed_llama_matches_the_reference_on_llvm(recipe):
    model, inputs = make_llama(batch=2, seq=12)   # 12 rows: not a multiple of the row block
    ref = presso.compile(model, example_inputs=inputs, recipe=recipe)
    cm = presso.compile(model, example_inputs=inputs, recipe=recipe, target="llvm")
    assert max_rel_err(cm(*inputs), ref(*inputs)) < 1e-5


def test_fp16_llama_matches_the_reference_on_llvm():
    """fp16 weights and activations: Llama's norm spelling (widen, normalize, round back) is one
    ``rms_norm`` on the fp16 input after canonicalization, lowered to TVM's ``nn.rms_norm``."""
    model, inputs = make_llama(batch=1, seq=5)
    model = model.half()
    ref = presso.compile(model, example_inputs=inputs)
    cm = presso.compile(model, example_inputs=inputs, target="llvm")
    assert any(n.op == "rms_norm" and n.inputs[0].type.dtype.name == "f16" for n in cm.graph.nodes)
    assert max_rel_err(cm(*inputs), ref(*inputs)) < 2e-3


def test_compressed_weights_are_read_packed_not_densified():
    """The TVM kernels take the int4 codes two per byte and the 2:4 indices four bits each."""
    from presso.codegen.tvm.lower import Lowering
    model, inputs = make_llama()
    cm = presso.compile(model, example_inputs=inputs, recipe="sparsify{pattern=2:4},quantize{weights=int4,group_size=16}")
    packed = dict(Lowering(cm.graph).plan())
    graph_bytes = sum(p.data.numel() * p.data.element_size() for p in cm.graph.params.values())
    assert sum(a.nbytes for a in packed.values()) == graph_bytes
    assert not any(a.dtype == "float32" and a.ndim == 3 and "q" in n for n, a in packed.items())


def test_w8a7_uses_the_avx2_integer_kernel_where_the_cpu_has_it_and_loads_from_an_artifact(tmp_path):
    from presso.codegen.tvm import int8_avx2
    from presso.codegen.tvm.build import host_cpu_target
    model, inputs = make_llama(batch=2, seq=12)
    cm = presso.compile(model, example_inputs=inputs, target="llvm", recipe="quantize{weights=int8,activations=int7}")
    names = [n for n, _ in cm._build.params]
    assert any(n.endswith(".colsum.tiled8") for n in names) == int8_avx2.fits(host_cpu_target(), 64, 64)
    codes = [n for n in cm.graph.nodes if n.op == "quantize_per_token"]
    assert codes and all(n.attrs["bits"] == 7 for n in codes)
    loaded = presso.load(cm.save(tmp_path / "w8a7.presso", key=b"test key"), key=b"test key")
    assert torch.equal(loaded(*inputs), cm(*inputs))


def _run_rows_kernel(func, x, outs):
    import numpy as np
    import tvm
    from presso.codegen.tvm.build import host_cpu_target
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(host_cpu_target()))
    args = [tvm.runtime.tensor(x.numpy(), tvm.cpu())] + [tvm.runtime.tensor(np.zeros(s, d), tvm.cpu()) for s, d in outs]
    lib["main"](*args)
    return [torch.from_numpy(a.numpy()) for a in args[1:]]


@pytest.mark.parametrize("rows,dim,block", [(5, 48, 16), (37, 384, 128), (3, 1536, 512), (2, 64, 8)])
def test_butterfly_hadamard_kernel_matches_the_reference_op(rows, dim, block):
    """hadamard.py's fast Walsh-Hadamard transform, alone and fused with quantize_per_token (7-bit
    u8 codes for the AVX2 kernel, 8-bit i8 codes), against the registry's reference ops."""
    from presso.codegen.tvm import hadamard as fwht
    from presso.ir.ops import hadamard, quantize_per_token
    torch.manual_seed(rows)
    x = torch.randn(rows, dim)
    x[:, 3] *= 30                                     # an outlier channel, as rotation is meant for
    rotated = hadamard(x, block)
    (y,) = _run_rows_kernel(fwht.prim_func(dim, block), x, [((rows, dim), "float32")])
    assert (y - rotated).abs().max() < 1e-5 * rotated.abs().max()
    for bits, as_u8 in ((7, True), (8, False)):
        qmax = 2.0 ** (bits - 1) - 1
        codes, scales = _run_rows_kernel(fwht.prim_func(dim, block, (qmax, as_u8)), x,
                                         [((rows, dim), "uint8" if as_u8 else "int8"), ((rows,), "float32")])
        ref_codes, ref_scales = quantize_per_token(rotated, bits)
        codes = codes.to(torch.int32) - (64 if as_u8 else 0)
        assert torch.allclose(scales, ref_scales[:, 0], rtol=1e-5)
        diff = (codes - ref_codes.to(torch.int32)).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3   # only float ties can round apart


def test_rotation_feeding_a_quantizer_is_one_kernel_without_a_dense_matmul():
    from presso.codegen.tvm.build import host_cpu_target
    from presso.codegen.tvm.lower import Lowering
    model, inputs = make_llama(batch=2, seq=12)
    cm = presso.compile(model, example_inputs=inputs, recipe="quantize{weights=int8,activations=int7,rotate=hadamard}")
    lowering = Lowering(cm.graph, host_cpu_target())
    text = lowering.build().mod.script()
    plain = presso.compile(model, example_inputs=inputs, recipe="quantize{weights=int8,activations=int7}")
    attention_matmuls = Lowering(plain.graph, host_cpu_target()).build().mod.script().count("R.matmul")
    rotations = [n for n in cm.graph.nodes if n.op == "hadamard"]
    wide = [n for n in rotations if n.attrs["block"] >= 8]
    assert wide and lowering.rotated_in_quant == set(wide)
    assert any(name.startswith("presso_hadamard_quant7u_") for name in lowering.prim_funcs)
    assert text.count("R.matmul") - attention_matmuls == len(rotations) - len(wide)   # narrow blocks only


def test_symbolic_batch_runs_at_other_sizes():
    from torch.export import Dim
    model, inputs = make_mlp()
    cm = presso.compile(model, example_inputs=inputs, target="llvm", recipe="quantize{weights=int4,group_size=16}",
                        dynamic_shapes=({0: Dim("batch")},))
    ref = presso.compile(model, example_inputs=inputs, recipe="quantize{weights=int4,group_size=16}",
                         dynamic_shapes=({0: Dim("batch")},))
    for b in (1, 7, 33):
        x = torch.randn(b, inputs[0].shape[1])
        assert max_rel_err(cm(x), ref(x)) < 1e-5


def test_aarch64_build_is_an_arm_shared_library(tmp_path):
    import shutil
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("no aarch64 cross compiler (apt install gcc-aarch64-linux-gnu)")
    model, inputs = make_mlp()
    cm = presso.compile(model, example_inputs=inputs, target="aarch64", recipe="quantize{weights=int8}")
    path = cm.save(tmp_path / "arm.presso")
    head = (path / "code" / "model.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2                    # 64-bit ELF
    assert int.from_bytes(head[18:20], "little") == 183               # e_machine EM_AARCH64
    with pytest.raises(TargetUnavailableError, match="cannot run on this machine"):
        cm(*inputs)
    with pytest.raises(ArtifactError, match="compiled for aarch64"):
        presso.load(path)


def _aarch64_sysroot():
    """qemu-user and an aarch64 Python with TVM's runtime (.ci/aarch64_sysroot.sh makes it)."""
    import os
    import shutil
    from pathlib import Path
    root = Path(os.environ.get("PRESSO_AARCH64_SYSROOT", Path.home() / ".cache/presso/aarch64-sysroot"))
    if shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None:
        pytest.skip("needs the aarch64 cross compiler and qemu-user (apt install gcc-aarch64-linux-gnu qemu-user)")
    if not (root / "root/usr/bin/python3.11").exists() or not (root / "site/tvm").is_dir():
        pytest.skip(f"no aarch64 Python with TVM's runtime at {root} (bash .ci/aarch64_sysroot.sh)")
    return root


@pytest.mark.parametrize("recipe", [None, "sparsify{pattern=2:4},quantize{weights=int4,group_size=16}"])
def test_aarch64_library_runs_under_qemu_and_matches_the_reference(tmp_path, recipe):
    """The artifact's aarch64 library, run by TVM's aarch64 runtime in an emulated Arm process (no
    presso, no torch there), computes what the reference runtime computes on the host."""
    import os
    import numpy as np
    from presso.runtime.reference import ReferenceRuntime
    root = _aarch64_sysroot()
    model, inputs = make_llama(batch=2, seq=12)
    cm = presso.compile(model, example_inputs=inputs, target="aarch64", recipe=recipe)
    lib = cm.save(tmp_path / "arm.presso") / "code" / "model.so"
    arrays = [t.numpy() for t in inputs] + [a for _, a in cm._build.params]
    np.savez(tmp_path / "args.npz", **{f"a{i}": a for i, a in enumerate(arrays)})
    runner = os.path.join(os.path.dirname(__file__), "qemu_tvm_run.py")
    env = dict(os.environ, PYTHONPATH=str(root / "site"), PYTHONHOME=str(root / "root/usr"))
    r = subprocess.run(["qemu-aarch64", "-L", str(root / "root"), str(root / "root/usr/bin/python3.11"), runner,
                        str(lib), str(tmp_path / "args.npz"), str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ran on aarch64" in r.stdout
    got = torch.from_numpy(np.load(tmp_path / "out0.npy"))
    assert max_rel_err(got, ReferenceRuntime(cm.graph).run(*inputs)[0]) < 1e-5


@pytest.mark.slow
def test_aarch64_artifact_generates_under_qemu_the_reference_tokens(tmp_path):
    """A model compiled for generation and saved for aarch64 holds the decode program's prefill and
    step libraries; an emulated Arm process (TVM's runtime and numpy only) runs greedy decoding
    from them and produces the reference target's tokens."""
    import os
    import numpy as np
    from presso.passes.decode import build_decode_graph
    from presso.targets.llvm import decode_graphs, graph_key
    root = _aarch64_sysroot()
    model, inputs = make_llama(batch=1, seq=12)
    kw = dict(example_inputs=inputs, generation=True, max_len=32, recipe="quantize{weights=int8}", verbose=False)
    cm = presso.compile(model, target="aarch64", **kw)
    path = cm.save(tmp_path / "arm.presso")
    prompt, new = inputs[0][:, :7], 6
    want = presso.compile(model, target="reference", **kw).generate(prompt, new)[:, 7:]
    _, specs = build_decode_graph(cm.graph, 32)
    builds = {kind: cm.code.decode[graph_key(g)] for kind, g in decode_graphs(cm.graph).items()}
    arrays = {"ids": prompt.numpy()}
    arrays.update({f"cache{i}": torch.zeros(s.type.concrete_shape({"batch": 1}), dtype=s.type.dtype.torch).numpy()
                   for i, s in enumerate(specs)})
    for kind, b in builds.items():
        arrays.update({f"{kind}{i}": a for i, (_, a) in enumerate(b.params)})
    np.savez(tmp_path / "args.npz", **arrays)
    runner = os.path.join(os.path.dirname(__file__), "qemu_tvm_generate.py")
    env = dict(os.environ, PYTHONPATH=str(root / "site"), PYTHONHOME=str(root / "root/usr"))
    r = subprocess.run(["qemu-aarch64", "-L", str(root / "root"), str(root / "root/usr/bin/python3.11"), runner,
                        str(path / "code"), str(tmp_path / "args.npz"), str(new), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generated on aarch64" in r.stdout
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "tokens.npy")), want)


def test_llvm_artifact_loads_in_a_fresh_process_without_recompiling(tmp_path):
    model, inputs = make_llama()
    cm = presso.compile(model, example_inputs=inputs, target="llvm", recipe="quantize{weights=int4,group_size=16}")
    path = cm.save(tmp_path / "llama.presso", key=b"test key")
    save_file({"x": inputs[0]}, str(tmp_path / "in.safetensors"))
    script = textwrap.dedent(f"""
        import sys, presso
        import presso.codegen.tvm.build as b
        b.build = None   # loading must not compile
        from safetensors.torch import load_file, save_file
        m = presso.load({str(path)!r}, key=b"test key")
        save_file({{"y": m(load_file({str(tmp_path / 'in.safetensors')!r})["x"])}}, {str(tmp_path / 'out.safetensors')!r})
        assert "presso.models" not in sys.modules
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["y"], cm(*inputs))


def test_tampered_library_is_refused(tmp_path):
    model, inputs = make_mlp()
    path = presso.compile(model, example_inputs=inputs, target="llvm").save(tmp_path / "m.presso")
    lib = path / "code" / "model.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="code/model.so does not match its SHA-256"):
        presso.load(path)


def test_llvm_artifact_records_the_cpu_features_it_needs_and_refuses_a_cpu_without_them(tmp_path):
    """Code compiled for -mcpu=<host> may use every extension the host has (AVX2, the W8A7 kernel's
    vpmaddubsw, ...): an older CPU gets a typed refusal at load, not an illegal instruction."""
    import json
    from presso.codegen.tvm.build import cpu_flags
    if not cpu_flags():
        pytest.skip("no /proc/cpuinfo flags on this machine")
    model, inputs = make_mlp()
    path = presso.compile(model, example_inputs=inputs, target="llvm").save(tmp_path / "m.presso")
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["requires"]["features"]) <= cpu_flags()
    manifest["requires"]["features"].append("avx1024_imaginary")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="uses avx1024_imaginary, which this CPU lacks"):
        presso.load(path)


def test_an_op_without_lowering_names_the_node(monkeypatch):
    from presso.codegen.tvm.lower import LOWER, lower
    monkeypatch.delitem(LOWER, "cache_update")        # (every presso op has a lowering: take one away)
    from presso.ir.graph import Graph
    from presso.ir.types import TensorType, DType
    g = Graph("g")
    x = g.add_input("x", TensorType((4, 8), DType.f32))
    pos = g.add_input("pos", TensorType((4,), DType.i64))
    c = g.add_param("cache", torch.zeros(16, 8))
    y = g.op("cache_update", c, x, pos, axis=0, name="upd")
    g.outputs = [y]
    with pytest.raises(CodegenError, match="node 'upd': op 'cache_update' has no TVM lowering"):
        lower(g)


def test_an_aten_op_without_lowering_names_the_node_and_op():
    """A core ATen op TVM has no lowering for (lgamma) fails typed at compile time, not silently."""
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.lgamma(x) + 1

    with pytest.raises(CodegenError, match="node 'lgamma': op 'aten.lgamma' has no TVM lowering"):
        presso.compile(M(), example_inputs=(torch.rand(3, 4) + 0.5,), target="llvm")


def test_hf_style_aten_ops_match_torch_on_llvm():
    """cumsum-derived positions, gather, a ~mask, an int remainder, a clamp and mixed int32 / int64
    arithmetic: the aten.* ops
    Hugging Face mask and position code produces, lowered through TVM, give torch's numbers."""
    class M(torch.nn.Module):
        def forward(self, x, mask):
            pos = torch.cumsum(mask, dim=1) * mask - 1
            g = torch.gather(x, 1, pos.clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            m32 = mask.int()        # RoBERTa's positions: i32 + a 0-d i64 stays i32
            return torch.where(~mask.bool().unsqueeze(-1), g.clamp(-0.5, 0.5), torch.log1p(g.abs())), pos % 3, \
                (torch.cumsum(m32, 1).type_as(m32) + 0) * m32

    x = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    cm = presso.compile(M(), example_inputs=(x, mask), target="llvm")
    assert any(n.op.startswith("aten.") for n in cm.graph.nodes)
    for got, want in zip(cm(x, mask), M()(x, mask)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_softcapped_gqa_attention_matches_the_reference_on_llvm():
    g = presso.parse("""
graph @g(%q: f32[2, 4, 6, 8], %k: f32[2, 2, 6, 8], %v: f32[2, 2, 6, 8], %mask: f32[2, 1, 1, 6]) {
  %a: f32[2, 4, 6, 8] = attention(%q, %k, %v, %mask) {causal=true, scale=0.25, softcap=2.0}
  return %a
}""")
    mask = torch.zeros(2, 1, 1, 6)
    mask[1, ..., 4:] = torch.finfo(torch.float32).min
    ins = (4 * torch.randn(2, 4, 6, 8), 4 * torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8), mask)
    want = presso.compile(g, example_inputs=ins)(*ins)
    torch.testing.assert_close(presso.compile(g, target="llvm", example_inputs=ins)(*ins), want, rtol=1e-5, atol=1e-5)
    barely_capped = presso.parse(str(g).replace("softcap=2.0", "softcap=1000.0"))
    assert not torch.allclose(presso.compile(barely_capped, example_inputs=ins)(*ins), want, atol=1e-3)
