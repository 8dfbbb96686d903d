"""The IR's semantics: executing a graph with the ops' torch reference implementations.

``ReferenceRuntime`` runs any valid graph node by node; it is the oracle every pass and kernel is
checked against, the ``reference`` target's runtime, and what passes run to calibrate and check
numbers. ``bind_inputs`` checks inputs against a graph's signature for every runtime."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import InputError, TargetUnavailableError
from .graph import Graph, Value
from .registry import get_op
from .types import eval_dim, symbols_of


def bind_inputs(g: Graph, args: Sequence[torch.Tensor]) -> dict[str, int]:
    """Check inputs against the graph signature and return the sizes of its symbolic dims."""
    if len(args) != len(g.inputs):
        sig = ", ".join(f"%{v.name}: {v.type}" for v in g.inputs)
        raise InputError(f"graph @{g.name} takes {len(g.inputs)} input(s) ({sig}), got {len(args)}")
    bindings: dict[str, int] = {}
    composite = []      # (value, dim index, dim, size) of dims such as 2*batch or batch*seq
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
            if symbols_of(d) != [d]:
                composite.append((v, i, d, n))
            elif bindings.setdefault(d, n) != n:
                raise InputError(f"input %{v.name} dim {i} ('{d}') is {n}, but '{d}' is {bindings[d]} "
                                 "in an earlier input")
    _bind_composite(composite, bindings)
    _check_lookup_ids(g, args, bindings)
    return bindings


_LOOKUPS = {"gather": lambda n: n.attrs["axis"], "aten.embedding": lambda n: 0,
            "aten.embedding.default": lambda n: 0}


def _check_lookup_ids(g: Graph, args: Sequence[torch.Tensor], bindings: Mapping[str, int]) -> None:
    """Ids a graph input feeds straight into a table lookup (token ids into an embedding) must
    index the table: out of range, the CPU kernels raise deep inside torch and GPU kernels assert
    or read out of bounds. Checked on CPU inputs only (on the GPU it would cost a sync per call)."""
    if not any(a.device.type == "cpu" and not a.is_floating_point() for a in args):
        return      # no CPU ids: the nodes are not even scanned (GPU decode steps call this every token)
    position = {v: i for i, v in enumerate(g.inputs)}
    for n in g.nodes:
        axis_of = _LOOKUPS.get(n.op)
        if axis_of is None or n.inputs[1] not in position:
            continue
        ids, table = args[position[n.inputs[1]]], n.inputs[0]
        if ids.device.type != "cpu" or ids.numel() == 0:
            continue
        axis = axis_of(n)
        size = eval_dim(table.type.shape[axis], bindings) if all(
            s in bindings for s in symbols_of(table.type.shape[axis])) else None
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (size is not None and hi >= size):
            valid = f"0..{size - 1}" if size is not None else ">= 0"
            raise InputError(f"input %{n.inputs[1].name} holds ids from {lo} to {hi}, but node %{n.name} ({n.op}) "
                             f"looks them up in %{table.name}: {table.type}, whose valid ids are {valid}")


def _bind_composite(composite: list, bindings: dict) -> None:
    """Check dims that are products (``2*batch``, ``batch*seq``) against the symbols bound so far;
    a product with one unbound symbol binds it (``2*batch`` = 6 gives batch = 3)."""
    pending = list(composite)
    while pending:
        progress = False
        for item in list(pending):
            v, i, d, n = item
            syms = symbols_of(d)
            unbound = sorted({s for s in syms if s not in bindings})
            if len(unbound) > 1 or (unbound and syms.count(unbound[0]) > 1):
                continue
            known = {s: bindings.get(s, 1) for s in syms}
            rest = eval_dim(d, known)
            if not unbound and rest != n:
                values = ", ".join(f"{s}={bindings[s]}" for s in dict.fromkeys(syms))
                raise InputError(f"input %{v.name} dim {i} is {n}, but '{d}' is {rest} ({values})")
            if unbound:
                if rest == 0 or n % rest:
                    raise InputError(f"input %{v.name} dim {i} ('{d}') is {n}, which is not a multiple of {rest}")
                bindings[unbound[0]] = n // rest
            pending.remove(item)
            progress = True
        if not progress:
            return


def bind_results(values, tensors, bindings: dict) -> None:
    """Sizes that depend on data (nonzero, unique): the symbols a node declares, bound as it runs."""
    for v, t in zip(values, tensors):
        for d, n in zip(v.type.shape, t.shape):
            if isinstance(d, str) and len(symbols_of(d)) == 1 and d not in bindings:
                bindings[d] = n


def runtime_device(device) -> torch.device:
    """``device`` as a torch device this machine has, or a typed error saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {device!r} is not a torch device such as 'cpu' or 'cuda:0' ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TargetUnavailableError(f"device {device!r}: this machine has no CUDA GPU (or torch was built "
                                     "without CUDA); use device='cpu'")
    if dev.type == "meta":
        raise InputError("device 'meta' holds no data: a compiled model runs on 'cpu' or 'cuda'")
    return dev


class ReferenceRuntime:
    """Runs a graph node by node, freeing intermediates after their last use."""

    def __init__(self, graph: Graph, device: str | torch.device = "cpu"):
        self.graph = graph
        self.device = runtime_device(device)
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
