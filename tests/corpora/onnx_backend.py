"""ONNX's own backend test data as a corpus: the model + input/output protobufs that ship inside
the onnx wheel (``onnx/backend/test/data/{pytorch-converted,pytorch-operator,simple}``), and the
light model zoo (``onnx/backend/test/data/light``: opset-9 CNNs, upgraded at import).

Each backend case is compiled with ``presso.compile`` (reference target) and its outputs are
compared with the outputs stored next to the model. The light-zoo models are compared with
onnxruntime on one random input (their stored output belongs to an input that is not shipped).

``python -m tests.corpora.onnx_backend`` prints every case's outcome (``--light`` adds the zoo).
"""
from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import presso

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
BACKEND_DIRS = ("pytorch-converted", "pytorch-operator", "simple")
# The stored outputs were computed by other runtimes (PyTorch, numpy) in float32. presso's reference
# runs the same ops in float32 through torch, but a reduction or convolution may sum in another
# order (oneDNN vs the exporter's kernels), which moves the last few bits: rtol 1e-4 with an atol
# of 1e-5 for values near zero allows that and nothing more (a wrong op is off by far more).
RTOL, ATOL = 1e-4, 1e-5
# The light zoo's CNNs chain 8-121 convolutions on random weights; float32 rounding differences
# between onnxruntime's MLAS kernels and torch's oneDNN ones grow with depth, so the error is
# measured relative to the output's largest magnitude. Measured: at most 5e-6 (DenseNet-121,
# Inception-v2); 1e-4 leaves a 20x margin and still fails any wrong op.
LIGHT_RTOL = 1e-4


@dataclass
class Outcome:
    case: str
    status: str     # "pass" | "mismatch" | "error" | "skipped (dtype)"
    detail: str = ""


def backend_cases(dirs=BACKEND_DIRS) -> list[str]:
    return sorted(d for sub in dirs for d in glob.glob(os.path.join(DATA, sub, "*")) if os.path.isdir(d))


def _load_pb(path) -> np.ndarray:
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


def _unrepresentable(model: onnx.ModelProto) -> str | None:
    """A graph input/output dtype that presso has no type for (strings, complex): such a case
    is left out of the denominator, since no importer could produce it."""
    for vi in list(model.graph.input) + list(model.graph.output):
        et = vi.type.tensor_type.elem_type
        if et in (onnx.TensorProto.STRING, onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
            return onnx.TensorProto.DataType.Name(et)
    return None


def _as_list(out):
    return list(out) if isinstance(out, tuple) else [out]


def _compare(got, want, rtol, atol) -> str | None:
    got = got.detach().cpu()
    want = torch.from_numpy(np.array(want))
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != {want.dtype}"
    if want.dtype == torch.bool or not want.is_floating_point():
        return None if torch.equal(got, want) else "values differ"
    if not torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        err = (got.double() - want.double()).abs().max().item()
        return f"max abs err {err:.3g}"
    return None


def run_case(case_dir: str) -> Outcome:
    name = os.path.relpath(case_dir, DATA)
    model = onnx.load(os.path.join(case_dir, "model.onnx"))
    bad = _unrepresentable(model)
    if bad:
        return Outcome(name, "skipped (dtype)", bad)
    try:
        cm = presso.compile(model)
    except Exception as e:  # noqa: BLE001 - every failure is an outcome to report
        return Outcome(name, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    for ds in sorted(glob.glob(os.path.join(case_dir, "test_data_set_*"))):
        n_in = len(glob.glob(os.path.join(ds, "input_*.pb")))
        n_out = len(glob.glob(os.path.join(ds, "output_*.pb")))
        ins = [torch.from_numpy(np.array(_load_pb(os.path.join(ds, f"input_{i}.pb")))) for i in range(n_in)]
        wants = [_load_pb(os.path.join(ds, f"output_{i}.pb")) for i in range(n_out)]
        try:
            gots = _as_list(cm(*ins))
        except Exception as e:  # noqa: BLE001
            return Outcome(name, "error", f"run: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        if len(gots) != len(wants):
            return Outcome(name, "mismatch", f"{len(gots)} outputs, expected {len(wants)}")
        for k, (g, w) in enumerate(zip(gots, wants)):
            why = _compare(g, w, RTOL, ATOL)
            if why:
                return Outcome(name, "mismatch", f"{os.path.basename(ds)} output {k}: {why}")
    return Outcome(name, "pass")


def run_backend(dirs=BACKEND_DIRS) -> list[Outcome]:
    return [run_case(d) for d in backend_cases(dirs)]


def light_models() -> list[str]:
    return sorted(glob.glob(os.path.join(DATA, "light", "*.onnx")))


def randomize_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The light models store every weight as ``ConstantOfShape(0.02)``, which makes every channel
    alike and the output a uniform softmax whatever the importer does. Each such weight becomes
    random, built in the graph itself with opset-9 ops so that the model stays small (a VGG's
    143M weights would cost a minute to serialize) and still goes through presso's opset upgrade:
    a kernel of shape [N, *rest] is reshape(a b^T + c d^T) of random vectors a, c [N, 1] and
    b, d [1, prod(rest)] (He-scaled: each output channel is its own mix of two random filters), a
    per-channel vector is random in [0.5, 1.5) so that BatchNormalization variances stay positive.
    The logits feeding the final Softmax become an extra output, so that the comparison sees
    every op's numbers and not only a saturated softmax."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    nodes = []

    def const(name, arr):
        nodes.append(onnx.helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.ascontiguousarray(arr, dtype=np.float32), name)))
        return name

    for k, node in enumerate(m.graph.node):
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            nodes.append(node)
            continue
        shape = [int(d) for d in inits[node.input[0]]]
        out = node.output[0]
        if len(shape) < 2:
            const(out, rng.uniform(0.5, 1.5, shape))
            continue
        n, rest = shape[0], int(np.prod(shape[1:]))
        scale = np.sqrt(1.0 / rest)
        a, c = const(f"rw{k}_a", rng.standard_normal((n, 1))), const(f"rw{k}_c", rng.standard_normal((n, 1)))
        b = const(f"rw{k}_b", rng.standard_normal((1, rest)) * scale)
        d = const(f"rw{k}_d", rng.standard_normal((1, rest)) * scale)
        nodes += [onnx.helper.make_node("Mul", [a, b], [f"rw{k}_ab"]),
                  onnx.helper.make_node("Mul", [c, d], [f"rw{k}_cd"]),
                  onnx.helper.make_node("Add", [f"rw{k}_ab", f"rw{k}_cd"], [f"rw{k}_sum"]),
                  onnx.helper.make_node("Reshape", [f"rw{k}_sum", node.input[0]], [out])]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    last = m.graph.node[-1]
    if last.op_type == "Softmax" and last.output[0] == m.graph.output[0].name:
        logits = onnx.ValueInfoProto()
        logits.CopyFrom(m.graph.output[0])
        logits.name = last.input[0]
        m.graph.output.append(logits)
    return m


def run_light(path: str, seed: int = 0) -> Outcome:
    """Compile one light-zoo model (random weights, see ``randomize_weights``) and compare all
    its outputs with onnxruntime's on a random input."""
    import onnxruntime as ort
    name = os.path.basename(path)
    model = randomize_weights(onnx.load(path), seed)
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    try:
        cm = presso.compile(model)
        got = _as_list(cm(torch.from_numpy(x)))
    except Exception as e:  # noqa: BLE001
        return Outcome(name, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    wants = sess.run(None, {inp.name: x})
    if len(got) != len(wants):
        return Outcome(name, "mismatch", f"{len(got)} outputs, onnxruntime gives {len(wants)}")
    worst = 0.0
    for k, (g, w) in enumerate(zip(got, wants)):
        g = g.detach().double()
        w = torch.from_numpy(w).double()
        if tuple(g.shape) != tuple(w.shape):
            return Outcome(name, "mismatch", f"output {k}: shape {tuple(g.shape)} != {tuple(w.shape)}")
        if w.std().item() < 1e-6 * max(w.abs().max().item(), 1e-30):
            return Outcome(name, "mismatch", f"output {k} is constant: the comparison would not test anything")
        rel = ((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
        if not rel <= LIGHT_RTOL:
            return Outcome(name, "mismatch", f"output {k}: max err / max |ref| = {rel:.3g}")
        worst = max(worst, rel)
    return Outcome(name, "pass", f"max err / max |ref| = {worst:.2g}")


def summary(outcomes: list[Outcome]) -> tuple[int, int]:
    """(passed, denominator): cases skipped for an unrepresentable dtype are not counted."""
    counted = [o for o in outcomes if not o.status.startswith("skipped")]
    return sum(o.status == "pass" for o in counted), len(counted)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    outcomes = run_backend()
    for sub in BACKEND_DIRS:
        part = [o for o in outcomes if o.case.startswith(sub + os.sep)]
        p, n = summary(part)
        print(f"{sub}: {p}/{n}")
    for o in outcomes:
        if o.status != "pass":
            print(f"  {o.status:16s} {o.case}: {o.detail}")
    p, n = summary(outcomes)
    print(f"backend total: {p}/{n} ({100.0 * p / max(n, 1):.1f}%)")
    if "--light" in argv:
        light = [run_light(m) for m in light_models()]
        for o in light:
            print(f"  {o.status:16s} {o.case} {o.detail}")
        print(f"light zoo: {sum(o.status == 'pass' for o in light)}/{len(light)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
