"""The op registry: every op is declared once, with its operands, typed attributes, a reference
implementation in torch and (where the reference cannot tell) an explicit type rule.

Type inference by default *runs the reference on meta tensors*: each symbolic dim is replaced by
a distinct large prime, the reference runs on the ``meta`` device (no memory, no compute), and
result sizes are mapped back to symbols (a product of primes maps to a product of symbols). So the
reference is the single source of truth for shapes as well as for numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..errors import IRError
from .types import DType, TensorType, dims_product, eval_dim

REQUIRED = object()
ATTR_KINDS = ("int", "float", "bool", "str", "ints", "floats", "bools", "shape", "dim", "dtype", "scalar")
_PRIMES = (100003, 100019, 100043, 100049, 100057, 100069, 100103, 100109, 100129, 100151,
           100153, 100169, 100183, 100189, 100193, 100207, 100213, 100237, 100267, 100271)


@dataclass
class Attr:
    kind: str
    default: Any = REQUIRED
    choices: Optional[tuple] = None
    optional: bool = False  # None allowed

    def check(self, op: str, name: str, value, where: str):
        if value is None and (self.optional or self.default is None):
            return None
        ok = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, bool),
            "str": lambda v: isinstance(v, str),
            "ints": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
            "floats": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v),
            "bools": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, bool) for x in v),
            "scalar": lambda v: isinstance(v, (int, float, bool)),
            "shape": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in v),
            "dim": lambda v: isinstance(v, (int, str)) and not isinstance(v, bool),
            "dtype": lambda v: isinstance(v, str) and v in DType.__members__,
        }[self.kind](value)
        if not ok:
            raise IRError(f"{where}: attribute '{name}' of op '{op}' must be {self.kind}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise IRError(f"{where}: attribute '{name}' of op '{op}' must be one of {list(self.choices)}, got {value!r}")
        if self.kind == "float":
            return float(value)
        if self.kind in ("ints", "shape", "bools"):
            return list(value)
        if self.kind == "floats":
            return [float(x) for x in value]
        return value


@dataclass
class OpDef:
    name: str
    operands: tuple[str, ...]           # "x", "bias?" (optional), "xs*" (variadic, last only)
    attrs: dict[str, Attr]
    ref: Callable
    category: str
    doc: str = ""
    infer: Optional[Callable] = None     # (input types, attrs) -> list[TensorType]
    verify: Optional[Callable] = None    # (input types, attrs) -> None or raise IRError
    flops: Optional[Callable] = None     # (input types, output types, attrs, bindings) -> int
    dynamic_shape: bool = False          # result sizes depend on operand values (nonzero, unique)
    # a target op (``cuda.rotary``) running a kernel for one canonical op (``rotary``): analyses that
    # walk a graph by meaning (the decode pass's per-token ops) read it as that op
    implements: Optional[str] = None

    # ---- schema -------------------------------------------------------------------------
    @property
    def variadic(self) -> bool:
        return bool(self.operands) and self.operands[-1].endswith("*")

    def operand_names(self) -> list[str]:
        return [o.rstrip("?*") for o in self.operands]

    def check_arity(self, inputs: Sequence, where: str) -> None:
        n_req = sum(1 for o in self.operands if not o.endswith(("?", "*")))
        n_max = math.inf if self.variadic else len(self.operands)
        if not (n_req <= len(inputs) <= n_max):
            raise IRError(f"{where}: op '{self.name}' takes operands ({', '.join(self.operands)}), "
                          f"got {len(inputs)}")
        for spec, v in zip(self.operands, inputs):
            if v is None and "?" not in spec:
                raise IRError(f"{where}: operand '{spec}' of op '{self.name}' is required")

    def complete_attrs(self, attrs: Mapping, where: str) -> dict:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRError(f"{where}: op '{self.name}' has no attribute(s) {sorted(unknown)}; "
                          f"allowed: {sorted(self.attrs) or 'none'}")
        out = {}
        for name, spec in self.attrs.items():
            if name in attrs:
                out[name] = spec.check(self.name, name, attrs[name], where)
            elif spec.default is REQUIRED:
                raise IRError(f"{where}: op '{self.name}' needs attribute '{name}' ({spec.kind})")
            else:
                out[name] = spec.default
        return out

    # ---- execution ----------------------------------------------------------------------
    def resolve_attrs(self, attrs: Mapping, bindings: Mapping[str, int]) -> dict:
        """Attrs with symbolic dims in ``shape`` attributes replaced by their sizes."""
        out = dict(attrs)
        for k, v in attrs.items():
            kind = self.attrs[k].kind
            if kind == "shape" and v is not None:
                out[k] = [eval_dim(d, bindings) for d in v]
            elif kind == "dim" and isinstance(v, str):
                out[k] = eval_dim(v, bindings)
        return out

    def run(self, tensors: Sequence[Optional[torch.Tensor]], attrs: Mapping, bindings: Mapping[str, int] = {}):
        """Run the reference; always returns a list of tensors."""
        args = list(tensors)
        if self.variadic:
            fixed = len(self.operands) - 1
            args = args[:fixed] + [args[fixed:]]
        out = self.ref(*args, **self.resolve_attrs(attrs, bindings))
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def infer_types(self, inputs: Sequence, attrs: Mapping, where: Optional[str] = None) -> list[TensorType]:
        where = where or f"{self.name} node"
        self.check_arity(inputs, where)
        types = [v.type if v is not None else None for v in inputs]
        if self.verify is not None:
            try:
                self.verify(types, attrs)
            except IRError as e:
                raise IRError(f"{where}: {e}") from None
        if self.infer is not None:
            try:
                out = self.infer(types, attrs)
            except IRError as e:
                raise IRError(f"{where}: op '{self.name}' cannot take operands ({_shapes(types)}): {e}") from None
            if out is not None:  # a closed-form rule may leave unusual cases to the meta kernel
                return list(out)
        return meta_infer(self, types, attrs, where)


def _shapes(types: Sequence[Optional[TensorType]]) -> str:
    return ", ".join(str(t) if t is not None else "_" for t in types)


def meta_infer(opdef: OpDef, types: Sequence[Optional[TensorType]], attrs: Mapping, where: str) -> list[TensorType]:
    syms = sorted({s for t in types if t is not None for s in t.symbols}
                  | {s for k, v in attrs.items() if opdef.attrs[k].kind in ("shape", "dim") and v is not None
                     for d in (v if isinstance(v, list) else [v]) if isinstance(d, str) for s in d.split("*")})
    if len(syms) > len(_PRIMES):
        raise IRError(f"{where}: too many distinct symbolic dims ({len(syms)})")
    bind = dict(zip(syms, _PRIMES))
    metas = [None if t is None else torch.empty(t.storage_shape(bind), dtype=t.dtype.torch, device="meta")
             for t in types]
    try:
        with torch.device("meta"):  # creation ops (no tensor operand) allocate nothing either
            outs = opdef.run(metas, attrs, bind)
    except IRError:
        raise
    except Exception as e:  # the reference rejected the operand types: report it as a typing error
        raise IRError(f"{where}: op '{opdef.name}' cannot take operands ({_shapes(types)}) "
                      f"with attributes {dict(attrs)}: {e}") from None
    inv = {p: s for s, p in bind.items()}
    return [TensorType(tuple(_unprime(d, inv, where) for d in o.shape), DType.from_torch(o.dtype)) for o in outs]


def _unprime(size: int, inv: Mapping[int, str], where: str):
    """Map a size computed with primes back to ``int`` or ``[coef*]sym[*sym...]``."""
    parts, rest = [], size
    for p in sorted(inv):
        while rest % p == 0 and rest:
            parts.append(inv[p])
            rest //= p
    if not parts:
        return size
    return dims_product([rest, *parts])


_REGISTRY: dict[str, OpDef] = {}


def defop(name: str, operands: Sequence[str], attrs: Optional[dict] = None, category: str = "misc",
          infer=None, verify=None, flops=None, implements: Optional[str] = None):
    """Declare an op; decorates its reference implementation. A target op (``<target>.<kernel>``)
    names the canonical op it ``implements`` when it computes that op (with its operands first)."""
    def wrap(ref):
        if name in _REGISTRY:
            raise IRError(f"op '{name}' is defined twice")
        _REGISTRY[name] = OpDef(name, tuple(operands), dict(attrs or {}), ref, category,
                                (ref.__doc__ or "").strip(), infer, verify, flops, implements=implements)
        return ref
    return wrap


def canonical_op(name: str) -> str:
    """The canonical op a node of op ``name`` computes: the op a target op implements, else ``name``."""
    return get_op(name).implements or name


# families of ops defined on first use (core ATen, ``aten_ops.py``): (lookup(name) -> OpDef | None,
# names() -> every name); a family registers itself when its module is imported (``ir/__init__``)
_FAMILIES: list[tuple[Callable[[str], Optional[OpDef]], Callable[[], list]]] = []


def register_family(lookup: Callable[[str], Optional[OpDef]], names: Callable[[], list]) -> None:
    """Add a family of ops whose definitions are generated on first use."""
    _FAMILIES.append((lookup, names))


def get_op(name: str) -> OpDef:
    """The op called ``name``: one of presso's own, or a core ATen op (``aten.<op>[.<overload>]``),
    whose definition is generated from torch's schema on first use."""
    op = _REGISTRY.get(name)
    for lookup, _ in _FAMILIES if op is None else ():
        op = lookup(name)
        if op is not None:
            break
    if op is None:
        raise IRError(f"unknown op '{name}': not one of presso's {len(_REGISTRY)} ops (presso.ir.all_ops()) "
                      "and not a core ATen op such as 'aten.acos' or 'aten.add.Tensor'")
    return op


def all_ops(include_aten: bool = False) -> dict[str, OpDef]:
    """presso's own ops; with ``include_aten``, every core ATen op too."""
    out = dict(_REGISTRY)
    if include_aten:
        for _, names in _FAMILIES:
            out.update({n: get_op(n) for n in names()})
    return out
