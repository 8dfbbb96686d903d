"""The ``cuda`` target's runtime: runs a ``Program`` (``codegen/triton/program.py``) with the
params resident on the GPU, freeing each intermediate after its last use; ``capture`` records a
static-shape call (the decode step) as a CUDA graph and replays it with new inputs. Plain calls
are captured too once a shape repeats (``auto_graph``): replays cost one launch instead of one
Python-dispatched launch per node.

With ``TRITON_INTERPRET=1`` the same program runs on CPU tensors through Triton's interpreter:
slow, exact, and how CI runs whole models through the generated kernels.
"""
from __future__ import annotations

import torch

from ..config import triton_interpret
from ..errors import TargetUnavailableError
from ..ir.graph import Graph, Value
from ..ir.interpret import bind_inputs
from ..ir.registry import get_op


def cuda_device() -> torch.device:
    """The device the ``cuda`` target runs on: the GPU, or the CPU under Triton's interpreter."""
    if triton_interpret():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TargetUnavailableError(
            "target='cuda' needs an NVIDIA GPU, and torch sees none (torch.cuda.is_available() is False); "
            "to run the Triton kernels on this CPU, set TRITON_INTERPRET=1 before importing presso")
    return torch.device("cuda")


class CudaRuntime:
    def __init__(self, graph: Graph, program=None):
        from ..codegen.triton.program import build_program
        self.device = cuda_device()
        self.program = program or build_program(graph)
        self.graph = graph = self.program.graph
        prepared_at = [set(s.prepare[0]) if s.prepare else set() for s in self.program.steps]
        used = {v for s, skip in zip(self.program.steps, prepared_at) for j, v in enumerate(s.inputs) if j not in skip}
        self._params = {p.value: p.data.to(self.device) for p in graph.params.values() if p.value in used}
        host = {p.value: p.data for p in graph.params.values()}
        shared: dict = {}
        self._prepared = [self._prepare(s, host, shared) if s.prepare else {} for s in self.program.steps]
        last = {}
        for i, s in enumerate(self.program.steps):
            for v in s.inputs:
                if v is not None:
                    last[v] = i
        keep = set(graph.outputs)
        self._free_after = [[] for _ in self.program.steps]
        for v, i in last.items():
            if v.kind == "node" and v not in keep:
                self._free_after[i].append(v)
        self._graph_exec = None
        # plain calls: a shape seen AUTO_GRAPH_AFTER times is captured and replayed from then on,
        # unless the program writes into its inputs (a KV cache: the replay would update the
        # graph's copy, not the caller's tensor)
        self.auto_graph = not any(get_op(n.op).category == "state" for n in graph.nodes)
        self._auto: dict[tuple, _CudaGraph] = {}
        self._seen: dict[tuple, int] = {}

    def _prepare(self, step, host: dict, shared: dict) -> dict[int, object]:
        """The step's params in its kernel's layout, computed once on the device; a prepare with a
        ``key`` is computed once per (key, params) for all the steps reading those params."""
        positions, fn = step.prepare
        key = getattr(fn, "key", None)
        key = None if key is None else (key, tuple(step.inputs[j] for j in positions))
        if key not in shared:
            ins = [None if step.inputs[j] is None else host[step.inputs[j]].to(self.device) for j in positions]
            out = tuple(fn(*ins))
            if key is None:
                return dict(zip(positions, out))
            shared[key] = out
        return dict(zip(positions, shared[key]))

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if self._graph_exec is not None and self._graph_exec.matches(args):
            return self._graph_exec.replay(args)
        if self.auto_graph and self.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            sig = _signature(args)
            g = self._auto.get(sig)
            if g is None:
                seen = self._seen[sig] = self._seen.get(sig, 0) + 1
                if seen > AUTO_GRAPH_AFTER and len(self._auto) < MAX_AUTO_GRAPHS:
                    bind_inputs(self.graph, args)      # bad inputs fail here, as in a plain run
                    try:
                        g = self._auto[sig] = _CudaGraph(self, args)
                    except RuntimeError:               # a step that cannot be captured: stay eager
                        self._seen[sig] = -(1 << 30)
            if g is not None:                          # outputs copied out: the next replay rewrites its own
                return [t.clone() for t in g.replay(args)]
        return self._run_steps(args)

    __call__ = run

    def _run_steps(self, args) -> list[torch.Tensor]:
        """One run, step by step (Python launches each kernel)."""
        from ..codegen.triton.program import run_step
        bindings = bind_inputs(self.graph, args)
        env: dict[Value, torch.Tensor] = dict(self._params)
        for v, a in zip(self.graph.inputs, args):
            env[v] = a.to(self.device)
        self.program.begin_run()
        with torch.no_grad():
            for i, s in enumerate(self.program.steps):
                prep = self._prepared[i]
                ins = [prep[j] if j in prep else None if v is None else env[v] for j, v in enumerate(s.inputs)]
                for v, t in zip(s.outputs, run_step(s, ins, bindings)):
                    env[v] = t
                for v in self._free_after[i]:
                    env.pop(v, None)
        return [env[v] for v in self.graph.outputs]

    def captured(self, *args: torch.Tensor) -> bool:
        """Whether a call with these arguments' shapes and dtypes replays the recorded graph."""
        return self._graph_exec is not None and self._graph_exec.matches(args)

    def capture(self, *example: torch.Tensor) -> None:
        """Record one call at these input shapes as a CUDA graph; later calls with the same shapes
        and dtypes replay it (inputs are copied into the graph's static buffers)."""
        if self.device.type != "cuda":
            return
        self._graph_exec = None
        self._graph_exec = _CudaGraph(self, example)


AUTO_GRAPH_AFTER = 2        # plain calls at one input signature before it is captured
MAX_AUTO_GRAPHS = 4         # signatures captured per runtime (each holds its own memory pool)


def _signature(args) -> tuple:
    return tuple((tuple(a.shape), a.dtype) for a in args)


class _CudaGraph:
    def __init__(self, rt: CudaRuntime, example):
        self.static_in = [a.to(rt.device).clone() for a in example]
        self.sig = _signature(example)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):        # warm up: compile kernels, settle the allocator
                rt._run_steps(self.static_in)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = rt._run_steps(self.static_in)

    def matches(self, args) -> bool:
        return _signature(args) == self.sig

    def replay(self, args):
        for buf, a in zip(self.static_in, args):
            if a.data_ptr() != buf.data_ptr():       # a cache updated in place is already there
                buf.copy_(a, non_blocking=True)
        self.graph.replay()
        return list(self.static_out)
