"""Core ATen as presso ops, defined by construction from torch's own op schemas.

Every ATen overload that ``ExportedProgram.run_decompositions()`` can leave in a graph -- the ops
tagged ``core``, and the functional ops torch has no decomposition for (``linalg_*``, ``special_*``,
...) -- is a presso op named ``aten.<op>`` (the ``default`` overload) or ``aten.<op>.<overload>``. Its
definition is generated from the schema, on first use, instead of written by hand:

- tensor arguments become operands (``Tensor?`` optional, ``Tensor[]`` / ``Tensor?[]`` variadic);
- every other argument becomes a typed attribute with the schema's default
  (int -> ``dim`` so sizes may be symbolic, int[] -> ``shape``, number -> ``scalar``, ScalarType ->
  ``dtype``, ...); device, layout, memory-format and pin-memory arguments are not part of the IR;
- the reference implementation is the ATen overload itself, so type inference (on meta tensors)
  and numbers both come from torch.

presso's own typed ops (``linear``, ``attention``, ``rms_norm``, ...) stay what the passes match on;
these generic ops carry everything else a model may contain.
"""
from __future__ import annotations

import functools
import itertools
from typing import Optional

import torch

from .registry import _PRIMES, REQUIRED, Attr, OpDef, _unprime, register_family
from .types import DType, TensorType

PREFIX = "aten."
_DROPPED = ("Optional[Device]", "Device", "Optional[Layout]", "Layout", "Optional[MemoryFormat]",
            "MemoryFormat", "Optional[Generator]", "Generator")
_DROPPED_NAMES = ("pin_memory",)
_SCALAR_TYPES = {0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64,
                 5: torch.float16, 6: torch.float32, 7: torch.float64, 9: torch.complex64,
                 10: torch.complex128, 11: torch.bool, 15: torch.bfloat16}
_ATTR_KIND = {"int": "dim", "SymInt": "dim", "List[int]": "shape", "List[SymInt]": "shape",
              "float": "float", "List[float]": "floats", "bool": "bool", "List[bool]": "bools",
              "number": "scalar", "str": "str", "ScalarType": "dtype"}


def ir_name(overload: torch._ops.OpOverload) -> str:
    """``aten.add.Tensor`` -> ``aten.add.Tensor``; ``aten.acos.default`` -> ``aten.acos``."""
    packet = overload.overloadpacket.__name__
    name = overload._overloadname
    return f"{PREFIX}{packet}" if name == "default" else f"{PREFIX}{packet}.{name}"


def overload_of(name: str) -> Optional[torch._ops.OpOverload]:
    """The ATen overload an IR name denotes, or None if there is no such core op."""
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX):].split(".")
    if len(parts) not in (1, 2) or not all(parts):
        return None
    packet = getattr(torch.ops.aten, parts[0], None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    ov = getattr(packet, parts[1] if len(parts) == 2 else "default", None)
    return ov if isinstance(ov, torch._ops.OpOverload) and admitted(ov) else None


def admitted(overload) -> bool:
    """A functional ATen overload that is core, or that torch cannot decompose further."""
    return isinstance(overload, torch._ops.OpOverload) and overload.namespace == "aten" \
        and not overload._schema.is_mutable and unsupported_reason(overload) is None \
        and (torch.Tag.core in overload.tags or not has_decomposition(overload))


def has_decomposition(overload) -> bool:
    return overload in _decompositions() or torch._C.DispatchKey.CompositeImplicitAutograd in _cia_keys(overload)


def _cia_keys(overload):
    try:
        cia = overload.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd)
    except RuntimeError:  # an overload torch lists but has not registered
        cia = False
    return (torch._C.DispatchKey.CompositeImplicitAutograd,) if cia else ()


@functools.lru_cache(maxsize=1)
def _decompositions() -> dict:
    """torch.export's default decomposition table (to core ATen), built once."""
    import torch.export
    return dict(torch.export.default_decompositions().items())


def decomposition_table(targets) -> dict:
    """torch's decompositions of ``targets`` (those that have one; CompositeImplicitAutograd ops
    decompose through their own kernel)."""
    table = _decompositions()
    out = {}
    for t in targets:
        if t in table:
            out[t] = table[t]
        elif _cia_keys(t):
            out[t] = t.decompose
    return out


@functools.lru_cache(maxsize=None)
def unsupported_reason(overload) -> Optional[str]:
    """Why an overload's schema cannot be a presso op (None when it can)."""
    schema = overload._schema
    if not schema.returns or not all(str(r.type) in ("Tensor", "List[Tensor]") for r in schema.returns):
        return "it returns a non-tensor"
    lists = [a for a in schema.arguments if _type(a) in ("List[Tensor]", "List[Optional[Tensor]]")]
    if len(lists) > 1:
        return "it takes more than one tensor list"
    for a in schema.arguments:
        t = _type(a)
        if t.startswith("Optional[") and t[9:-1] in _ATTR_KIND:
            t = t[9:-1]
        if not (_is_tensor(t) or t in _ATTR_KIND or _dropped(a)):
            return f"argument '{a.name}' has type {t}"
    return None


def _type(arg) -> str:
    return str(getattr(arg, "real_type", arg.type))


def _is_tensor(t: str) -> bool:
    return t in ("Tensor", "Optional[Tensor]", "List[Tensor]", "List[Optional[Tensor]]")


def _dropped(arg) -> bool:
    return _type(arg) in _DROPPED or arg.name in _DROPPED_NAMES


def _attr_of(arg) -> Attr:
    t = _type(arg)
    optional = t.startswith("Optional[")
    kind = _ATTR_KIND[t[9:-1] if optional else t]
    default = arg.default_value if arg.has_default_value() else REQUIRED
    if kind == "dtype" and isinstance(default, int) and not isinstance(default, bool):
        default = _SCALAR_TYPES[default]   # schemas give a default ScalarType as its enum number
    if kind == "dtype" and isinstance(default, torch.dtype):
        default = DType.from_torch(default).value
    if isinstance(default, tuple):
        default = list(default)
    return Attr(kind, default, optional=optional or default is None)


@functools.lru_cache(maxsize=None)
def opdef_for(name: str) -> Optional[OpDef]:
    """The presso op for a core ATen overload, built from its schema (None if ``name`` is not one)."""
    overload = overload_of(name)
    if overload is None:
        return None
    schema = overload._schema
    tensors = [a for a in schema.arguments if _is_tensor(_type(a))]
    # a tensor list is the variadic operand, which must come last
    tensors.sort(key=lambda a: _type(a).startswith("List["))
    operands = []
    for a in tensors:
        t = _type(a)
        operands.append(a.name + ("?*" if t == "List[Optional[Tensor]]" else "*" if t == "List[Tensor]"
                                  else "?" if t == "Optional[Tensor]" else ""))
    attrs = {a.name: _attr_of(a) for a in schema.arguments if not _is_tensor(_type(a)) and not _dropped(a)}
    ref = _reference(overload, [a.name for a in tensors], attrs)
    doc = f"ATen ``{schema}`` (core ATen; reference: the ATen op itself)."
    # a seeded-random op is never folded or merged: each run draws new numbers, as in eager torch
    category = "random" if torch.Tag.nondeterministic_seeded in overload.tags else "aten"
    op = OpDef(name, tuple(operands), attrs, ref, category, doc)
    if torch.Tag.dynamic_output_shape in overload.tags:
        op.dynamic_shape = True
        op.infer = lambda types, attrs: _fake_infer(op, types, attrs)
    return op


DYNAMIC_PREFIX = "dyn"
_fresh = itertools.count()


def _fake_infer(op: OpDef, types, attrs) -> list[TensorType]:
    """Types of an op whose result sizes depend on operand values: torch's fake tensors give each
    such size an unbacked symbol, which becomes a fresh IR symbol (``dyn<k>``). The verifier lets a
    node declare any symbol there; the runtime binds it from the result it computes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    syms = sorted({s for t in types if t is not None for s in t.symbols})
    bind = dict(zip(syms, _PRIMES))
    with FakeTensorMode(shape_env=ShapeEnv()):
        fakes = [None if t is None else torch.empty(t.storage_shape(bind), dtype=t.dtype.torch) for t in types]
        outs = op.run(fakes, attrs, bind)
    inv = {p: s for s, p in bind.items()}
    names: dict[str, str] = {}
    result = []
    for o in outs:
        dims = []
        for d in o.shape:
            if isinstance(d, torch.SymInt) and not d.node.expr.is_number:
                key = str(d)
                if key not in names:
                    names[key] = f"{DYNAMIC_PREFIX}{next(_fresh)}"
                dims.append(names[key])
            else:
                dims.append(_unprime(int(d), inv, op.name))
        result.append(TensorType(tuple(dims), DType.from_torch(o.dtype)))
    return result


def _reference(overload, tensor_names: list[str], attrs: dict[str, Attr]):
    schema = overload._schema
    dtypes = {n for n, a in attrs.items() if a.kind == "dtype"}

    def ref(*tensors, **values):
        given = dict(zip(tensor_names, tensors))
        for n in dtypes:
            if values.get(n) is not None:
                values[n] = DType[values[n]].torch
        args, kwargs = [], {}
        for a in schema.arguments:
            if a.name in given:
                v = given[a.name]
            elif a.name in values:
                v = values[a.name]
            else:
                continue  # device / layout / memory format: the defaults
            if a.kwarg_only:
                kwargs[a.name] = v
            else:
                args.append(v)
        return overload(*args, **kwargs)

    ref.__name__ = overload.__name__
    return ref


def core_aten_names() -> list[str]:
    """The IR names of every ATen overload presso admits as a generic op."""
    out = []
    for attr in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, attr, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for ov in packet.overloads():
            o = getattr(packet, ov)
            if admitted(o):
                out.append(ir_name(o))
    return sorted(out)


register_family(opdef_for, core_aten_names)
