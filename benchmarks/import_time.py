"""Start-up cost: ``import torch``, ``import presso``, ``presso --help`` and ``presso inspect`` of a
small ONNX file, each in a fresh interpreter, wall-clock seconds (median of several runs).

The runs are interleaved (one of each per round), so that other load on the machine falls on
all of them alike; besides wall-clock time each run's CPU time (user + system, of the process and
its children) is reported, which other load on a shared machine disturbs much less. Targets
(issue 26): ``import presso`` <= ``import torch`` + 0.5 s, and the two CLI calls <= 1.5x
``import torch``.

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


def timed(args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh interpreter running ``args``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{args} exited with {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


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
            timed(args)
        walls = {k: [] for k in cases}
        cpus = {k: [] for k in cases}
        for _ in range(a.runs):
            for k, args in cases.items():
                w, c = timed(args)
                walls[k].append(w)
                cpus[k].append(c)
    wall = {k: statistics.median(v) for k, v in walls.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}

    def rel(med, k):
        base = med["import torch"]
        return "1.00x" if k == "import torch" else f"{med[k] / base:.2f}x (+{med[k] - base:.2f} s)"

    print(f"{cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; median of {a.runs} runs; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| command | wall s (min-max) | wall vs import torch | CPU s | CPU vs import torch |")
    print("|---|---|---|---|---|")
    for k in cases:
        print(f"| `{k}` | {wall[k]:.2f} ({min(walls[k]):.2f}-{max(walls[k]):.2f}) | {rel(wall, k)} | "
              f"{cpu[k]:.2f} | {rel(cpu, k)} |")


if __name__ == "__main__":
    main()
