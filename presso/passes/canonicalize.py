"""canonicalize: constant folding, simplification and recognition of high-level ops, to a
fixpoint, then DCE. After it, the torch and ONNX imports of one model have the same ops."""
from __future__ import annotations

from ..ir.graph import Graph
from . import recognize, simplify
from .dce import dce
from .fold_constants import fold_constants
from .rewrite import apply_patterns


def _merge(*tables):
    out: dict = {}
    for t in tables:
        for op, pats in t.items():
            out.setdefault(op, []).extend(pats)
    return out


PATTERNS = _merge(simplify.PATTERNS, recognize.PATTERNS)


def canonicalize(g: Graph) -> Graph:
    for _ in range(10):
        fold_constants(g)
        if not apply_patterns(g, PATTERNS):
            break
    return dce(g)
