"""Constant folding: a node whose operands are all constants (params or ``full``) is evaluated
with the reference runtime and replaced by a param (or a ``full`` when it holds one number).
Scalar ``full`` nodes themselves stay: they are the readable form of a literal. Weight producers
(``compressed`` ops: dequantize, densify_nm) never fold: folding would densify compressed storage;
nor do seeded-random ops (``random``): each run must draw new numbers."""
from __future__ import annotations

import torch

from ..ir.graph import Graph, Value
from ..ir.registry import get_op

MAX_FOLD_BYTES = 1 << 28  # never materialize constants larger than 256 MiB


def _is_const(v: Value) -> bool:
    return v is None or v.kind == "param" or (v.node is not None and v.node.op == "full")


def fold_constants(g: Graph) -> Graph:
    from .dce import dce
    values: dict[Value, torch.Tensor] = {}

    def value_of(v: Value) -> torch.Tensor:
        if v.kind == "param":
            return g.params[v.name].data
        if v not in values:
            values[v] = get_op("full").run([], v.node.attrs)[0]
        return values[v]

    for node in list(g.nodes):
        if node.op in ("full",) or not node.inputs and node.op != "arange":
            continue
        if get_op(node.op).category in ("compressed", "random"):
            continue
        if not all(_is_const(v) for v in node.inputs):
            continue
        if not all(o.type.is_static for o in node.outputs):
            continue
        if any(o.type.nbytes() > MAX_FOLD_BYTES for o in node.outputs):
            continue
        ins = [None if v is None else value_of(v) for v in node.inputs]
        if any(t is None for t, v in zip(ins, node.inputs) if v is not None):
            continue  # a param without data (parsed text): cannot fold
        outs = get_op(node.op).run(ins, node.attrs)
        for old, t in zip(node.outputs, outs):
            if t.numel() == 1 and t.dtype != torch.uint8:
                new = g.op("full", value=float(t.reshape(-1)[0].item()), shape=list(t.shape),
                           dtype=old.type.dtype.value, before=node)
            else:
                srcs = [v.name for v in node.inputs if v is not None and v.kind == "param"]
                hint = f"{srcs[0]}.{node.op}" if srcs else old.name
                new = g.add_param(g.fresh_name(hint), t.contiguous(), old.type)
            g.replace_uses(old, new)
    return dce(g)
