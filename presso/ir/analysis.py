"""Graph analyses: a networkx view (reachability, dominators, subgraph matching), and the
per-layer cost model behind ``CompiledModel.report()`` (params, bytes of real storage, FLOPs)."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Mapping

from .graph import Graph, Node, Value
from .registry import canonical_op, get_op

if TYPE_CHECKING:
    import networkx as nx


def to_networkx(g: Graph) -> nx.DiGraph:
    """Nodes are IR nodes (keyed by first result name) plus ``input:``/``param:``/``output`` nodes;
    edges carry the value name and its type."""
    import networkx as nx           # only the analyses need it, not import presso
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
    import networkx as nx
    G = to_networkx(g)
    G.add_node("__entry__")
    for n in list(G.nodes):
        if G.in_degree(n) == 0 and n != "__entry__":
            G.add_edge("__entry__", n)
    return nx.immediate_dominators(G, "__entry__")


def packed_weight_producer(v: Value, users: Mapping) -> Node | None:
    """The ``dequantize`` / ``densify_nm`` node computing ``v`` from params alone, when ``v`` has no
    other reader: a backend may then read the packed params directly and never run the producer.
    (N:M values must be stored floats; quantized N:M values are a producer chain, not fused.)"""
    p = v.node
    if p is None or p.op not in ("dequantize", "densify_nm") or len(users.get(v, [])) != 1:
        return None
    if any(x is not None and x.kind != "param" for x in p.inputs):
        return None
    if p.op == "densify_nm" and not p.inputs[0].type.dtype.is_float:
        return None
    return p


def quantized_nm_producers(v: Value, users: Mapping) -> tuple[Node, Node] | None:
    """(densify_nm, dequantize) when ``v`` = densify_nm(dequantize(4-bit codes, scales[, zeros]),
    index) of params alone and nothing else reads either result: N:M weights whose kept values
    are themselves int4-quantized, which a backend can read packed, codes and all."""
    d = v.node
    if d is None or d.op != "densify_nm" or len(users.get(v, [])) != 1:
        return None
    vals = d.inputs[0]
    q = vals.node
    if (q is None or q.op != "dequantize" or q.attrs["bits"] != 4 or len(users.get(vals, [])) != 1
            or d.inputs[1].kind != "param" or any(x is not None and x.kind != "param" for x in q.inputs)):
        return None
    return d, q


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


HEAD_PASS_THROUGH = ("reshape", "transpose", "slice", "cast")     # ops between an LM head and the output


def _stored_params(v: Value) -> list[Value]:
    """The params a weight value is stored in: itself, or those its weight producers read."""
    if v.kind == "param":
        return [v]
    if v.node is None or get_op(v.node.op).category != "compressed":
        return []
    return [p for x in v.node.inputs if x is not None for p in _stored_params(x)]


def embedding_head_params(g: Graph) -> tuple[set[str], set[str]]:
    """(params of embedding tables, params of output heads): tables are what ``gather`` looks up
    (axis 0) or ``gather_dequantize`` reads; a head is a linear whose result reaches a graph output
    through layout ops only (an LM head; a tied one shares the table's params)."""
    table: set[str] = set()
    for n in g.nodes:
        if n.op == "gather" and n.inputs[0].kind == "param" and n.attrs["axis"] % n.inputs[0].type.rank == 0:
            table.add(n.inputs[0].name)
        elif canonical_op(n.op) == "gather_dequantize":
            table.update(v.name for v in n.inputs[1:] if v is not None and v.kind == "param")
    head: set[str] = set()
    for v in g.outputs:
        while v.node is not None and v.node.op in HEAD_PASS_THROUGH:
            v = v.node.inputs[0]
        n = v.node
        if n is not None and canonical_op(n.op) in ("linear", "linear_int8"):
            head.update(p.name for w in _weight_operands(n) for p in _stored_params(w))
    return table, head


_NOT_WEIGHTS = ("x", "bias", "extras", "xq", "x_scale")     # a linear's operands that are no weight


def _weight_operands(n: Node) -> list[Value]:
    """A linear's weight operands: ``linear``'s weight, ``linear_int8``'s codes and scales, a
    target op's weight producer operands (``cuda.int4_linear``'s codes, scales, zeros)."""
    names = get_op(n.op).operand_names()
    return [v for i, v in enumerate(n.inputs) if v is not None and names[min(i, len(names) - 1)] not in _NOT_WEIGHTS]


def bytes_by_role(g: Graph) -> dict:
    """Model bytes split into embedding tables, output heads, tables tied to a head (counted
    once, in ``tied_embedding_head`` only) and the rest; the four sum to the model's bytes."""
    table, head = embedding_head_params(g)
    out = {"embedding": 0, "head": 0, "tied_embedding_head": 0, "rest": 0}
    for name, p in g.params.items():
        role = ("tied_embedding_head" if name in table and name in head else "embedding" if name in table
                else "head" if name in head else "rest")
        out[role] += p.value.type.nbytes()
    return out


def compression_report(g: Graph, original_bytes: int | None = None) -> dict:
    """Per compressed layer (keyed by its original weight): what was done (rank / bits / N:M),
    bytes of real storage before and after (summed over the params now derived from it), and the
    relative output error measured on calibration data; plus totals."""
    origin = g.meta.get("param_origin", {})

    def root(name):
        seen = {name}
        while name in origin and origin[name] not in seen:     # a cycle (a hand-edited meta) ends the walk
            name = origin[name]
            seen.add(name)
        return name

    stacked = g.meta.get("param_parts", {})
    current: dict[str, list[tuple[str, int, str]]] = {}     # layer -> (param, its bytes, what of it)
    for name, p in g.params.items():
        nbytes, typ = p.value.type.nbytes(), str(p.value.type)
        if name not in stacked:
            current.setdefault(root(name), []).append((name, nbytes, typ))
            continue
        total, start = sum(rows for _, rows in stacked[name]), 0      # rows of equal bytes each
        for part, rows in stacked[name]:
            current.setdefault(root(part), []).append(
                (name, nbytes * rows // total, f"{typ} rows {start}:{start + rows}"))
            start += rows
    layers = []
    for key, rec in g.meta.get("compression", {}).items():
        names = current.get(key, [])
        after = sum(b for _, b, _ in names)
        entry = {"layer": key, **{k: v for k, v in rec.items() if not k.startswith("_")},
                 "bytes_after": after, "params": {n: what for n, _, what in names}}
        if entry.get("bytes_before"):
            entry["ratio"] = round(entry["bytes_before"] / max(after, 1), 3)
        layers.append(entry)
    total = g.param_bytes()
    out = {"layers": layers, "model_bytes": total, "bytes_by_role": bytes_by_role(g)}
    if original_bytes:
        out["model_bytes_uncompressed"] = original_bytes
        out["compression_ratio"] = round(original_bytes / max(total, 1), 4)
    return out
