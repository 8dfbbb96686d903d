"""presso's typed graph IR. Imports nothing from frontends, passes or backends."""
from .types import DType, TensorType, Dim
from .graph import Graph, Node, Value, Param
from .registry import OpDef, Attr, defop, get_op, all_ops
from .text import parse, print_graph
from .verify import verify
from . import ops  # noqa: F401

__all__ = ["DType", "TensorType", "Dim", "Graph", "Node", "Value", "Param", "OpDef", "Attr", "defop",
           "get_op", "all_ops", "parse", "print_graph", "verify"]
