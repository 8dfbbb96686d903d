"""Dead-code elimination: drop nodes whose results nobody reads, then unused params."""
from __future__ import annotations

from ..ir.graph import Graph


def dce(g: Graph) -> Graph:
    live = set(g.outputs)
    keep = []
    for n in reversed(g.nodes):
        if any(v in live for v in n.outputs):
            keep.append(n)
            live.update(v for v in n.inputs if v is not None)
    kept = set(keep)
    dead = [n for n in g.nodes if n not in kept]
    for n in dead:
        g.remove_node(n)
    for name in [name for name, p in g.params.items() if p.value not in live]:
        g.remove_param(name)
    return g
