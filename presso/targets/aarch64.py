"""The ``aarch64`` target: TVM cross-compiles the graph for 64-bit Arm Linux (NEON); the code
runs on such a machine, so elsewhere a compiled model can only be saved."""
from __future__ import annotations

import platform

from .llvm import LLVMTarget

TRIPLE = "aarch64-linux-gnu"
CROSS_COMPILER = "aarch64-linux-gnu-gcc"


class AArch64Target(LLVMTarget):
    name = "aarch64"

    def machine(self):
        """A 4-core NEON machine, linked with the aarch64 cross toolchain."""
        from ..codegen.tvm import Machine
        return Machine(self.name, {"kind": "llvm", "mtriple": TRIPLE, "mattr": ["+neon"], "num-cores": 4},
                       {"arch": "aarch64", "features": []}, runs_here=self.runs_here(),
                       cross_compiler=CROSS_COMPILER, cross_hint="Debian: apt install gcc-aarch64-linux-gnu")

    def runs_here(self) -> bool:
        return platform.machine().lower() in ("aarch64", "arm64")

    def why_not_runnable(self) -> str:
        return "cannot run on this machine; save() it and load it on a 64-bit Arm Linux machine"
