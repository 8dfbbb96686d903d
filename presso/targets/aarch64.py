"""The ``aarch64`` target: TVM cross-compiles the graph for 64-bit Arm Linux (NEON); the code
runs on such a machine, so elsewhere a compiled model can only be saved."""
from __future__ import annotations

from .llvm import LLVMTarget


class AArch64Target(LLVMTarget):
    name = "aarch64"

    def why_not_runnable(self) -> str:
        return "cannot run on this machine; save() it and load it on a 64-bit Arm Linux machine"
