"""The reference runtime: executes any valid graph with the ops' torch reference implementations.
It is the oracle every pass and kernel is checked against."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InputError
from ..ir.graph import Graph, Value
from ..ir.registry import get_op
from ..ir.types import symbols_of


def bind_inputs(g: Graph, args: Sequence[torch.Tensor]) -> dict[str, int]:
    """Check inputs against the graph signature and return the sizes of its symbolic dims."""
    if len(args) != len(g.inputs):
        sig = ", ".join(f"%{v.name}: {v.type}" for v in g.inputs)
        raise InputError(f"graph @{g.name} takes {len(g.inputs)} input(s) ({sig}), got {len(args)}")
    bindings: dict[str, int] = {}
    for v, a in zip(g.inputs, args):
        if not isinstance(a, torch.Tensor):
            raise InputError(f"input %{v.name} must be a torch.Tensor, got {type(a).__name__}")
        if a.dtype != v.type.dtype.torch:
            raise InputError(f"input %{v.name} must have dtype {v.type.dtype} ({v.type.dtype.torch}), got {a.dtype}")
        if a.dim() != v.type.rank:
            raise InputError(f"input %{v.name} must have shape {list(v.type.shape)} (rank {v.type.rank}), "
                             f"got {list(a.shape)}")
        for i, (d, n) in enumerate(zip(v.type.shape, a.shape)):
            if isinstance(d, int):
                if d != n:
                    raise InputError(f"input %{v.name} must have shape {list(v.type.shape)}, got {list(a.shape)} "
                                     f"(dim {i} is {n}, expected {d})")
                continue
            syms = symbols_of(d)
            if len(syms) == 1:
                if bindings.setdefault(d, n) != n:
                    raise InputError(f"input %{v.name} dim {i} ('{d}') is {n}, but '{d}' is {bindings[d]} "
                                     "in an earlier input")
    return bindings


def bind_results(values, tensors, bindings: dict) -> None:
    """Sizes that depend on data (nonzero, unique): the symbols a node declares, bound as it runs."""
    for v, t in zip(values, tensors):
        for d, n in zip(v.type.shape, t.shape):
            if isinstance(d, str) and len(symbols_of(d)) == 1 and d not in bindings:
                bindings[d] = n


class ReferenceRuntime:
    """Runs a graph node by node, freeing intermediates after their last use."""

    def __init__(self, graph: Graph, device: str | torch.device = "cpu"):
        self.graph = graph
        self.device = torch.device(device)
        self._params = {name: p.data.to(self.device) for name, p in graph.params.items()}
        last = {}
        for i, n in enumerate(graph.nodes):
            for v in n.inputs:
                if v is not None:
                    last[v] = i
        self._free_after = [[] for _ in graph.nodes]
        keep = set(graph.outputs)
        for v, i in last.items():
            if v.kind == "node" and v not in keep:
                self._free_after[i].append(v)
        self._opdefs = [get_op(n.op) for n in graph.nodes]

    def run(self, *args: torch.Tensor, observer=None, overrides=None) -> list[torch.Tensor]:
        """Execute; ``observer(node, inputs, outputs)`` sees every node (calibration hooks in);
        ``overrides`` (param name -> tensor) substitutes parameters for this run only."""
        g = self.graph
        bindings = bind_inputs(g, args)
        env: dict[Value, torch.Tensor] = {v: a.to(self.device) for v, a in zip(g.inputs, args)}
        for name, t in self._params.items():
            env[g.params[name].value] = t
        for name, t in (overrides or {}).items():
            env[g.params[name].value] = t.to(self.device)
        with torch.no_grad():
            for i, (n, opdef) in enumerate(zip(g.nodes, self._opdefs)):
                ins = [None if v is None else env[v] for v in n.inputs]
                outs = opdef.run(ins, n.attrs, bindings)
                if opdef.dynamic_shape:
                    bind_results(n.outputs, outs, bindings)
                if observer is not None:
                    observer(n, ins, outs)
                for v, t in zip(n.outputs, outs):
                    env[v] = t
                for v in self._free_after[i]:
                    env.pop(v, None)
        return [env[v] for v in g.outputs]

    __call__ = run


def run_graph(g: Graph, *args: torch.Tensor, device="cpu") -> list[torch.Tensor]:
    return ReferenceRuntime(g, device).run(*args)
