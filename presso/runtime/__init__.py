from .reference import ReferenceRuntime, run_graph, bind_inputs

__all__ = ["ReferenceRuntime", "run_graph", "bind_inputs"]
