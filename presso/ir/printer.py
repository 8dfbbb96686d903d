"""The IR's text form, printing half: ``print_graph`` writes what ``parser.parse`` reads back
exactly (``parse(print_graph(g)) == g``). Attributes equal to their default are not printed;
absent optional operands print as ``_``. Imports no graph class: it reads nodes and graphs by
their fields, so ``graph.py`` can print itself without an import cycle."""
from __future__ import annotations

import json
import math
import re

from ..errors import IRError
from .registry import REQUIRED, get_op

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEYWORDS = {"true", "false", "none", "inf", "nan"}


def format_attr(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return v if _IDENT.match(v) and v not in _KEYWORDS else json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_attr(x) for x in v) + "]"
    raise IRError(f"attribute value {v!r} has no text form")


def format_node(n) -> str:
    opdef = get_op(n.op)
    outs = ", ".join(f"%{v.name}: {v.type}" for v in n.outputs)
    args = ", ".join("_" if v is None else f"%{v.name}" for v in n.inputs)
    shown = {k: v for k, v in n.attrs.items()
             if opdef.attrs[k].default is REQUIRED or v != opdef.attrs[k].default}
    attrs = (" {" + ", ".join(f"{k}={format_attr(v)}" for k, v in shown.items()) + "}") if shown else ""
    return f"{outs} = {n.op}({args}){attrs}"


def print_graph(g) -> str:
    ins = ", ".join(f"%{v.name}: {v.type}" for v in g.inputs)
    lines = [f"graph @{g.name}({ins}) {{"]
    lines += [f"  param %{p.value.name}: {p.value.type}" for p in g.params.values()]
    lines += [f"  {format_node(n)}" for n in g.nodes]
    lines.append("  return " + ", ".join(f"%{v.name}" for v in g.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
