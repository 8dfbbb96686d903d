"""The graph: typed SSA values, nodes, parameters held by name, and the rewrite helpers passes use.

Values are produced by exactly one of: a graph input, a parameter, or a node. Nodes are kept in
topological order; passes insert new nodes before their first use and call ``replace_uses``.
"""
from __future__ import annotations

import copy
import itertools
import re
from collections import Counter
from typing import Any, Iterable, Optional, Sequence

import torch

from ..errors import IRError
from .printer import format_node, print_graph
from .registry import get_op
from .types import TensorType

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class Value:
    """An SSA value: a name and a type; ``node`` is its producer (None for inputs and params)."""

    __slots__ = ("name", "type", "node", "kind")

    def __init__(self, name: str, type: TensorType, kind: str, node: "Optional[Node]" = None):
        if not NAME_RE.match(name):
            raise IRError(f"bad value name {name!r}: use letters, digits, '_', '.', '-'")
        self.name, self.type, self.kind, self.node = name, type, kind, node

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One op application: op name, operands (None for an absent optional), attributes, results."""

    __slots__ = ("op", "inputs", "attrs", "outputs", "meta")

    def __init__(self, op: str, inputs: Sequence[Optional[Value]], attrs: dict, outputs: list[Value]):
        self.op, self.inputs, self.attrs, self.outputs = op, list(inputs), dict(attrs), outputs
        self.meta: dict[str, Any] = {}  # not printed: source locations, pass annotations

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise IRError(f"node {self.name} has {len(self.outputs)} results, not one")
        return self.outputs[0]

    @property
    def name(self) -> str:
        return self.outputs[0].name if self.outputs else f"<{self.op}>"

    def __repr__(self) -> str:
        return format_node(self)


class Param:
    """A named constant tensor (weight, buffer, folded constant) and its IR type."""

    __slots__ = ("value", "data")

    def __init__(self, value: Value, data: Optional[torch.Tensor]):
        self.value, self.data = value, data


class Graph:
    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.params: dict[str, Param] = {}
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self.meta: dict[str, Any] = {}
        self._names: set[str] = set()
        self._counter = itertools.count()

    # ---- construction -------------------------------------------------------------------
    def _claim(self, name: str) -> str:
        if name in self._names:
            raise IRError(f"value name %{name} is defined twice")
        self._names.add(name)
        return name

    def fresh_name(self, hint: str = "v") -> str:
        hint = re.sub(r"[^A-Za-z0-9_.\-]", "_", hint) or "v"
        if hint not in self._names:
            return hint
        while True:
            cand = f"{hint}_{next(self._counter)}"
            if cand not in self._names:
                return cand

    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self._claim(name), type, "input")
        self.inputs.append(v)
        return v

    def add_param(self, name: str, data: Optional[torch.Tensor], type: Optional[TensorType] = None) -> Value:
        """Add a parameter. ``type`` defaults to the tensor's; give it for packed (i4/u4) storage."""
        if type is None:
            if data is None:
                raise IRError(f"param {name}: give a tensor or a type")
            type = TensorType.of(data)
        v = Value(self._claim(name), type, "param")
        self.params[name] = Param(v, data)
        return v

    def param(self, value_or_name) -> Param:
        name = value_or_name.name if isinstance(value_or_name, Value) else value_or_name
        return self.params[name]

    def add_node(self, op: str, inputs: Sequence[Optional[Value]], attrs: Optional[dict] = None,
                 names: Optional[Sequence[str]] = None, before: Optional[Node] = None,
                 out_types: Optional[Sequence[TensorType]] = None) -> Node:
        """Create a node, inferring result types from the op registry, and insert it
        (at the end, or just before ``before``)."""
        opdef = get_op(op)
        attrs = opdef.complete_attrs(attrs or {}, where=f"new {op} node")
        inputs = list(inputs)
        if not opdef.variadic and len(inputs) < len(opdef.operands):  # absent optionals are explicit
            inputs += [None] * (len(opdef.operands) - len(inputs))
        if out_types is None:
            out_types = opdef.infer_types(list(inputs), attrs)
        if names is not None and len(names) != len(out_types):
            raise IRError(f"op '{op}' yields {len(out_types)} results, {len(names)} names given")
        outs = []
        for i, t in enumerate(out_types):
            outs.append(Value(self._claim(names[i] if names else self.fresh_name(_value_hint(op))), t, "node"))
        node = Node(op, inputs, attrs, outs)
        for v in outs:
            v.node = node
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    def op(self, op: str, *inputs: Optional[Value], before: Optional[Node] = None, name: Optional[str] = None,
           **attrs) -> Value:
        """Shorthand for single-result ops: ``g.op("relu", x)``."""
        return self.add_node(op, inputs, attrs, names=[name] if name else None, before=before).output

    # ---- queries ------------------------------------------------------------------------
    def values(self) -> Iterable[Value]:
        yield from self.inputs
        for p in self.params.values():
            yield p.value
        for n in self.nodes:
            yield from n.outputs

    def users(self) -> dict[Value, list[Node]]:
        """Use lists: for every value, the nodes reading it (in order, with repeats)."""
        uses: dict[Value, list[Node]] = {v: [] for v in self.values()}
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    uses.setdefault(v, []).append(n)
        return uses

    def op_histogram(self) -> Counter:
        return Counter(n.op for n in self.nodes)

    def is_const(self, v: Optional[Value]) -> bool:
        return v is not None and v.kind == "param"

    def const(self, v: Value) -> Optional[torch.Tensor]:
        return self.params[v.name].data if v.kind == "param" else None

    # ---- rewriting ----------------------------------------------------------------------
    def replace_uses(self, old: Value, new: Value) -> None:
        """Make every reader of ``old`` (nodes and graph outputs) read ``new`` instead."""
        for n in self.nodes:
            n.inputs = [new if v is old else v for v in n.inputs]
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_node(self, node: Node) -> None:
        self.nodes.remove(node)
        for v in node.outputs:
            self._names.discard(v.name)

    def remove_param(self, name: str) -> None:
        del self.params[name]
        self._names.discard(name)

    def rename(self, value: Value, new_name: str) -> None:
        self._names.discard(value.name)
        if value.kind == "param":
            self.params[new_name] = self.params.pop(value.name)
        value.name = self._claim(new_name)

    def copy(self) -> "Graph":
        """A structural copy; parameter tensors are shared (passes replace, never mutate them)."""
        out = Graph(self.name)
        out.meta = copy.deepcopy(self.meta)
        env = {}
        for v in self.inputs:
            env[v] = out.add_input(v.name, v.type)
        for p in self.params.values():
            env[p.value] = out.add_param(p.value.name, p.data, p.value.type)
        for n in self.nodes:
            new = out.add_node(n.op, [None if v is None else env[v] for v in n.inputs], n.attrs,
                               names=[v.name for v in n.outputs], out_types=[v.type for v in n.outputs])
            new.meta = dict(n.meta)
            for a, b in zip(n.outputs, new.outputs):
                env[a] = b
        out.outputs = [env[v] for v in self.outputs]
        return out

    def __str__(self) -> str:
        return print_graph(self)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        if print_graph(self) != print_graph(other):
            return False
        for name, p in self.params.items():
            q = other.params[name].data
            if p.data is not None and q is not None and not torch.equal(p.data, q):
                return False
        return True

    __hash__ = object.__hash__

    def param_bytes(self) -> int:
        return sum(p.value.type.nbytes() for p in self.params.values())


def _value_hint(op: str) -> str:
    """A result's default name: the op's, without the ``aten.`` prefix and overload."""
    return op.split(".")[1] if op.startswith("aten.") else op
