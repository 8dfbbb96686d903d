"""Import any core ATen node as the generic ``aten.*`` op of the same schema.

The torch frontend maps the ops presso's passes match on (linear, attention, norms, ...) through
its own handlers; every other core ATen node comes here, and every non-core op is first decomposed
to core ATen with torch's own decomposition table (``decompose_unsupported``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from ..errors import FrontendError
from ..ir import aten_ops
from ..ir.registry import get_op
from ..ir.types import DType, TensorType


def importable(target) -> bool:
    return aten_ops.admitted(target)


def decomposable(target) -> bool:
    """torch can rewrite ``target`` in other ATen ops (an in-place op: as its functional form)."""
    return isinstance(target, torch._ops.OpOverload) and (
        target._schema.is_mutable or bool(aten_ops.decomposition_table([target])))


def import_node(im, n: fx.Node, as_dim: Callable):
    """Emit ``aten.<op>`` for core-ATen node ``n`` (its arguments bound by schema)."""
    overload = n.target
    name = aten_ops.ir_name(overload)
    opdef = get_op(name)
    bound = _bind(overload._schema, n.args, n.kwargs)
    ins = []
    for spec in opdef.operands:
        arg = spec.rstrip("?*")
        v = bound.get(arg)
        if spec.endswith("*"):
            ins.extend(None if x is None else im.t(x) for x in (v or []))
        else:
            ins.append(None if v is None else im.t(v))
    attrs = {}
    for k, spec in opdef.attrs.items():
        if k not in bound:
            continue
        attrs[k] = _attr_value(bound[k], spec.kind, as_dim, n)
    declared = None
    if opdef.dynamic_shape:  # value-dependent sizes: torch's own symbols (u0, ...) name them
        vals = n.meta["val"] if isinstance(n.meta["val"], (list, tuple)) else [n.meta["val"]]
        declared = [TensorType(tuple(as_dim(d) for d in v.shape), DType.from_torch(v.dtype)) for v in vals]
    outs = im.g.add_node(name, ins, attrs, out_types=declared).outputs
    returns = overload._schema.returns
    if len(returns) == 1 and str(returns[0].type) == "Tensor":
        return outs[0]
    return list(outs)


def _bind(schema, args, kwargs) -> dict:
    bound = {}
    positional = [a for a in schema.arguments if not a.kwarg_only]
    for a, v in zip(positional, args):
        bound[a.name] = v
    bound.update(kwargs)
    return bound


def _attr_value(v, kind: str, as_dim, n: fx.Node):
    if v is None:
        return None
    if kind == "dtype":
        return DType.from_torch(v).value
    if kind == "dim":
        return as_dim(v)
    if kind == "shape":
        return [as_dim(d) for d in v]
    if kind == "scalar" and isinstance(v, fx.Node):
        raise FrontendError(f"node {n.name} ({n.target}): a scalar argument computed at run time is not supported")
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        raise FrontendError(f"node {n.name} ({n.target}): a symbolic {kind} argument is not supported")
    return list(v) if isinstance(v, tuple) else v
