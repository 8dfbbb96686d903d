"""Bad input gets a typed presso error that names what is at fault."""
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import presso
from presso import FrontendError, InputError, PipelineError, UnsupportedOpError, from_onnx, from_torch
from presso.models import make_mlp
from zoo_util import export_onnx


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    model, inputs = make_mlp()
    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    onnx.save(export_onnx(model, inputs), str(path))
    return path, model, inputs


def test_truncated_onnx_file(mlp_onnx, tmp_path):
    data = mlp_onnx[0].read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 40):
        bad = tmp_path / f"cut{cut}.onnx"
        bad.write_bytes(data[:cut])
        with pytest.raises(FrontendError, match="malformed or truncated|invalid ONNX model"):
            from_onnx(bad)


def test_garbage_and_missing_onnx_files(tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x08\x07\xff\xfe not an onnx model at all \x00\x01")
    with pytest.raises(FrontendError, match="malformed or truncated|invalid ONNX model"):
        from_onnx(bad)
    with pytest.raises(FrontendError, match="not found"):
        from_onnx(tmp_path / "missing.onnx")


def _model(op_type, opset=17, **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    node = helper.make_node(op_type, ["x"], ["y"], name="my_node", **attrs)
    relu = helper.make_node("Relu", ["x"], ["r"], name="relu0")
    graph = helper.make_graph([relu, node], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_onnx_unsupported_op_names_op_node_and_supported_list():
    """Unique's result shape is data, which presso's typed graphs cannot hold: a typed refusal."""
    with pytest.raises(UnsupportedOpError) as e:
        from_onnx(_model("Unique"))
    msg = str(e.value)
    first, rest = msg.split("\n", 1)
    assert "'Unique'" in first and "my_node" in first and "supported ops:" not in first
    assert "supported ops:" in rest and "MatMul" in rest
    assert e.value.op == "Unique" and e.value.node == "my_node"


def test_onnx_old_opset_is_upgraded():
    """Opsets below 13 go through onnx.version_converter: opset 11 Relu imports and runs."""
    g = from_onnx(_model("Relu", opset=11))
    x = torch.randn(2, 3)
    assert torch.equal(presso.compile(g)(x), torch.relu(x))


def test_onnx_opset_outside_what_onnx_knows_is_refused():
    import onnx as _onnx
    newest = _onnx.defs.onnx_opset_version()
    with pytest.raises(FrontendError, match=rf"opset {newest + 1} is not supported: opsets 13..23 import "
                                            rf"directly, 1..12 and 24..{newest} are converted"):
        from_onnx(_model("Relu", opset=newest + 1))


def test_onnx_failed_conversion_names_opset_and_allowed_range(monkeypatch):
    from onnx import version_converter

    def boom(model, target):
        raise RuntimeError("No Adapter For Relu")
    monkeypatch.setattr(version_converter, "convert_version", boom)
    with pytest.raises(FrontendError, match=r"opset 9 could not be converted to opset 13 by "
                                            r"onnx.version_converter \(No Adapter For Relu\); opsets 13..23"):
        from_onnx(_model("Relu", opset=9))


def test_onnx_axis_out_of_range_is_typed():
    with pytest.raises(FrontendError, match=r"attribute 'axis' = 3 is out of range for rank 2 \(allowed: -2..1\)"):
        from_onnx(_model("LogSoftmax", axis=3))


def test_onnx_flatten_axis_beyond_rank_is_typed():
    with pytest.raises(FrontendError, match=r"'axis' = 3 is out of range for rank 2 \(allowed: -2..2\)"):
        from_onnx(_model("Flatten", axis=3))


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_data_dependent_control_flow_is_a_frontend_error():
    with pytest.raises(FrontendError) as e:
        from_torch(DataDependent(), (torch.randn(3),))
    msg = str(e.value)
    assert "torch.export" in msg and "torch.fx" in msg and "control flow" in msg


@torch.library.custom_op("presso_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_opaque.register_fake
def _opaque_fake(x):
    return torch.empty_like(x)


class UsesCustomOp(torch.nn.Module):
    def forward(self, x):
        return torch.ops.presso_test.opaque(x) + 1


def test_unsupported_torch_op_names_op_and_source_line():
    """A user's custom op is neither ATen nor decomposable: the error names it, its node and line;
    the supported list comes after the first line."""
    with pytest.raises(UnsupportedOpError) as e:
        from_torch(UsesCustomOp(), (torch.randn(3),))
    first, rest = str(e.value).split("\n", 1)
    assert "presso_test.opaque" in first and "test_errors.py" in first and "not a core ATen op" in first
    assert "supported ops:" not in first and "supported ops:" in rest and "linear" in rest and "acos" in rest


class UsesCumsum(torch.nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=0) + torch.special.bessel_j0(x)


def test_core_aten_and_leaf_aten_ops_import_as_generic_ops():
    """cumsum (core ATen) and bessel_j0 (no decomposition) become ``aten.*`` ops run by ATen."""
    x = torch.randn(5)
    g = from_torch(UsesCumsum(), (x,))
    assert {"aten.cumsum", "aten.special_bessel_j0"} <= set(g.op_histogram())
    got = presso.compile(UsesCumsum(), example_inputs=(x,))(x)
    torch.testing.assert_close(got, UsesCumsum()(x))


def test_wrong_inputs_at_call_time():
    model, inputs = make_mlp()
    cm = presso.compile(model, example_inputs=inputs)
    with pytest.raises(InputError, match=r"takes 1 input\(s\).*got 2"):
        cm(*inputs, *inputs)
    with pytest.raises(InputError, match=r"must have shape \[4, 32\], got \[4, 31\]"):
        cm(torch.randn(4, 31))
    with pytest.raises(InputError, match="must have dtype f32"):
        cm(torch.randn(4, 32, dtype=torch.float64))
    with pytest.raises(InputError, match="must be a torch.Tensor"):
        cm([[1.0] * 32] * 4)


def test_unknown_target_and_recipe_are_value_errors():
    model, inputs = make_mlp()
    with pytest.raises(ValueError, match="unknown target 'tpu'; valid targets: reference"):
        presso.compile(model, target="tpu", example_inputs=inputs)
    with pytest.raises(PipelineError, match="unknown pass 'lowrnak'; registered passes: .*canonicalize"):
        presso.compile(model, example_inputs=inputs, recipe="canonicalize,lowrnak{ratio=0.5}")
    with pytest.raises(ValueError, match="has no option"):
        presso.compile(model, example_inputs=inputs, recipe="dce{aggressive=true}")
    with pytest.raises(ValueError, match="needs example_inputs"):
        presso.compile(model)
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        presso.compile(42)
