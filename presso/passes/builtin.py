"""Registration of the built-in passes with the pass manager (one line each)."""
from .canonicalize import canonicalize
from .dce import dce
from .fold_constants import fold_constants
from .manager import register_pass

register_pass("canonicalize")(lambda g, ctx: canonicalize(g))
register_pass("dce")(lambda g, ctx: dce(g))
register_pass("fold_constants")(lambda g, ctx: fold_constants(g))
from . import lowrank  # noqa: F401,E402  (registers itself)
from . import quantize  # noqa: F401,E402
from . import sparsify  # noqa: F401,E402
from . import kv_cache  # noqa: F401,E402
from . import fuse  # noqa: F401,E402
from . import concat_linears  # noqa: F401,E402
