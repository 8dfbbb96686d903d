"""The ``cuda`` target: Triton kernels on an NVIDIA GPU (or on the CPU under Triton's
interpreter). Its kernels are chosen in the IR (``select_kernels``: ``codegen/triton/select.py``
rewrites nodes into the ``cuda.*`` ops of ``ir/cuda_ops.py``); its code is a ``Program``
(``codegen/triton/program.py``: one launch per node), regenerated from the graph on load; an
artifact records the kernel each node runs."""
from __future__ import annotations

import json
from pathlib import Path

from ..deps import require
from .base import Target


class CudaTarget(Target):
    name = "cuda"
    supports_generation = True
    # horizontal, then elementwise fusion, then the kernel of every node
    default_passes = ("concat_linears", "fuse", "select_kernels{target=cuda}")

    def check_available(self) -> None:
        require("triton", "cuda", "target='cuda'")
        from ..runtime.cuda import cuda_device
        cuda_device()

    def select_kernels(self, graph):
        from ..codegen.triton.select import select_kernels
        return select_kernels(graph)

    def build(self, graph):
        """The program of ``graph``, its kernels selected in place first: a decode program built
        from a selected graph, or a graph saved before kernels were selected in the IR, has nodes
        the pipeline's ``select_kernels`` never saw (selecting again changes nothing else)."""
        from ..codegen.triton.program import build_program
        return build_program(graph)

    def runtime(self, graph, code, device="cpu"):
        from ..runtime.cuda import CudaRuntime
        return CudaRuntime(graph, code)

    def export(self, code, code_dir: Path) -> tuple[list[str], dict]:
        """``code/program.json``: the kernel each node runs (the sources are regenerated from the
        graph and cached by their hash)."""
        code_dir.mkdir(parents=True, exist_ok=True)
        (code_dir / "program.json").write_text(json.dumps(code.kernels, indent=1))
        return ["code/program.json"], {}
