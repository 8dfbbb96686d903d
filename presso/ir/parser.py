"""The IR's text form, parsing half: ``parse`` reads what ``printer.print_graph`` writes,
``parse(print(g)) == g``.

    graph @mlp(%x: f32[batch, 16]) {
      param %fc1.weight: f32[32, 16]
      param %fc1.bias: f32[32]
      %linear: f32[batch, 32] = linear(%x, %fc1.weight, %fc1.bias)
      %relu: f32[batch, 32] = relu(%linear)
      return %relu
    }

Attributes equal to their default are not printed; absent optional operands print as ``_``.
Parameter tensors are not part of the text: ``parse(text, weights=...)`` attaches them.
"""
from __future__ import annotations

import json
import re
from typing import Mapping, Optional

import torch

from ..errors import IRError, IRParseError
from .graph import Graph
from .registry import get_op
from .types import DType, TensorType
from .verify import verify as _verify

INT64_MAX = 2 ** 63 - 1
MAX_ATTR_DEPTH = 32     # nesting of list attributes; no op takes more than two levels

_TOKEN = re.compile(r"""
    (?P<ws>\s+)|(?P<comment>//[^\n]*)
  | (?P<value>%[A-Za-z0-9_][A-Za-z0-9_.\-]*)
  | (?P<gname>@[A-Za-z0-9_][A-Za-z0-9_.\-]*)
  | (?P<number>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+|inf\b))
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<punct>[()\[\]{},:=*])
""", re.VERBOSE)


class _Lexer:
    def __init__(self, text: str):
        self.text = text
        self.lines = text.split("\n")
        self.toks = []
        pos, line, line_start = 0, 1, 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                self._fail(f"unexpected character {text[pos]!r}", line, pos - line_start + 1)
            kind = m.lastgroup
            if kind not in ("ws", "comment"):
                self.toks.append((kind, m.group(), line, pos - line_start + 1))
            nl = m.group().count("\n")
            if nl:
                line += nl
                line_start = pos + m.group().rfind("\n") + 1
            pos = m.end()
        self.toks.append(("eof", "", line, 1))
        self.i = 0

    def _fail(self, msg, line, col):
        raise IRParseError(msg, line, col, self.lines[line - 1] if 0 < line <= len(self.lines) else "")

    def fail(self, msg, tok=None):
        _, _, line, col = tok or self.peek()
        self._fail(msg, line, col)

    def peek(self):
        return self.toks[self.i]

    def next(self):
        t = self.toks[self.i]
        self.i += 1
        return t

    def accept(self, text):
        if self.peek()[1] == text and self.peek()[0] in ("punct", "ident"):
            return self.next()
        return None

    def expect(self, text):
        t = self.next()
        if t[1] != text:
            self.fail(f"expected '{text}', found '{t[1] or 'end of text'}'", t)
        return t

    def expect_kind(self, kind, what):
        t = self.next()
        if t[0] != kind:
            self.fail(f"expected {what}, found '{t[1] or 'end of text'}'", t)
        return t


def _items(lx: _Lexer, close: str):
    """Iterate over the items of a comma-separated list up to ``close`` (the opener is consumed)."""
    first = True
    while not lx.accept(close):
        if not first:
            lx.expect(",")
        first = False
        yield


def _parse_type(lx: _Lexer) -> TensorType:
    t = lx.expect_kind("ident", "a dtype such as f32")
    if t[1] not in DType.__members__:
        lx.fail(f"unknown dtype '{t[1]}'; known: {', '.join(DType.__members__)}", t)
    lx.expect("[")
    dims = []
    for _ in _items(lx, "]"):
        d = lx.next()
        if d[0] == "number" and re.fullmatch(r"\d+", d[1]) and int(d[1]) > INT64_MAX:
            lx.fail(f"dim {d[1]} is too large (at most 2**63 - 1)", d)
        if d[0] == "number" and re.fullmatch(r"\d+", d[1]) and lx.peek()[1] != "*":
            dims.append(int(d[1]))
        elif d[0] == "number" and re.fullmatch(r"\d+", d[1]):
            lx.expect("*")
            sym = d[1] + "*" + lx.expect_kind("ident", "a symbol")[1]
            while lx.accept("*"):
                sym += "*" + lx.expect_kind("ident", "a symbol")[1]
            dims.append(sym)
        elif d[0] == "ident":
            sym = d[1]
            while lx.accept("*"):
                sym += "*" + lx.expect_kind("ident", "a symbol")[1]
            dims.append(sym)
        else:
            lx.fail(f"expected a dim (int or symbol), found '{d[1]}'", d)
    return TensorType(tuple(dims), DType[t[1]])


def _parse_attr_value(lx: _Lexer, depth: int = 0):
    t = lx.next()
    kind, text = t[0], t[1]
    if text == "[" and kind == "punct":
        if depth >= MAX_ATTR_DEPTH:
            lx.fail(f"attribute lists nest deeper than {MAX_ATTR_DEPTH} levels", t)
        items = []
        while not lx.accept("]"):
            if items:
                lx.expect(",")
            items.append(_parse_attr_value(lx, depth + 1))
        return items
    if kind == "number":
        if text in ("inf", "-inf"):
            return float(text)
        if not re.fullmatch(r"-?\d+", text):
            return float(text)
        if not -INT64_MAX - 1 <= int(text) <= INT64_MAX:
            lx.fail(f"integer {text} does not fit in 64 bits", t)
        return int(text)
    if kind == "string":
        try:
            return json.loads(text)
        except ValueError as e:   # a bad escape such as \q or a lone surrogate
            lx.fail(f"bad string literal {text}: {e.args[0] if e.args else e}", t)
    if kind == "ident":
        if text in ("true", "false"):
            return text == "true"
        if text == "none":
            return None
        if text == "nan":
            return float("nan")
        while lx.accept("*"):
            text += "*" + lx.expect_kind("ident", "a symbol")[1]
        return text
    lx.fail(f"expected an attribute value, found '{text}'", t)


def parse(text: str, weights: Optional[Mapping[str, torch.Tensor]] = None, verify: bool = True) -> Graph:
    """Parse IR text; ``weights`` (name -> tensor) attaches parameter data. Verifies the result.
    ``text`` is a str (bytes are read as UTF-8)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise IRError(f"IR text must be UTF-8: {e}") from None
    if not isinstance(text, str):
        raise IRError(f"parse takes the IR's text (a str), got {type(text).__name__}")
    lx = _Lexer(text)
    lx.expect("graph")
    g = Graph(lx.expect_kind("gname", "a graph name like @main")[1][1:])
    env = {}

    def define(tok):
        name = tok[1][1:]
        if name in env:
            lx.fail(f"%{name} is defined twice", tok)
        return name

    def use(tok):
        name = tok[1][1:]
        if name not in env:
            lx.fail(f"use of undefined value %{name}", tok)
        return env[name]

    lx.expect("(")
    while not lx.accept(")"):
        if g.inputs:
            lx.expect(",")
        tok = lx.expect_kind("value", "an input like %x")
        name = define(tok)
        lx.expect(":")
        env[name] = g.add_input(name, _parse_type(lx))
    lx.expect("{")
    while True:
        t = lx.peek()
        if t[1] == "param" and t[0] == "ident":
            lx.next()
            tok = lx.expect_kind("value", "a param name")
            name = define(tok)
            lx.expect(":")
            ty = _parse_type(lx)
            data = None
            if weights is not None:
                if name not in weights:
                    lx.fail(f"no weight given for param %{name}", tok)
                data = weights[name]
            env[name] = g.add_param(name, data, ty)
        elif t[1] == "return" and t[0] == "ident":
            lx.next()
            outs = [use(lx.expect_kind("value", "a value to return"))]
            while lx.accept(","):
                outs.append(use(lx.expect_kind("value", "a value to return")))
            g.outputs = outs
            lx.expect("}")
            lx.expect_kind("eof", "end of text")
            break
        elif t[0] == "value":
            results = []
            while True:
                tok = lx.expect_kind("value", "a result name")
                lx.expect(":")
                results.append((define(tok), _parse_type(lx)))
                if not lx.accept(","):
                    break
            lx.expect("=")
            optok = lx.expect_kind("ident", "an op name")
            lx.expect("(")
            operands = []
            for _ in _items(lx, ")"):
                a = lx.next()
                if a[0] == "ident" and a[1] == "_":
                    operands.append(None)
                elif a[0] == "value":
                    operands.append(use(a))
                else:
                    lx.fail(f"expected an operand like %x or _, found '{a[1]}'", a)
            attrs = {}
            if lx.accept("{"):
                while not lx.accept("}"):
                    if attrs:
                        lx.expect(",")
                    key = lx.expect_kind("ident", "an attribute name")[1]
                    lx.expect("=")
                    attrs[key] = _parse_attr_value(lx)
            try:
                opdef = get_op(optok[1])
                where = f"node %{results[0][0]}"
                opdef.check_arity(operands, where)
                node = g.add_node(optok[1], operands, attrs, names=[r[0] for r in results],
                                  out_types=[r[1] for r in results])
            except IRError as e:
                lx.fail(str(e), optok)
            node.meta["line"] = optok[2]
            for v in node.outputs:
                env[v.name] = v
        else:
            lx.fail(f"expected 'param', a node, or 'return', found '{t[1] or 'end of text'}'", t)
    if verify:
        _verify(g, check_data=weights is not None)
    return g
