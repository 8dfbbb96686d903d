"""The built-in passes that are plain graph functions, registered with the pass table (one line each)."""
from .canonicalize import canonicalize
from .dce import dce
from .fold_constants import fold_constants
from .registry import register_pass

register_pass("canonicalize")(lambda g, ctx: canonicalize(g))
register_pass("dce")(lambda g, ctx: dce(g))
register_pass("fold_constants")(lambda g, ctx: fold_constants(g))
