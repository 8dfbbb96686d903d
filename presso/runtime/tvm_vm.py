"""Runs a TVM-compiled presso graph through TVM's Relax VM, with torch tensors in and out."""
from __future__ import annotations

import torch

from ..config import use_all_cores_for_tvm
from ..ir.graph import Graph
from ..ir.interpret import bind_inputs


class TVMRuntime:
    """Holds the VM and the prepacked weights; ``run(*inputs)`` returns torch tensors."""

    def __init__(self, graph: Graph, executable, params):
        use_all_cores_for_tvm()
        import tvm
        from tvm import relax
        self.graph = graph
        self._tvm = tvm
        self.vm = relax.VirtualMachine(executable, tvm.cpu())
        self._main = self.vm["main"]
        self._params = [tvm.runtime.tensor(arr) for _, arr in params]

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        bind_inputs(self.graph, args)
        ins = [self._to_tvm(a.detach().contiguous()) for a in args]
        out = self._main(*ins, *self._params)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return [torch.from_dlpack(o) for o in outs]

    def _to_tvm(self, t: torch.Tensor):
        """Zero-copy when TVM's 64-byte alignment holds, a copy otherwise."""
        if t.data_ptr() % 64 == 0:
            return self._tvm.runtime.from_dlpack(t)
        return self._tvm.runtime.tensor(t.numpy())

    __call__ = run
