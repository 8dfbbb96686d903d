from ..ir.interpret import ReferenceRuntime, bind_inputs, run_graph

__all__ = ["ReferenceRuntime", "run_graph", "bind_inputs"]
