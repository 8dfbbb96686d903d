"""Start-up cost: ``import torch``, ``import presso``, ``presso --help`` and ``presso inspect`` of a
small ONNX file, each in a fresh interpreter, wall-clock seconds (median of several runs).

The runs are interleaved (one of each per round), so that other load on the machine falls on
all of them alike. Targets (issue 26): ``import presso`` <= ``import torch`` + 0.5 s, and the two
CLI calls <= 1.5x ``import torch``.

    python benchmarks/import_time.py [--runs 7]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = "import sys; from presso.cli import main; sys.exit(main())"   # what the `presso` script runs


def small_onnx(path: Path) -> None:
    """A two-layer MLP as an ONNX file (built with onnx.helper: no export in the timed runs)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 32)), ("b1", (32,)), ("w2", (32, 8)), ("b2", (8,)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def wall(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "mlp.onnx"
        small_onnx(model)
        cases = {"import torch": ["-c", "import torch"],
                 "import presso": ["-c", "import presso"],
                 "presso --help": ["-c", CLI, "--help"],
                 "presso inspect mlp.onnx": ["-c", CLI, "inspect", str(model)]}
        for args in cases.values():          # warm the file cache and __pycache__ once
            wall(args)
        times = {k: [] for k in cases}
        for _ in range(a.runs):
            for k, args in cases.items():
                times[k].append(wall(args))
    med = {k: statistics.median(v) for k, v in times.items()}
    torch_s = med["import torch"]
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; median of {a.runs} runs")
    print("| command | median s | min s | max s | vs import torch |")
    print("|---|---|---|---|---|")
    for k, v in times.items():
        rel = "1.00x" if k == "import torch" else f"{med[k] / torch_s:.2f}x (+{med[k] - torch_s:.2f} s)"
        print(f"| `{k}` | {med[k]:.2f} | {min(v):.2f} | {max(v):.2f} | {rel} |")


if __name__ == "__main__":
    main()
