"""quantize{embeddings=int8|int4}: quantized embedding tables (``gather_dequantize``) and the LM
head tied to them (one packed table, two readers), on the reference runtime against torch, on
``llvm`` against the reference, through save / load; the ``cuda`` kernels run in
tests/test_triton_kernels.py and tests/test_cuda_target.py (interpreter)."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

import presso
from presso import PipelineError
from presso.errors import IRError
from presso.ir import parse
from presso.ir.graph import Graph
from presso.ir.registry import get_op
from presso.ir.types import DType, TensorType
from presso.models import make_gpt2, make_llama
from presso.passes.quantize import dequant, rtn


def table_params(g, origin):
    return sorted(n for n in g.params if n.startswith(origin + "."))


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("bits, group, symmetric", [(8, 0, True), (8, 16, False), (4, 32, True), (4, 16, False),
                                                     (8, 48, False), (4, 48, True)])    # 48: a shorter last group
def test_tied_table_is_one_packed_tensor_with_two_readers_and_matches_torch(bits, group, symmetric):
    model, ex = make_gpt2()
    cm = presso.compile(model, example_inputs=ex, recipe=f"quantize{{embeddings=int{bits},group_size={group},"
                                                           f"symmetric={str(symmetric).lower()},only=^wte}}")
    g = cm.graph
    users = g.users()
    names = table_params(g, "wte.weight")
    assert names == (["wte.weight.q", "wte.weight.scales"] + ([] if symmetric else ["wte.weight.zeros"]))
    assert "wte.weight" not in g.params
    q = g.params["wte.weight.q"].value
    assert q.type == TensorType((256, 64), (DType.i4 if symmetric else DType.u4) if bits == 4
                                else (DType.i8 if symmetric else DType.u8))
    assert sorted(u.op for u in users[q]) == ["dequantize", "gather_dequantize"]     # two readers
    (head_dq,) = [u for u in users[q] if u.op == "dequantize"]
    assert [u.op for u in users[head_dq.output]] == ["linear"]
    # torch, with the table replaced by its dequantized values (the only layer quantized): same numbers
    codes, scales, zeros = rtn(model.wte.weight.detach(), bits, group or 64, symmetric)
    want_model = copy.deepcopy(model)
    want_model.wte.weight.data = dequant(codes, scales, zeros, group or 64).float()
    with torch.no_grad():
        want = want_model(*ex)
    assert rel(cm(*ex), want) < 1e-5
    rep = cm.report()["compression"]
    (layer,) = rep["layers"]
    assert layer["layer"] == "wte.weight" and layer["role"] == "embedding+head" and layer["bits"] == bits
    ngroups = 256 * -(-64 // (group or 64))
    assert layer["bytes_before"] == 256 * 64 * 4
    assert layer["bytes_after"] == sum(g.params[n].data.numel() * g.params[n].data.element_size() for n in names) \
        == 256 * 64 * bits // 8 + ngroups * (2 if symmetric else 3)


def test_save_load_keeps_a_single_copy_of_the_tied_table(tmp_path):
    model, ex = make_gpt2()
    cm = presso.compile(model, example_inputs=ex, recipe="quantize{weights=int4,group_size=32,embeddings=int4}")
    path = cm.save(tmp_path / "gpt2.presso")
    with safe_open(str(path / "weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        stored = {k: f.get_tensor(k) for k in keys}
    assert sorted(k for k in keys if k.startswith("wte")) == ["wte.weight.q", "wte.weight.scales"]
    assert stored["wte.weight.q"].dtype == torch.uint8 and tuple(stored["wte.weight.q"].shape) == (256, 32)
    total = sum(t.numel() * t.element_size() for t in stored.values())
    assert total == cm.graph.param_bytes()              # every stored byte is a graph param's, once
    assert (path / "weights.safetensors").stat().st_size < total + 16384      # (header only on top)
    loaded = presso.load(path)
    assert torch.equal(loaded(*ex), cm(*ex))
    lu = loaded.graph.users()
    assert sorted(u.op for u in lu[loaded.graph.params["wte.weight.q"].value]) == ["dequantize", "gather_dequantize"]
    assert loaded.report()["compression"]["bytes_by_role"] == cm.report()["compression"]["bytes_by_role"]


def test_report_splits_embedding_head_and_tied_bytes():
    model, ex = make_gpt2()
    tied = presso.compile(model, example_inputs=ex, recipe="quantize{weights=int4,group_size=32,embeddings=int8}")
    roles = tied.report()["compression"]["bytes_by_role"]
    g = tied.graph
    assert roles["tied_embedding_head"] == sum(g.params[n].value.type.nbytes() for n in table_params(g, "wte.weight"))
    assert roles["head"] == 0
    assert roles["embedding"] == 0       # (the position table's lookup had constant indices: folded away)
    assert sum(roles.values()) == g.param_bytes()
    model, ex = make_llama()                           # untied: embed_tokens and lm_head are two tables
    untied = presso.compile(model, example_inputs=ex, recipe="quantize{weights=int4,group_size=32,embeddings=int8}")
    roles = untied.report()["compression"]["bytes_by_role"]
    g = untied.graph
    assert roles["tied_embedding_head"] == 0
    assert roles["embedding"] == sum(g.params[n].value.type.nbytes() for n in table_params(g, "embed_tokens.weight"))
    assert roles["head"] == sum(g.params[n].value.type.nbytes() for n in table_params(g, "lm_head.weight"))
    assert g.params["embed_tokens.weight.q"].value.type.dtype == DType.i8          # embeddings=int8
    assert g.params["lm_head.weight.q"].value.type.dtype == DType.i4               # a linear: weights=int4
    assert sum(roles.values()) == g.param_bytes()


def test_skip_and_only_reach_tables_and_heads():
    model, ex = make_gpt2()
    kept = presso.compile(model, example_inputs=ex, recipe="quantize{weights=int8,embeddings=int8,skip=^wte}").graph
    assert "wte.weight" in kept.params and "wte.weight.q" not in kept.params
    assert any(n.endswith(".q") for n in kept.params)                              # the linears are quantized
    only = presso.compile(model, example_inputs=ex, recipe="quantize{weights=int8,embeddings=int8,only=^wte}").graph
    assert [n for n in only.params if n.endswith(".q")] == ["wte.weight.q"]
    model, ex = make_llama()
    head = presso.compile(model, example_inputs=ex, recipe="quantize{weights=int4,group_size=32,only=lm_head}").graph
    assert [n for n in head.params if n.endswith(".q")] == ["lm_head.weight.q"]
    assert "embed_tokens.weight" in head.params


def test_lowrank_or_sparsify_after_quantize_leave_the_tied_head_on_the_packed_table():
    model, ex = make_gpt2()
    cm = presso.compile(model, example_inputs=ex,
                        recipe="quantize{weights=int8,embeddings=int8},sparsify{pattern=2:4}")
    g = cm.graph
    assert table_params(g, "wte.weight") == ["wte.weight.q", "wte.weight.scales"]
    assert not any(n.startswith("wte.weight.q.dq") for n in g.params)
    assert cm.report()["compression"]["bytes_by_role"]["tied_embedding_head"] > 0


@pytest.mark.parametrize("recipe", ["quantize{weights=int4,group_size=32,embeddings=int4}",
                                    "quantize{weights=int4,group_size=16,embeddings=int4,symmetric=false}",
                                    "quantize{weights=int8,group_size=48,embeddings=int8,symmetric=false}"])
def test_llvm_lowering_matches_the_reference_and_holds_the_tied_table_once(recipe):
    model, ex = make_gpt2()
    ref = presso.compile(model, example_inputs=ex, recipe=recipe)
    cm = presso.compile(ref.graph, example_inputs=ex, target="llvm")
    assert rel(cm(*ex), ref(*ex)) < 1e-5
    names = [n for n, _ in cm._build.params]
    assert not any(n.startswith("wte.weight") for n in names), names     # looked up in the head's column tiles
    model, ex = make_llama()
    ref = presso.compile(model, example_inputs=ex, recipe=recipe)        # untied: the lookup reads its own table
    cm = presso.compile(ref.graph, example_inputs=ex, target="llvm")
    assert rel(cm(*ex), ref(*ex)) < 1e-5
    assert "embed_tokens.weight.q" in [n for n, _ in cm._build.params]


def test_llvm_artifact_with_a_tied_table_stores_it_once_and_loads(tmp_path):
    model, ex = make_gpt2()
    cm = presso.compile(model, example_inputs=ex, target="llvm", recipe="quantize{weights=int8,embeddings=int8}")
    path = cm.save(tmp_path / "gpt2.presso", key=b"k")
    with safe_open(str(path / "weights.safetensors"), "pt") as f:
        assert sorted(k for k in f.keys() if k.startswith("wte")) == ["wte.weight.q", "wte.weight.scales"]
    loaded = presso.load(path, key=b"k")
    assert torch.equal(loaded(*ex), cm(*ex))
    assert not any(n.startswith("wte.weight") for n, _ in loaded._build.params)


def test_gather_dequantize_op_reference_types_and_text():
    gd, dq = get_op("gather_dequantize"), get_op("dequantize")
    torch.manual_seed(0)
    codes, scales, zeros = rtn(torch.randn(10, 8), 4, 4, False)
    from presso.ir.ops import pack_int4
    q, s, z = pack_int4(codes.to(torch.int16)), scales.half(), zeros.to(torch.uint8)
    ids = torch.tensor([[9, 0, 3], [3, 3, 1]])
    attrs = {"bits": 4, "group_size": 4, "dtype": "f32"}
    table = dq.run([q, s, z], attrs)[0]
    assert torch.equal(gd.run([ids, q, s, z], attrs)[0], table[ids])
    g = Graph("lookup")
    x = g.add_input("ids", TensorType(("batch", 3), DType.i64))
    qv = g.add_param("t.q", q, TensorType((10, 8), DType.u4))
    sv, zv = g.add_param("t.scales", s), g.add_param("t.zeros", z)
    out = g.op("gather_dequantize", x, qv, sv, zv, **attrs)
    g.outputs = [out]
    assert out.type == TensorType(("batch", 3, 8), DType.f32)
    assert str(parse(str(g))) == str(g)
    with pytest.raises(IRError, match="gather_dequantize: index must be an integer tensor, got f32"):
        g.op("gather_dequantize", g.add_input("f", TensorType((2,), DType.f32)), qv, sv, zv, **attrs)
    with pytest.raises(IRError, match=r"scales must be \[10, 3\]"):
        g.op("gather_dequantize", x, qv, sv, zv, bits=4, group_size=3)


@pytest.mark.parametrize("recipe, error, msg", [
    ("quantize{embeddings=int2}", PipelineError,
     r"option 'embeddings' must be one of \['none', 'int8', 'int4'\], got 'int2'"),
    ("quantize{embeddings=int4,group_size=15,only=^wte}", PipelineError,
     r"embeddings=int4 groups hold whole bytes, so group_size must be even, got 15 for table %wte.weight"),
    ("quantize{embeddings=int8,only=(wte}", PipelineError, r"option 'only' has a bad regex '\(wte'"),
    ("quantize{embeddings=int8,skip=[}", PipelineError, r"option 'skip' has a bad regex '\['"),
])
def test_bad_embedding_options_are_typed_errors(recipe, error, msg):
    model, ex = make_gpt2()
    graph = presso.compile(model, example_inputs=ex).graph
    before = str(graph)
    with pytest.raises(error, match=msg):
        presso.compile(graph, example_inputs=ex, recipe=recipe)
    assert str(graph) == before


KERNEL_SCRIPT = textwrap.dedent("""
    import os, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from presso.codegen.triton.gather_dequant import gather_dequant, gather_dequant_tiled
    from presso.codegen.triton.int4 import pack_int4 as pack_tiled
    from presso.ir.ops import pack_int4
    from presso.ir.registry import get_op
    from presso.passes.quantize import rtn
    torch.manual_seed(0)
    gd = get_op("gather_dequantize")
    # the kernels against the op's reference, bit for bit: graph layout (int8 / int4, signed or with
    # zero points, odd sizes), and int4's tiled layout (rows past a 128-row tile, fp16 output)
    for V, D, G, bits, sym, dt in [(37, 64, 32, 4, True, "f32"), (300, 96, 32, 4, False, "f16"),
                                   (50, 40, 8, 8, True, "f32"), (45, 24, 24, 8, False, "f32"),
                                   (130, 256, 64, 4, True, "f32"), (21, 30, 10, 4, True, "f32"),
                                   (45, 40, 16, 4, False, "f32"), (33, 24, 10, 8, True, "f32")]:   # shorter last group
        w = torch.randn(V, D)
        codes, s, z = rtn(w, bits, G, sym)
        q = pack_int4(codes.to(torch.int16)) if bits == 4 else codes.to(torch.int8 if sym else torch.uint8)
        s16, z8 = s.half(), None if z is None else z.to(torch.uint8)
        ids = torch.randint(0, V, (3, 5))
        ids[0, 0], ids[2, 4] = V - 1, 0
        want = gd.run([ids, q, s16, z8], {"bits": bits, "group_size": G, "dtype": dt})[0]
        got = gather_dequant(ids, q, s16, z8, bits, G, want.dtype)
        assert got.dtype == want.dtype and torch.equal(got, want), (V, D, G, bits,
                                                                    (got.float() - want.float()).abs().max())
        if bits == 4 and G in (32, 64):
            got = gather_dequant_tiled(ids, pack_tiled(q, s16, z8, G), want.dtype)
            assert torch.equal(got, want), ("tiled", V, D, G, (got.float() - want.float()).abs().max())
    print("kernels ok")
""")

CUDA_TARGET_SCRIPT = textwrap.dedent("""
    import os, torch
    os.environ["TRITON_INTERPRET"] = "1"
    import presso
    from presso.codegen.triton.int4 import Int4Weight
    from presso.models import make_gpt2
    # whole models on the cuda target: the lookup and the tied head read ONE prepared table
    m, ex = make_gpt2()
    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
    for recipe, lookup in [("quantize{weights=int4,group_size=32,embeddings=int4}", "triton:gather_dequant_int4"),
                           ("quantize{weights=int4,group_size=16,embeddings=int8,symmetric=false}",
                            "triton:gather_dequant_int8")]:
        cm = presso.compile(m, example_inputs=ex, target="cuda", recipe=recipe)
        rt = cm._runtime
        kernels = rt.program.kernels
        assert lookup in kernels.values(), kernels
        head = kernels[cm.graph.outputs[0].node.name]
        assert head.startswith("triton:int"), head
        if "int4" in lookup:       # tiled once, read by both; the graph's codes are not on the device
            at = {st.node.name: i for i, st in enumerate(rt.program.steps)}
            lookup_node = next(n.name for n in cm.graph.nodes if n.op == "cuda.gather_dequant")
            table, head_w = rt._prepared[at[lookup_node]][1], rt._prepared[at[cm.graph.outputs[0].node.name]][1]
            assert isinstance(table, Int4Weight) and table is head_w
            assert not any(v.name.startswith("wte") for v in rt._params), [v.name for v in rt._params]
        else:                      # the graph layout, on the device once for both readers
            assert sorted(v.name for v in rt._params if v.name.startswith("wte")) == [
                "wte.weight.q", "wte.weight.scales", "wte.weight.zeros"]
        err = rel(cm(*ex), presso.compile(m, example_inputs=ex, recipe=recipe)(*ex))
        assert err < 1e-5, (recipe, err)
    ids = torch.randint(0, 256, (2, 4))
    kw = dict(example_inputs=(ids,), recipe="quantize{weights=int4,group_size=32,embeddings=int4}", generation=True,
              max_len=16)
    got = presso.compile(m, target="cuda", **kw).generate(ids, 3)
    assert torch.equal(got, presso.compile(m, **kw).generate(ids, 3)), got
    print("cuda ok")
""")


def run_interpreted(script: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_gather_dequant_kernels_match_the_reference_bit_for_bit_in_the_interpreter():
    assert "kernels ok" in run_interpreted(KERNEL_SCRIPT)


def test_cuda_target_lookup_and_tied_head_read_one_prepared_table_in_the_interpreter():
    assert "cuda ok" in run_interpreted(CUDA_TARGET_SCRIPT)
