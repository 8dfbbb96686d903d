"""``fuse``: merge chains of elementwise ops into ``fused_elementwise`` regions, one kernel each.

A node joins the region of an input's producer when that producer is elementwise, has the same
result shape, and the joining node is its only user (and it is not a graph output): so a region
never computes anything twice and no intermediate a region swallows is read outside it. Scalar
``full`` constants become literals of the region's expression. Single-op regions stay as they are.
"""
from __future__ import annotations

from ..ir.expr import FUSABLE, Arg, Call, Const, op_attr, to_text
from ..ir.graph import Graph, Node, Value
from .registry import register_pass


def _scalar_const(g: Graph, v: Value):
    n = v.node
    if n is not None and n.op == "full" and n.outputs[0].type.rank == 0:
        return Const(float(n.attrs["value"]), n.attrs["dtype"])
    return None


def fuse(g: Graph) -> Graph:
    users = g.users()
    outputs = set(g.outputs)
    region_of: dict[Node, list[Node]] = {}
    for n in g.nodes:
        if n.op not in FUSABLE or len(n.outputs) != 1:
            continue
        region = None
        for v in n.inputs:
            p = v.node if v is not None else None
            if (p is not None and p in region_of and v not in outputs and len(users.get(v, [])) == 1
                    and p.outputs[0].type.shape == n.outputs[0].type.shape):
                other = region_of[p]
                if region is None:
                    region = other
                elif other is not region:          # two regions meet here: merge them
                    region.extend(other)
                    for m in other:
                        region_of[m] = region
        region = region if region is not None else []
        region.append(n)
        region_of[n] = region
    done = set()
    for n in list(g.nodes):
        region = region_of.get(n)
        if region is None or id(region) in done:
            continue
        root = max(region, key=g.nodes.index)
        if n is not root:
            continue
        done.add(id(region))
        if len(region) > 1:
            _replace(g, region, root)
    from .dce import dce
    return dce(g)


def _replace(g: Graph, region: list[Node], root: Node):
    members = set(region)
    operands: list[Value] = []

    def build(v: Value):
        if v.node in members:
            n = v.node
            return Call(n.op, op_attr(n), tuple(build(a) for a in n.inputs))
        c = _scalar_const(g, v)
        if c is not None:
            return c
        if v not in operands:
            operands.append(v)
        return Arg(operands.index(v))

    expr = to_text(build(root.outputs[0]))
    out = g.op("fused_elementwise", *operands, before=root, expr=expr)
    g.replace_uses(root.outputs[0], out)
    name = root.outputs[0].name
    for n in sorted(region, key=g.nodes.index, reverse=True):
        g.remove_node(n)
    g.rename(out, name)      # the region's result keeps the name of the value it computes


register_pass("fuse")(lambda g, ctx: fuse(g))
