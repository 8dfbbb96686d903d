"""Compile a presso graph with TVM for the host CPU (``llvm``) or 64-bit Arm Linux (``aarch64``)."""
from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from ...errors import CodegenError, TargetUnavailableError
from ...ir.graph import Graph
from .cpu import X86_ISA, cpu_flags, missing_cpu_features  # noqa: F401 (re-exported)

TVM_TARGETS = ("llvm", "aarch64")
AARCH64_TRIPLE = "aarch64-linux-gnu"
AARCH64_CC = "aarch64-linux-gnu-gcc"


def host_cpu_target() -> dict:
    """LLVM for this CPU (``mcpu``), so it uses every vector extension the host has."""
    from tvm.target import codegen
    try:
        cpu = codegen.llvm_get_system_cpu()
    except Exception:  # noqa: BLE001 - an LLVM without host detection: stay generic
        cpu = ""
    spec = {"kind": "llvm", "num-cores": len(os.sched_getaffinity(0))}
    if cpu and cpu != "generic":
        spec["mcpu"] = cpu
    return spec


def cpu_requirements(name: str) -> dict:
    """What the code compiled for target ``name`` needs of the CPU that runs it."""
    if name == "aarch64":
        return {"arch": "aarch64", "features": []}
    return {"arch": platform.machine(), "mcpu": host_cpu_target().get("mcpu", "generic"),
            "features": sorted(cpu_flags() & set(X86_ISA))}


def target_spec(name: str) -> dict:
    if name == "llvm":
        return host_cpu_target()
    if name == "aarch64":
        return {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mattr": ["+neon"], "num-cores": 4}
    raise CodegenError(f"unknown TVM target {name!r}; valid: {', '.join(TVM_TARGETS)}")


def target_for(name: str):
    import tvm
    return tvm.target.Target(target_spec(name))


def can_run_here(name: str) -> bool:
    machine = platform.machine().lower()
    return name == "llvm" or (name == "aarch64" and machine in ("aarch64", "arm64"))


@dataclass
class TVMBuild:
    """A compiled module: the VM executable and the prepacked params it takes after the inputs."""
    target: str
    executable: object
    params: list            # [(name, numpy array)] in argument order

    @property
    def requires(self) -> dict:
        return cpu_requirements(self.target)

    def export(self, path: Path) -> Path:
        """Write the shared library (cross-linked with the aarch64 toolchain for ``aarch64``)."""
        path = Path(path)
        if self.target == "aarch64":
            cc = shutil.which(AARCH64_CC)
            if cc is None:
                raise TargetUnavailableError(f"exporting for aarch64 needs the cross compiler {AARCH64_CC} "
                                             "(Debian: apt install gcc-aarch64-linux-gnu)")
            from tvm.support import cc as tvm_cc
            self.executable.export_library(str(path), fcompile=tvm_cc.cross_compiler(cc))
        else:
            self.executable.export_library(str(path))
        return path


def build(graph: Graph, target: str = "llvm", tune: bool = True) -> TVMBuild:
    """Lower, schedule and compile ``graph``; ``tune=False`` keeps TVM's unscheduled loops
    (slow; for checking the schedules against)."""
    import tvm
    from .lower import lower
    from .schedule import cpu_pipeline
    lowered = lower(graph, target_spec(target))
    tgt = target_for(target)
    try:
        ex = tvm.compile(lowered.mod, target=tgt, relax_pipeline=cpu_pipeline(tgt, tune))
    except Exception as e:  # noqa: BLE001 - surface TVM's message under a presso error type
        raise CodegenError(f"TVM could not compile graph @{graph.name} for {target}: {e}") from e
    return TVMBuild(target, ex, lowered.params)


def load_library(graph: Graph, target: str, path: Path) -> TVMBuild:
    """A build from a library written by ``TVMBuild.export``: the code is loaded, not recompiled;
    the weights are prepacked again from the graph's params (the same deterministic layout)."""
    import tvm
    from .lower import Lowering
    if not can_run_here(target):
        raise TargetUnavailableError(f"code for {target} cannot run on this {platform.machine()} machine")
    params = Lowering(graph, target_spec(target)).plan()
    return TVMBuild(target, tvm.runtime.load_module(str(path)), params)
