"""The reference runtime, under its runtime-side name: the IR's own semantics (``ir/interpret.py``)."""
from ..ir.interpret import ReferenceRuntime, bind_inputs, bind_results, run_graph, runtime_device

__all__ = ["ReferenceRuntime", "bind_inputs", "bind_results", "run_graph", "runtime_device"]
