"""presso's typed graph IR. Imports nothing from frontends, passes or backends."""
from .types import DType, TensorType, Dim
from .graph import Graph, Node, Value, Param
from .registry import OpDef, Attr, defop, get_op, all_ops
from .parser import parse
from .printer import print_graph
from .verify import verify
from . import aten_ops, ops, cuda_ops, llvm_ops  # noqa: F401  (they fill the op registry)

__all__ = ["DType", "TensorType", "Dim", "Graph", "Node", "Value", "Param", "OpDef", "Attr", "defop",
           "get_op", "all_ops", "parse", "print_graph", "verify"]
