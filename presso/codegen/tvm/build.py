"""Compile a presso graph with TVM for a ``Machine``: the host CPU, or a cross-compiled one (what
the TVM targets in ``presso/targets/`` describe)."""
from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ...errors import CodegenError, TargetUnavailableError
from ...ir.graph import Graph
from .cpu import X86_ISA, cpu_flags  # noqa: F401 (cpu_flags re-exported)



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


def host_requirements() -> dict:
    """What code compiled with ``-mcpu=<this host>`` may need of the CPU that runs it."""
    return {"arch": platform.machine(), "mcpu": host_cpu_target().get("mcpu", "generic"),
            "features": sorted(cpu_flags() & set(X86_ISA))}


@dataclass(frozen=True)
class Machine:
    """What TVM compiles for, as a target describes it (``presso/targets/llvm.py``, ``aarch64.py``):
    the presso target's name, TVM's LLVM target spec, what the code needs of the CPU that runs
    it, whether this machine can run it, and the cross compiler that links it elsewhere."""
    name: str
    spec: dict
    requires: dict
    runs_here: bool = True
    cross_compiler: Optional[str] = None       # linker for the shared library (None: TVM's default)
    cross_hint: str = ""                       # how to install it


def machine_for(target) -> Machine:
    """``target`` as a ``Machine``: one already, or a target name looked up in ``presso.targets``."""
    if isinstance(target, Machine):
        return target
    from ...targets import get_target
    t = get_target(target)
    if not hasattr(t, "machine"):
        raise CodegenError(f"target {target!r} is not compiled by TVM")
    return t.machine()


@dataclass
class TVMBuild:
    """A compiled module: the VM executable and the prepacked params it takes after the inputs."""
    machine: Machine
    executable: object
    params: list            # [(name, numpy array)] in argument order
    source_graph: object = None     # the graph compiled (the target keeps it for the decode program)
    decode: dict = field(default_factory=dict)   # the decode program's builds, by graph digest

    @property
    def target(self) -> str:
        return self.machine.name

    @property
    def requires(self) -> dict:
        return self.machine.requires

    def export(self, path: Path) -> Path:
        """Write the shared library (cross-linked when the machine names a cross compiler)."""
        path = Path(path)
        cc_name = self.machine.cross_compiler
        if cc_name is not None:
            cc = shutil.which(cc_name)
            if cc is None:
                raise TargetUnavailableError(f"exporting for {self.target} needs the cross compiler {cc_name}"
                                             f"{f' ({self.machine.cross_hint})' if self.machine.cross_hint else ''}",
                                             target=self.target)
            from tvm.support import cc as tvm_cc
            self.executable.export_library(str(path), fcompile=tvm_cc.cross_compiler(cc))
        else:
            self.executable.export_library(str(path))
        return path


def build(graph: Graph, target="llvm", tune: bool = True) -> TVMBuild:
    """Lower, schedule and compile ``graph`` for ``target`` (a ``Machine`` or a TVM target's
    name); ``tune=False`` keeps TVM's unscheduled loops (slow; for checking the schedules against)."""
    import tvm
    from .lower import lower
    from .schedule import cpu_pipeline
    machine = machine_for(target)
    lowered = lower(graph, machine.spec)
    tgt = tvm.target.Target(machine.spec)
    try:
        ex = tvm.compile(lowered.mod, target=tgt, relax_pipeline=cpu_pipeline(tgt, tune))
    except Exception as e:  # noqa: BLE001 - surface TVM's message under a presso error type
        raise CodegenError(f"TVM could not compile graph @{graph.name} for {machine.name}: {e}") from e
    return TVMBuild(machine, ex, lowered.params)


def load_library(graph: Graph, target, path: Path) -> TVMBuild:
    """A build from a library written by ``TVMBuild.export``: the code is loaded, not recompiled;
    the weights are prepacked again from the graph's params (the same deterministic layout)."""
    import tvm
    from .lower import Lowering
    machine = machine_for(target)
    if not machine.runs_here:
        raise TargetUnavailableError(f"code for {machine.name} cannot run on this {platform.machine()} machine",
                                     target=machine.name)
    params = Lowering(graph, machine.spec).plan()
    return TVMBuild(machine, tvm.runtime.load_module(str(path)), params)
