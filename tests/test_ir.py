"""The IR: types, builder, text round trip, parse and verification errors, analyses."""
import pytest
import torch

from presso.errors import IRError, IRParseError, VerificationError
from presso.ir import DType, Graph, TensorType, all_ops, parse, print_graph, verify
from presso.ir.analysis import cost_report, dominators, to_networkx
from presso.ir.ops import pack_int4, unpack_int4
from presso.runtime import run_graph


def small_graph():
    g = Graph("mlp")
    x = g.add_input("x", TensorType(("batch", 16), DType.f32))
    w = g.add_param("fc.weight", torch.randn(32, 16))
    b = g.add_param("fc.bias", torch.randn(32))
    y = g.op("relu", g.op("linear", x, w, b))
    r = g.op("reshape", y, shape=["batch", 4, 8])
    parts = g.add_node("split", [r], {"axis": 1, "sizes": [1, 3]}).outputs
    m = g.op("mul", parts[1], g.op("full", value=0.5))
    g.outputs = [m, parts[0], g.op("reshape", m, shape=[-1])]
    return g


def test_symbolic_types_are_inferred_through_the_reference():
    g = small_graph()
    assert str(g.outputs[0].type) == "f32[batch, 3, 8]"
    assert g.outputs[2].type.shape == ("24*batch",)
    outs = run_graph(g, torch.randn(5, 16))
    assert [tuple(o.shape) for o in outs] == [(5, 3, 8), (5, 1, 8), (120,)]


def test_text_round_trips_exactly():
    g = small_graph()
    text = print_graph(g)
    g2 = parse(text, weights={k: p.data for k, p in g.params.items()})
    assert g2 == g
    assert print_graph(g2) == text
    assert "%split: f32[batch, 1, 8], %split_0: f32[batch, 3, 8] = split(%reshape) {axis=1, sizes=[1, 3]}" in text


def test_text_keeps_floats_strings_and_absent_operands():
    g = Graph("t")
    x = g.add_input("x", TensorType((2, 8), DType.f16))
    a = g.op("gelu", x, approximate="tanh")
    l = g.op("linear", a, g.add_param("w", torch.randn(4, 8, dtype=torch.float16)))
    f = g.op("full", value=float("-inf"), shape=[1], dtype="f16")
    g.outputs = [g.op("add", l, f), g.op("full", value=1e-12)]
    text = print_graph(g)
    assert "linear(%gelu, %w, _)" in text and "value=-inf" in text and "value=1e-12" in text
    assert parse(text) == g


def test_parse_error_points_at_line_and_column():
    text = print_graph(small_graph()).replace("relu(%linear)", "relu(%linea)")
    with pytest.raises(IRParseError) as e:
        parse(text)
    assert "undefined value %linea" in str(e.value) and e.value.line == 5


def test_parse_rejects_unknown_op_and_dtype():
    with pytest.raises(IRParseError, match="unknown op 'frobnicate'"):
        parse("graph @g(%x: f32[2]) {\n  %y: f32[2] = frobnicate(%x)\n  return %y\n}\n")
    with pytest.raises(IRParseError, match="unknown dtype 'f33'"):
        parse("graph @g(%x: f33[2]) {\n  return %x\n}\n")


def test_ir_text_with_a_type_error_is_rejected_naming_the_node():
    text = print_graph(small_graph()).replace("f32[batch, 4, 8] = reshape", "f32[batch, 4, 9] = reshape")
    with pytest.raises(VerificationError, match=r"node %reshape \(reshape\).*declared f32\[batch, 4, 9\].*infers f32\[batch, 4, 8\]"):
        parse(text)


def test_verifier_catches_dangling_use_order_and_bad_params():
    g = small_graph()
    other = Graph("other")
    stray = other.add_input("stray", TensorType((2,), DType.f32))
    g.nodes[0].inputs[0] = stray
    with pytest.raises(VerificationError, match="dangling use"):
        verify(g)
    g = small_graph()
    g.nodes[0], g.nodes[1] = g.nodes[1], g.nodes[0]
    with pytest.raises(VerificationError, match="defined later"):
        verify(g)
    g = small_graph()
    g.params["fc.bias"].data = torch.zeros(31)
    with pytest.raises(VerificationError, match=r"param %fc.bias: data is torch.float32\[31\]"):
        verify(g)


def test_builder_rejects_bad_ops_and_attrs():
    g = Graph()
    x = g.add_input("x", TensorType((2, 3), DType.f32))
    with pytest.raises(IRError, match="unknown op 'nope'"):
        g.op("nope", x)
    with pytest.raises(IRError, match="has no attribute"):
        g.op("relu", x, axis=1)
    with pytest.raises(IRError, match="must be one of"):
        g.op("gelu", x, approximate="fast")
    with pytest.raises(IRError, match="cannot take operands"):
        g.op("matmul", x, x)
    with pytest.raises(IRError, match="defined twice"):
        g.add_input("x", TensorType((1,), DType.f32))


def test_packed_int4_is_a_first_class_param_type():
    q = torch.randint(-8, 8, (6, 64))
    packed = pack_int4(q)
    assert packed.shape == (6, 32) and torch.equal(unpack_int4(packed, signed=True).to(torch.int64), q)
    g = Graph("q")
    x = g.add_input("x", TensorType((3, 64), DType.f32))
    wq = g.add_param("w.q", packed, TensorType((6, 64), DType.i4))
    sc = torch.rand(6, 2, dtype=torch.float16)
    scales = g.add_param("w.scales", sc)
    w = g.op("dequantize", wq, scales, None, bits=4, group_size=32)
    g.outputs = [g.op("linear", x, w)]
    verify(g)
    assert wq.type.nbytes() == packed.numel() == 192
    assert g.param_bytes() == 192 + 6 * 2 * 2
    xin = torch.randn(3, 64)
    expected = xin @ (q.float().reshape(6, 2, 32) * sc.float()[..., None]).reshape(6, 64).T
    assert torch.allclose(run_graph(g, xin)[0], expected, atol=1e-5)
    assert parse(print_graph(g), {k: p.data for k, p in g.params.items()}) == g


def test_every_op_has_a_reference_and_schema():
    ops = all_ops()
    assert {"linear", "attention", "rotary", "rms_norm", "layer_norm", "dequantize"} <= set(ops)
    for name, op in ops.items():
        assert callable(op.ref) and op.category, name


def test_attention_verifier_rejects_bad_gqa():
    g = Graph()
    q = g.add_input("q", TensorType((1, 6, 4, 8), DType.f32))
    k = g.add_input("k", TensorType((1, 4, 4, 8), DType.f32))
    with pytest.raises(IRError, match="multiple of key/value heads"):
        g.op("attention", q, k, k, None)


def test_networkx_view_and_dominators():
    g = small_graph()
    G = to_networkx(g)
    assert G.has_edge("param:fc.weight", "linear") and G.has_edge("relu", "reshape")
    idom = dominators(g)
    assert idom["reshape"] == "relu"


def test_cost_report_counts_real_bytes_and_flops():
    g = small_graph()
    rep = cost_report(g, {"batch": 5})
    assert rep["totals"]["bytes"] == (32 * 16 + 32) * 4
    lin = next(layer for layer in rep["layers"] if layer["op"] == "linear")
    assert lin["flops"] == 2 * 5 * 32 * 16 and lin["bytes"] == (32 * 16 + 32) * 4
