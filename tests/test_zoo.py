"""Every zoo model through both frontends: torch -> IR -> reference matches torch; ONNX -> IR ->
reference matches onnxruntime and torch; both canonicalize to the same op histogram; the IR
text round-trips."""
import functools

import pytest
import torch

from presso import from_onnx, from_torch, parse
from presso.models import ZOO
from presso.passes.canonicalize import canonicalize
from presso.runtime import run_graph
from zoo_util import export_onnx, max_rel_err, run_ort

TOL = 1e-4


@functools.lru_cache(maxsize=None)
def zoo(name):
    model, inputs = ZOO[name]()
    with torch.no_grad():
        expected = model(*inputs)
    proto = export_onnx(model, inputs)
    return model, inputs, expected, proto


@pytest.mark.parametrize("name", list(ZOO))
def test_torch_import_matches_torch(name):
    model, inputs, expected, _ = zoo(name)
    g = from_torch(model, inputs)
    assert g.meta["frontend"] == "torch.export"
    assert max_rel_err(run_graph(g, *inputs)[0], expected) <= TOL


@pytest.mark.parametrize("name", list(ZOO))
def test_onnx_import_matches_onnxruntime_and_torch(name):
    model, inputs, expected, proto = zoo(name)
    g = from_onnx(proto)
    got = run_graph(g, *inputs)[0]
    assert max_rel_err(got, run_ort(proto, inputs)[0]) <= TOL
    assert max_rel_err(got, expected) <= TOL


@pytest.mark.parametrize("name", list(ZOO))
def test_torch_and_onnx_canonicalize_to_the_same_ops(name):
    model, inputs, expected, proto = zoo(name)
    gt, go = canonicalize(from_torch(model, inputs)), canonicalize(from_onnx(proto))
    assert gt.op_histogram() == go.op_histogram()
    for g in (gt, go):
        assert max_rel_err(run_graph(g, *inputs)[0], expected) <= TOL
    ops = set(gt.op_histogram())
    if name in ("vit", "gpt2", "llama", "minilm"):
        assert "attention" in ops and "softmax" not in ops and "matmul" not in ops
    if name == "llama":
        assert {"rotary", "rms_norm"} <= ops
        att = next(n for n in gt.nodes if n.op == "attention")
        assert att.attrs["causal"] and att.inputs[1].type.shape[1] == 2  # GQA: 2 kv heads
    if name == "gpt2":
        assert all(n.attrs["causal"] for n in gt.nodes if n.op == "attention")


@pytest.mark.parametrize("name", list(ZOO))
def test_ir_text_round_trips(name):
    model, inputs, _, proto = zoo(name)
    for g in (from_torch(model, inputs), canonicalize(from_onnx(proto))):
        weights = {k: p.data for k, p in g.params.items()}
        assert parse(str(g), weights) == g


@pytest.mark.parametrize("name", ["mlp", "cnn", "vit"])
def test_fx_fallback_imports_the_same_model(name):
    model, inputs, expected, _ = zoo(name)
    g = from_torch(model, inputs, method="fx")
    assert g.meta["frontend"] == "torch.fx"
    assert max_rel_err(run_graph(g, *inputs)[0], expected) <= TOL
    assert canonicalize(g).op_histogram() == canonicalize(from_torch(model, inputs)).op_histogram()


def test_real_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from presso.models.minilm import model_dir
    from presso.models.sentences import SENTENCES
    model, (ids, mask) = ZOO["minilm"](SENTENCES[:6], pad_to=None)
    ref = st.SentenceTransformer(str(model_dir()), device="cpu").encode(SENTENCES[:6], convert_to_tensor=True)
    g = canonicalize(from_torch(model, (ids, mask)))
    got = run_graph(g, ids, mask)[0]
    assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.99999


def test_symbolic_batch_and_seq_through_torch_export():
    from torch.export import Dim
    model, inputs = ZOO["llama"]()
    g = canonicalize(from_torch(model, inputs, dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", max=128)},)))
    assert str(g.inputs[0].type) == "i64[batch, seq]" and str(g.outputs[0].type) == "f32[batch, seq, 256]"
    att = [n for n in g.nodes if n.op == "attention"]
    assert len(att) == 2 and str(att[0].inputs[1].type) == "f32[batch, 2, seq, 16]"  # GQA folded, symbolic
    for shape in ((1, 5), (3, 11)):
        x = torch.randint(0, 256, shape)
        assert max_rel_err(run_graph(g, x)[0], model(x)) <= TOL
    assert parse(str(g), {k: p.data for k, p in g.params.items()}) == g


def test_a_dynamic_dim_of_size_one_in_the_example_stays_symbolic():
    # torch.export alone specialises it ("Constraints violated (batch)")
    from torch.export import Dim
    model, _ = ZOO["llama"]()
    one = torch.randint(0, 256, (1, 1))
    g = from_torch(model, (one,), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", max=128)},))
    assert str(g.inputs[0].type) == "i64[batch, seq]"
    for x in (one, torch.randint(0, 256, (3, 7))):
        assert max_rel_err(run_graph(g, x)[0], model(x)) <= TOL


def test_symbolic_dims_through_onnx_match_the_torch_import():
    from torch.export import Dim
    model, inputs = ZOO["minilm"]()
    ds = ({0: Dim("batch"), 1: Dim("seq", max=128)},) * 2
    go = canonicalize(from_onnx(export_onnx(model, inputs, dynamic_shapes=ds)))
    gt = canonicalize(from_torch(model, inputs, dynamic_shapes=ds))
    assert [str(v.type) for v in go.inputs] == ["i64[batch, seq]", "i64[batch, seq]"]
    assert go.op_histogram() == gt.op_histogram() and go.op_histogram()["attention"] == 6
    short = [t[:3, :7].clone() for t in inputs]
    assert max_rel_err(run_graph(go, *short)[0], model(*short)) <= TOL
