"""The expression language of fused elementwise regions (``fused_elementwise``'s ``expr``).

    expr := '%' INT                      the region's i-th operand
          | NUMBER ':' DTYPE             a scalar constant, e.g. ``0.5:f32``
          | OP ['[' WORD ']'] '(' expr {',' expr} ')'   an elementwise op; ``gelu[tanh]``, ``cast[f16]``

Each OP is a registry op, so the reference evaluation (``ops.evaluate_expr``) is the ops' own
torch implementations and codegen backends translate the same tree. This module is syntax only:
it imports no op definition. Example: ``mul(silu(%0),%1)`` is SwiGLU's gate.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from ..errors import IRError

# ops a region may hold, and the attribute a bracketed word sets
ATTR_OF = {"gelu": "approximate", "cast": "dtype"}
UNARY = ("neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "erf", "sigmoid", "relu", "silu",
         "sin", "cos", "logical_not", "gelu", "cast")
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
          "logical_and", "logical_or")
TERNARY = ("where",)
FUSABLE = frozenset(UNARY + BINARY + TERNARY)


@dataclass(frozen=True)
class Arg:
    index: int


@dataclass(frozen=True)
class Const:
    value: float
    dtype: str


@dataclass(frozen=True)
class Call:
    op: str
    attr: str | None
    args: tuple


Expr = Union[Arg, Const, Call]
_TOKEN = re.compile(r"\s*(?:(%\d+)|(-?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan)):(\w+)|(\w+)(?:\[(\w+)\])?\(|(,)|(\)))")


MAX_DEPTH = 256     # nesting of a fused expression (the evaluator and printer recurse over it)


def parse(text: str) -> Expr:
    pos = 0

    def node(depth=0):
        nonlocal pos
        if depth > MAX_DEPTH:
            raise IRError(f"fused expr {text[:80]!r}...: nests deeper than {MAX_DEPTH} levels")
        m = _TOKEN.match(text, pos)
        if not m or m.group(6) or m.group(7):
            raise IRError(f"fused expr {text!r}: expected an operand at position {pos}")
        pos = m.end()
        if m.group(1):
            return Arg(int(m.group(1)[1:]))
        if m.group(2):
            return Const(float(m.group(2)), m.group(3))
        op, attr = m.group(4), m.group(5)
        if op not in FUSABLE:
            raise IRError(f"fused expr {text!r}: op '{op}' cannot be fused; fusable: {', '.join(sorted(FUSABLE))}")
        args = [node(depth + 1)]
        while True:
            m = _TOKEN.match(text, pos)
            if m and m.group(6):
                pos = m.end()
                args.append(node(depth + 1))
            elif m and m.group(7):
                pos = m.end()
                break
            else:
                raise IRError(f"fused expr {text!r}: expected ',' or ')' at position {pos}")
        want = 1 if op in UNARY else 2 if op in BINARY else 3
        if len(args) != want:
            raise IRError(f"fused expr {text!r}: '{op}' takes {want} operand(s), got {len(args)}")
        return Call(op, attr, tuple(args))

    tree = node()
    if text[pos:].strip():
        raise IRError(f"fused expr {text!r}: trailing text at position {pos}")
    return tree


def to_text(e: Expr) -> str:
    if isinstance(e, Arg):
        return f"%{e.index}"
    if isinstance(e, Const):
        return f"{e.value!r}:{e.dtype}"
    attr = f"[{e.attr}]" if e.attr else ""
    return f"{e.op}{attr}(" + ",".join(to_text(a) for a in e.args) + ")"


def op_attr(node) -> str | None:
    """The bracketed word of a fusable op node (``gelu``'s approximation, ``cast``'s dtype)."""
    return node.attrs.get(ATTR_OF[node.op]) if node.op in ATTR_OF else None


def node_expr(node) -> str | None:
    """A node's computation over its inputs %0, %1, ... as an expression: a ``fused_elementwise``
    region's own, a single fusable op's call; None for anything else."""
    if node.op == "fused_elementwise":
        return node.attrs["expr"]
    if node.op in FUSABLE and len(node.outputs) == 1:
        return to_text(Call(node.op, op_attr(node), tuple(Arg(i) for i in range(len(node.inputs)))))
    return None


def operands(e: Expr) -> set[int]:
    if isinstance(e, Arg):
        return {e.index}
    if isinstance(e, Const):
        return set()
    return set().union(*(operands(a) for a in e.args))
