"""The light ONNX reader (presso/frontend/onnx_proto.py) against the onnx package it stands in for:
tensors, attributes, the checker and the opset number agree with onnx's own functions, reading a
model imports neither ``onnx/__init__`` nor ``ml_dtypes``, and a later ``import onnx`` works."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import presso
from presso.errors import FrontendError
from presso.frontend import onnx_proto
from presso.frontend.onnx_frontend import from_onnx, load_onnx

ROOT = Path(__file__).resolve().parent.parent
NATIVE = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64,
          np.uint32, np.uint64, np.bool_]


def _values(dtype):
    rng = np.random.default_rng(0)
    if dtype == np.bool_:
        return rng.random((3, 4)) > 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, (3, 4), dtype=dtype, endpoint=True)
    return rng.standard_normal((3, 4)).astype(dtype)


@pytest.mark.parametrize("raw", [True, False], ids=["raw_data", "typed_field"])
@pytest.mark.parametrize("dtype", NATIVE, ids=lambda d: np.dtype(d).name)
def test_to_array_matches_numpy_helper(dtype, raw):
    a = _values(dtype)
    t = numpy_helper.from_array(a, "t") if raw else \
        helper.make_tensor("t", helper.np_dtype_to_tensor_dtype(a.dtype), a.shape, a.reshape(-1).tolist())
    assert t.HasField("raw_data") == raw
    got, want = onnx_proto.to_array(t), numpy_helper.to_array(t)
    assert got.dtype == want.dtype == a.dtype and got.shape == want.shape == a.shape
    np.testing.assert_array_equal(got, a)
    np.testing.assert_array_equal(want, a)


def test_to_array_hands_other_types_to_onnx():
    bf16 = helper.make_tensor("b", TensorProto.BFLOAT16, [2], [1.5, -2.0])
    strings = helper.make_tensor("s", TensorProto.STRING, [2], [b"a", b"bc"])
    for t in (bf16, strings):
        np.testing.assert_array_equal(onnx_proto.to_array(t), numpy_helper.to_array(t))


def test_attribute_value_matches_onnx_helper():
    sub = helper.make_graph([], "sub", [], [])
    node = helper.make_node("X", [], ["y"], f=1.5, i=3, s="txt", t=numpy_helper.from_array(np.ones(2, np.float32)),
                            g=sub, floats=[1.0, 2.5], ints=[1, 2], strings=["a", "b"], graphs=[sub, sub],
                            tensors=[numpy_helper.from_array(np.zeros(1, np.int64))])
    for a in node.attribute:
        assert onnx_proto.attribute_value(a) == helper.get_attribute_value(a), a.name
    ref = onnx.AttributeProto(name="r", ref_attr_name="outer", type=onnx.AttributeProto.INT)
    with pytest.raises(ValueError, match="reference attribute"):
        onnx_proto.attribute_value(ref)


def test_opset_version_and_checker_are_onnxs():
    assert onnx_proto.opset_version() == onnx.defs.onnx_opset_version()
    bad = helper.make_model(helper.make_graph([helper.make_node("Relu", ["undefined"], ["y"])], "g",
                                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], []),
                            opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnx.checker.ValidationError) as want:
        onnx.checker.check_model(bad)
    with pytest.raises(onnx.checker.ValidationError) as got:
        onnx_proto.check_model(bad)
    assert str(got.value) == str(want.value)
    with pytest.raises(FrontendError, match="invalid ONNX model"):
        load_onnx(bad.SerializeToString())


def _mlp_model():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (6, 8)), ("b1", (8,)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_external_data_and_text_formats_are_read_by_onnx(tmp_path):
    model = _mlp_model()
    x = torch.randn(2, 6)
    w1, b1 = (torch.from_numpy(numpy_helper.to_array(t)) for t in model.graph.initializer)
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    onnx.save(model, str(tmp_path / "m.textproto"), format="textproto")
    for name in ("ext.onnx", "m.textproto"):
        torch.testing.assert_close(presso.compile(from_onnx(tmp_path / name))(x), x @ w1 + b1)


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_reading_a_model_imports_neither_onnx_init_nor_ml_dtypes_and_onnx_imports_after(tmp_path):
    onnx.save(_mlp_model(), str(tmp_path / "mlp.onnx"))
    code = (f"import sys, torch, presso\n"
            f"g = presso.from_onnx({str(tmp_path / 'mlp.onnx')!r})\n"
            f"print(sorted(m for m in ('onnx', 'onnx.helper', 'ml_dtypes') if m in sys.modules))\n"
            f"import onnx, onnx.checker\n"                      # the package after its parts: one set of classes
            f"from tvm.relax.frontend import onnx as tvm_onnx\n"  # spells onnx.onnx_ml_pb2.ModelProto
            f"m = onnx.load({str(tmp_path / 'mlp.onnx')!r}); onnx.checker.check_model(m)\n"
            f"assert onnx.onnx_ml_pb2.ModelProto is onnx.ModelProto is type(m)\n"
            f"assert onnx.onnx_cpp2py_export.ONNX_ML\n")
    r = _fresh(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "[]"
