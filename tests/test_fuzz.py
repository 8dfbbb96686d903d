"""Bounded-time fuzzing: mutated IR text, ONNX protobuf bytes and artifact manifests either load or
fail with a presso error (a subclass of PressoError), never anything else. Each target runs for
a fixed time budget (seeded, so a failure reproduces), about 11 s in all."""
import json
import random
import shutil
import time
import warnings

import pytest
import torch

import presso
from presso.errors import PressoError
from presso.models import make_mlp

BUDGET_S = 3.5
_TOKENS = ["%", "@", "[", "]", "{", "}", "(", ")", ",", ":", "=", "*", "_", '"', "\\", "-", "0", "9",
           "99999999999999999999999", "-1", "f32", "i64", "i4", "batch", "inf", "nan", "linear", "softmax",
           "axis=", "return", "param", "\n", " ", "\x00", "é"]


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model, inputs = make_mlp()
    return model, inputs, presso.compile(model, example_inputs=inputs, recipe="quantize{weights=int4,group_size=32}")


def _fuzz(budget_s, make_case, run_case):
    """Run mutated cases until the budget is spent; returns (cases, how many were accepted).
    Anything but a PressoError fails the test, naming the case's seed."""
    deadline, n, accepted = time.monotonic() + budget_s, 0, 0
    while time.monotonic() < deadline:
        rng = random.Random(n)
        case = make_case(rng)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_case(case)
            accepted += 1
        except PressoError:
            pass
        except Exception as e:  # noqa: BLE001 - the bug this test exists to catch
            pytest.fail(f"case {n} raised {type(e).__name__}: {str(e)[:300]}")
        n += 1
    return n, accepted


def _mutate_text(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(text))
        kind = rng.randrange(5)
        if kind == 0:
            text = text[:i] + text[i + rng.randint(1, 8):]                       # delete
        elif kind == 1:
            text = text[:i] + rng.choice(_TOKENS) + text[i:]                      # insert a token
        elif kind == 2:
            j = rng.randrange(len(text))
            text = text[:i] + text[j:j + rng.randint(1, 20)] + text[i:]           # duplicate a span
        elif kind == 3:
            lines = text.split("\n")
            rng.shuffle(lines)
            text = "\n".join(lines) if rng.random() < 0.2 else text               # reorder lines
        else:
            text = text[:i] + str(rng.choice([0, -1, 2 ** 63, 10 ** 30, 3])) + text[i + 1:]
    return text


def test_fuzz_ir_text(mlp):
    text = str(mlp[2].graph)
    weights = {n: p.data for n, p in mlp[2].graph.params.items()}

    def run(case):
        presso.parse(case, weights=weights if random.Random(len(case)).random() < 0.5 else None)
    n, accepted = _fuzz(BUDGET_S, lambda rng: _mutate_text(text, rng), run)
    assert n > 200 and accepted < n


def _onnx_model() -> bytes:
    """A small ONNX graph with weights, shape ops and attributes (axes, perms, epsilons)."""
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(torch.randn(8, 16).numpy(), "w")
    b = numpy_helper.from_array(torch.randn(16).numpy(), "b")
    shape = numpy_helper.from_array(torch.tensor([2, 4, 4]).numpy(), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["lin"]),
             helper.make_node("Relu", ["lin"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["rs"]),
             helper.make_node("Transpose", ["rs"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Softmax", ["t"], ["s"], axis=-1),
             helper.make_node("LayerNormalization", ["s", "g"], ["y"], axis=-1, epsilon=1e-5),
             helper.make_node("Concat", ["y", "y"], ["c"], axis=1)]
    gamma = numpy_helper.from_array(torch.ones(4).numpy(), "g")
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 8, 4])],
                              initializer=[w, b, shape, gamma])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_fuzz_onnx_bytes():
    data = _onnx_model()
    presso.from_onnx(data)          # the unmutated model imports

    def make(rng):
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(b))
            kind = rng.randrange(3)
            if kind == 0:
                b[i] = rng.randrange(256)                         # flip a byte
            elif kind == 1:
                del b[i:i + rng.randint(1, 16)]                    # cut
            else:
                b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        return bytes(b)
    n, accepted = _fuzz(BUDGET_S, make, presso.from_onnx)
    assert n > 50 and accepted < n


def _mutate_json(v, rng: random.Random, depth=0):
    """A copy of ``v`` with one random value replaced by a hostile one."""
    hostile = [10 ** 30, -1, 2 ** 64, 1.5, float("nan"), True, None, "", "x" * 100, [], {}, [[[[1]]]],
               {"a": {"b": {"c": [1, 2]}}}, "../outside", "/etc/passwd", "0" * 64]
    if isinstance(v, dict) and v and rng.random() < 0.85:
        k = rng.choice(sorted(v))
        out = dict(v)
        if rng.random() < 0.1:
            del out[k]
        else:
            out[k] = _mutate_json(v[k], rng, depth + 1)
        return out
    if isinstance(v, list) and v and rng.random() < 0.85:
        i = rng.randrange(len(v))
        return v[:i] + [_mutate_json(v[i], rng, depth + 1)] + v[i + 1:]
    return rng.choice(hostile)


def test_fuzz_artifact_manifests(mlp, tmp_path):
    src = mlp[2].save(tmp_path / "good.presso")
    manifest = json.loads((src / "manifest.json").read_text())
    target = tmp_path / "fuzzed.presso"
    shutil.copytree(src, target)
    x = mlp[1][0]

    def make(rng):
        return json.dumps(_mutate_json(manifest, rng))

    def run(body):
        (target / "manifest.json").write_text(body)
        cm = presso.load(target)
        cm(x)
        cm.report()
    n, accepted = _fuzz(BUDGET_S, make, run)
    assert n > 30 and accepted < n
