"""Pattern rewriting: a pattern is a function ``(rw, node) -> bool`` registered for an op name;
it matches around ``node`` and, if it matches, replaces uses and returns True. The driver applies
patterns greedily until nothing changes, then dead code is removed.

Matching helpers on ``Rewriter`` read like the patterns in the literature:
``rw.producer(v, "mul")``, ``rw.scalar(v)``, ``rw.single_use(v)``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Optional

import torch

from ..errors import IRError
from ..ir.graph import Graph, Node, Value
from ..ir.registry import get_op

Pattern = Callable[["Rewriter", Node], bool]


class Rewriter:
    def __init__(self, g: Graph):
        self.g = g
        self._users = None

    # ---- queries ------------------------------------------------------------------------
    @property
    def users(self) -> dict:
        if self._users is None:
            self._users = self.g.users()
        return self._users

    def changed(self):
        self._users = None

    def n_uses(self, v: Value) -> int:
        return len(self.users.get(v, [])) + sum(1 for o in self.g.outputs if o is v)

    def single_use(self, v: Value) -> bool:
        return self.n_uses(v) == 1

    def producer(self, v: Optional[Value], *ops: str) -> Optional[Node]:
        if v is None or v.node is None:
            return None
        return v.node if (not ops or v.node.op in ops) else None

    def scalar(self, v: Optional[Value]) -> Optional[float]:
        """The value of a constant that holds one number (0-d/1-element ``full`` or param)."""
        if v is None:
            return None
        if v.node is not None and v.node.op == "full" and v.type.numel() == 1:
            return float(v.node.attrs["value"])
        if v.kind == "param" and v.type.is_static and v.type.numel() == 1:
            d = self.g.params[v.name].data
            return float(d.reshape(()).item()) if d is not None else None
        if v.kind == "param" and v.type.is_static:
            d = self.g.params[v.name].data
            if d is not None and d.numel() and bool((d == d.reshape(-1)[0]).all()):
                return float(d.reshape(-1)[0].item())
        return None

    def const(self, v: Optional[Value]) -> Optional[torch.Tensor]:
        if v is None or v.kind != "param":
            return None
        return self.g.params[v.name].data

    def commuted(self, node: Node) -> Iterable[tuple[Value, Value]]:
        """Operand orders to try for a commutative binary node."""
        a, b = node.inputs
        yield a, b
        yield b, a

    # ---- edits --------------------------------------------------------------------------
    def replace(self, node: Node, new: Value) -> bool:
        """Replace the (single) result of ``node`` by ``new``; the old node becomes dead."""
        self.g.replace_uses(node.output, new)
        self.changed()
        return True

    def op(self, op: str, *inputs, before: Node, **attrs) -> Value:
        out = self.g.add_node(op, inputs, attrs, before=before).output
        self.changed()
        return out

    def retarget(self, node: Node, op: str, inputs: list, **attrs) -> Node:
        """Make ``node`` an application of ``op`` on ``inputs`` in place (kernel selection: a
        target op computing what the node and the nodes it absorbs computed): its name, position,
        result names and notes stay; result types are inferred again, so a node that takes over
        its user's computation takes over that result's type."""
        opdef = get_op(op)
        where = f"node %{node.name} as {op}"
        attrs = opdef.complete_attrs(attrs, where=where)
        inputs = list(inputs)
        if not opdef.variadic and len(inputs) < len(opdef.operands):
            inputs += [None] * (len(opdef.operands) - len(inputs))
        types = opdef.infer_types(inputs, attrs, where=where)
        if len(types) != len(node.outputs):
            raise IRError(f"{where}: {op} yields {len(types)} results, the node has {len(node.outputs)}")
        node.op, node.inputs, node.attrs = op, inputs, attrs
        for v, t in zip(node.outputs, types):
            v.type = t
        self.changed()
        return node

    def fuse(self, nodes: list, op: str, inputs: list, results: list, before: Node, **attrs) -> Node:
        """One ``op`` node (inserted before ``before``) replacing ``nodes``: its results stand for
        ``results`` (values of those nodes, keeping their names); every node of ``nodes`` must be
        dead once they are replaced."""
        names = [v.name for v in results]
        new = self.g.add_node(op, inputs, attrs, names=[self.g.fresh_name(n) for n in names], before=before)
        for old, v in zip(results, new.outputs):
            self.g.replace_uses(old, v)
        for n in nodes:
            self.g.remove_node(n)
        for v, name in zip(new.outputs, names):
            self.g.rename(v, name)
        self.changed()
        return new

    def new_param(self, hint: str, data: torch.Tensor) -> Value:
        v = self.g.add_param(self.g.fresh_name(hint), data.contiguous())
        self.changed()
        return v


def apply_patterns(g: Graph, patterns: dict[str, list[Pattern]], max_rounds: int = 50) -> int:
    """Apply patterns to a fixpoint; returns the number of rewrites. Removes dead code after."""
    from .dce import dce
    rw = Rewriter(g)
    total = 0
    for _ in range(max_rounds):
        changed = 0
        for node in list(g.nodes):
            if not any(rw.n_uses(v) for v in node.outputs):
                continue
            for pat in patterns.get(node.op, []):
                if pat(rw, node):
                    changed += 1
                    break
        total += changed
        if changed:
            dce(g)
            rw.changed()
        else:
            break
    return total


def pattern_table(*pairs) -> dict[str, list[Pattern]]:
    table = defaultdict(list)
    for op, fn in pairs:
        table[op].append(fn)
    return dict(table)
