"""Graph analyses: a networkx view (reachability, dominators, subgraph matching), and the
per-layer cost model behind ``CompiledModel.report()`` (params, bytes of real storage, FLOPs)."""
from __future__ import annotations

from collections import Counter
from typing import Mapping

import networkx as nx

from .graph import Graph, Node
from .registry import get_op


def to_networkx(g: Graph) -> nx.DiGraph:
    """Nodes are IR nodes (keyed by first result name) plus ``input:``/``param:``/``output`` nodes;
    edges carry the value name and its type."""
    G = nx.DiGraph()
    for v in g.inputs:
        G.add_node(f"input:{v.name}", op="input", type=str(v.type))
    for p in g.params.values():
        G.add_node(f"param:{p.value.name}", op="param", type=str(p.value.type))
    key = {}
    for n in g.nodes:
        key[n] = n.name
        G.add_node(n.name, op=n.op, node=n)
        for v in n.inputs:
            if v is None:
                continue
            src = key[v.node] if v.kind == "node" else f"{v.kind}:{v.name}"
            G.add_edge(src, n.name, value=v.name, type=str(v.type))
    G.add_node("output", op="output")
    for v in g.outputs:
        src = key[v.node] if v.kind == "node" else f"{v.kind}:{v.name}"
        G.add_edge(src, "output", value=v.name, type=str(v.type))
    return G


def dominators(g: Graph) -> dict[str, str]:
    """Immediate dominators of every node, from a virtual entry feeding all inputs and params."""
    G = to_networkx(g)
    G.add_node("__entry__")
    for n in list(G.nodes):
        if G.in_degree(n) == 0 and n != "__entry__":
            G.add_edge("__entry__", n)
    return nx.immediate_dominators(G, "__entry__")


def node_flops(n: Node, bindings: Mapping[str, int] = {}) -> int:
    opdef = get_op(n.op)
    if opdef.flops is None:
        return 0
    ins = [v.type if v is not None else None for v in n.inputs]
    return int(opdef.flops(ins, [v.type for v in n.outputs], n.attrs, bindings))


def cost_report(g: Graph, bindings: Mapping[str, int] = {}) -> dict:
    """Per-layer and total parameters, bytes of real (packed) storage and FLOPs."""
    layers = []
    seen = set()
    for n in g.nodes:
        params = [v for v in n.inputs if v is not None and v.kind == "param"]
        flops = node_flops(n, bindings)
        if not params and get_op(n.op).category not in ("linear", "attention", "norm"):
            continue
        new = [p for p in params if p.name not in seen]
        seen.update(p.name for p in params)
        layers.append({
            "name": n.name, "op": n.op,
            "params": {p.name: str(p.type) for p in params},
            "param_count": sum(p.type.numel() for p in new),
            "bytes": sum(p.type.nbytes() for p in new),
            "flops": flops,
        })
    total_flops = sum(node_flops(n, bindings) for n in g.nodes)
    return {
        "graph": g.name,
        "ops": dict(sorted(Counter(n.op for n in g.nodes).items())),
        "layers": layers,
        "totals": {
            "nodes": len(g.nodes),
            "params": sum(p.value.type.numel() for p in g.params.values()),
            "bytes": g.param_bytes(),
            "flops": total_flops,
        },
    }
