"""``concat_linears``: linears that read the same input become one linear over their weights
stacked by rows, followed by a ``split`` of its output (horizontal fusion).

    %q = linear(%h, %wq)  %k = linear(%h, %wk)  %v = linear(%h, %wv)
 -> %qkv = linear(%h, %wqkv)   %q, %k, %v = split(%qkv){axis=-1, sizes=[Nq, Nk, Nv]}

Why: at decode a transformer layer's q/k/v projections are three small matrix-vector products,
each its own launch; stacked, they are one launch over one larger weight (the split is a view).
Compressed weights stack the same way when every linear's weight comes from the same producer
chain (``dequantize`` / ``densify_nm`` with equal attributes) over parameters whose rows are the
weight's rows: each parameter is concatenated along its first axis, so the packed storage is
reused as is (same bytes, no requantization) and the result is exact.

Left alone: a linear whose output is an epilogue candidate (its only user elementwise: the cuda
target folds it into the linear's kernel, so stacking would not save a launch), and one whose
producer nodes or parameters are shared. Except a gated pair: two linears over the same input
whose outputs are the two operands of one elementwise node (SwiGLU's ``mul(silu(gate), up)``)
stack as a pair, so the cuda target runs both halves and the gate in one kernel. The
``kv_cache`` pass's cache points (Palu latents, read from the layer's normed input like q) stack too: the split notes which of its parts they are
(``meta['kv_cache_points']``, by result name), where the decode program looks for them.

Each stacked parameter records which parameters' rows it holds (``graph.meta['param_parts']``), so
the compression report still gives every original layer its bytes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ir.expr import FUSABLE
from ..ir.graph import Graph, Node, Value
from .compress_common import derive_stacked
from .registry import register_pass

_ROW_WISE = ("dequantize", "densify_nm")       # weight producers whose output row n reads only row n


def _chain(v: Value, users: dict, leaves: list) -> Optional[tuple]:
    """The signature of the producer chain of weight ``v`` (op, attrs, operand signatures; a
    parameter leaf by dtype and its shape past the first axis), collecting the leaf params in
    order; None when ``v`` cannot be stacked."""
    if v is None:
        return ("none",)
    if len(users.get(v, [])) != 1:
        return None
    if v.kind == "param":
        if v.type.rank < 1:
            return None
        leaves.append(v)
        return ("param", v.type.dtype, tuple(v.type.shape[1:]))
    n = v.node
    if v.kind != "node" or n.op not in _ROW_WISE or n.meta.get("kv_cache_point") or len(n.outputs) != 1:
        return None
    parts = tuple(_chain(u, users, leaves) for u in n.inputs)
    if any(p is None for p in parts):
        return None
    return (n.op, tuple(sorted((k, str(a)) for k, a in n.attrs.items())), parts)


def _epilogue_candidate(out: Value, users: dict, outputs: set) -> bool:
    us = users.get(out, [])
    return out not in outputs and len(us) == 1 and (us[0].op in FUSABLE or us[0].op == "fused_elementwise")


def _stackable(n: Node, users: dict, outputs: set):
    """((weight chain signature, has bias), leaf params) of linear ``n``, or None."""
    if _epilogue_candidate(n.output, users, outputs):
        return None
    return _weight_signature(n, users)


def _weight_signature(n: Node, users: dict):
    """((weight chain signature, has bias), leaf params) of linear ``n`` when its weight and bias
    can be stacked with another's, else None."""
    leaves: list[Value] = []
    sig = _chain(n.inputs[1], users, leaves)
    bias = n.inputs[2]
    if sig is None or (bias is not None and (bias.kind != "param" or len(users.get(bias, [])) != 1)):
        return None
    return (sig, bias is not None), leaves


def _producers(v: Value) -> list[Node]:
    if v is None or v.node is None:
        return []
    return [p for u in v.node.inputs for p in _producers(u)] + [v.node]


def _rebuild(g: Graph, v: Value, leaf_map: dict, before: Node) -> Value:
    """Weight ``v``'s producer chain again, over the stacked leaves."""
    if v is None:
        return None
    if v.kind == "param":
        return leaf_map[v]
    n = v.node
    return g.add_node(n.op, [_rebuild(g, u, leaf_map, before) for u in n.inputs], n.attrs, before=before).output


def _stack(g: Graph, group: list[Node], leaves: list[list[Value]]) -> Node:
    """The group as one linear over stacked weights and a split of its output (returned: the linear)."""
    first = group[0]
    leaf_map = {}
    for i, column in enumerate(zip(*leaves)):            # the i-th leaf of every linear
        data = torch.cat([g.const(v) for v in column], dim=0)
        rows = sum(v.type.shape[0] for v in column)
        t = column[0].type.with_shape((rows,) + tuple(column[0].type.shape[1:]))
        leaf_map[column[0]] = g.add_param(g.fresh_name(f"{first.name}.stacked.{i}"), data, type=t)
        derive_stacked(g, leaf_map[column[0]].name, [(v.name, v.type.shape[0]) for v in column])
    w = _rebuild(g, first.inputs[1], leaf_map, first)
    bias = None
    if first.inputs[2] is not None:
        bias = g.add_param(g.fresh_name(f"{first.name}.stacked.bias"),
                           torch.cat([g.const(n.inputs[2]) for n in group], dim=0))
        derive_stacked(g, bias.name, [(n.inputs[2].name, n.inputs[2].type.shape[0]) for n in group])
    y = g.op("linear", first.inputs[0], w, bias, before=first, name=g.fresh_name("_".join(n.name for n in group)))
    sizes = [n.output.type.shape[-1] for n in group]
    split = g.add_node("split", [y], {"axis": y.type.rank - 1, "sizes": sizes}, before=first)
    marks = {n.output.name: n.meta["kv_cache_point"] for n in group if n.meta.get("kv_cache_point")}
    if marks:      # the kv_cache pass's latents: the decode program caches these parts
        split.meta["kv_cache_points"] = marks
    old_names = [n.output.name for n in group]
    for n, part in zip(group, split.outputs):
        g.replace_uses(n.output, part)
    dead = [p for n in group for p in _producers(n.inputs[1])] + group
    dead_params = [v for col in leaves for v in col] + [n.inputs[2] for n in group if n.inputs[2] is not None]
    for n in dead:
        g.remove_node(n)
    for v in dead_params:
        g.remove_param(v.name)
    for part, name in zip(split.outputs, old_names):      # the parts keep the names of what they compute
        g.rename(part, name)
    return y.node


def _gate_partner(n: Node, users: dict, outputs: set) -> Optional[Node]:
    """The other linear of a gated pair with ``n``, or None: from ``n``'s output, a chain of
    single-use elementwise nodes (each reading only the chain and constants: ``silu``, a scaled
    ``gelu``) reaches a node whose other operand is a linear over the same input, used only there
    (SwiGLU: ``mul(silu(gate), up)``)."""
    v = n.output
    while True:
        us = users.get(v, [])
        if v in outputs or len(us) != 1 or not (us[0].op in FUSABLE or us[0].op == "fused_elementwise"):
            return None
        f = us[0]
        rest = [u for u in f.inputs if u is not v and u is not None and not _constant(u)]
        if not rest:
            v = f.output
            continue
        if len(rest) != 1 or rest[0].node is None:
            return None
        other, m = rest[0], rest[0].node
        if (m is n or m.op != "linear" or m.inputs[0] is not n.inputs[0] or other in outputs
                or len(users.get(other, [])) != 1 or other.type.shape != n.output.type.shape):
            return None
        return m


def _constant(v: Value) -> bool:
    return v.kind == "param" or (v.node is not None and v.node.op == "full")


def _gated_pairs(g: Graph, users: dict, outputs: set) -> list[tuple[Node, Node, list, list]]:
    """Gated pairs whose weights stack: (the gate-side linear, its partner, their leaf params)."""
    pairs, taken = [], set()
    for n in g.nodes:
        if n.op != "linear" or n.inputs[0] is None or n in taken:
            continue
        m = _gate_partner(n, users, outputs)
        if m is None or m in taken:
            continue
        a, b = _weight_signature(n, users), _weight_signature(m, users)
        if a is None or b is None or a[0] != b[0]:
            continue
        taken.update((n, m))
        pairs.append((n, m, a[1], b[1]))
    return pairs


def concat_linears(g: Graph) -> Graph:
    users = g.users()
    outputs = set(g.outputs)
    paired = {_stack(g, [first, second], [leaves1, leaves2])
              for first, second, leaves1, leaves2 in _gated_pairs(g, users, outputs)}
    users = g.users()
    groups: dict[tuple, list[tuple[Node, list[Value]]]] = {}
    for n in g.nodes:
        if n.op != "linear" or n.inputs[0] is None or n in paired:     # (a pair stays a pair)
            continue
        st = _stackable(n, users, outputs)
        if st is not None:
            groups.setdefault((n.inputs[0], st[0]), []).append((n, st[1]))
    for members in groups.values():
        if len(members) > 1:
            _stack(g, [n for n, _ in members], [leaves for _, leaves in members])
    return g


register_pass("concat_linears")(lambda g, ctx: concat_linears(g))
