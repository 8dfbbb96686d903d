"""Lazy imports: ``import presso`` and the CLI's light paths load none of the heavy optional
packages (their timings are in benchmarks/import_time.py, not in timed tests)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (triton and tqdm are not checked: torch itself imports them, through torch._dynamo and torch.hub)
HEAVY = ("onnx", "onnxruntime", "tvm", "transformers", "networkx", "onnxscript")


def loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_import_presso_and_cli_help_load_no_optional_package():
    assert loaded_after("import presso") == []
    help_ = ("import contextlib, io\nfrom presso.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
             "    main(['--help'])\nassert 'inspect' in out.getvalue()")
    assert loaded_after(help_) == []


def test_heavy_packages_load_on_first_use(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes = [helper.make_node("Add", ["one", "one"], ["two"]), helper.make_node("Mul", ["x", "two"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [one]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "fold.onnx"))
    code = ("import torch, presso\nfrom presso.ir import parse\n"
            "g = parse('graph @g(%x: f32[2, 3]) {\\n  %y: f32[2, 3] = aten.acos(%x)\\n  return %y\\n}')\n"
            "x = torch.rand(2, 3)\n"
            "assert torch.equal(presso.compile(g)(x), torch.acos(x))\n"   # an ATen op registers on first use
            "assert callable(presso.from_onnx) and callable(presso.frontend.from_onnx)\n"
            "import presso.frontend.onnx_frontend")
    # reading ONNX needs onnx's protobuf classes and checker only (tests/test_onnx_proto.py) ...
    assert loaded_after(code) == []
    # ... and the whole package where it folds constants with onnx's reference evaluator
    fold = f"\nx = torch.rand(3)\nassert torch.equal(presso.compile({str(tmp_path / 'fold.onnx')!r})(x), x * 2)"
    assert loaded_after(code + fold) == ["onnx"]


def test_a_missing_optional_package_names_the_extra_that_installs_it():
    code = ("import sys\nsys.modules['tvm'] = None; sys.modules['onnx'] = None   # as if not installed\n"
            "import presso\nfrom presso.errors import MissingDependencyError\nfrom presso.models import make_mlp\n"
            "m, x = make_mlp()\n"
            "for call, want in ((lambda: presso.compile(m, example_inputs=x, target='llvm'),\n"
            "                   \"target='llvm' needs the 'tvm' package, which is not installed: pip install 'presso[tvm]'\"),\n"
            "                  (lambda: presso.compile('model.onnx'), \"an ONNX model needs the 'onnx' package\"),\n"
            "                  (lambda: presso.from_onnx, \"pip install 'presso[onnx]'\")):\n"
            "    try:\n        call()\n    except MissingDependencyError as e:\n"
            "        assert want in str(e) and isinstance(e, ImportError), e\n"
            "    else:\n        raise AssertionError(want)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
