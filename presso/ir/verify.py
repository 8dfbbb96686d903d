"""The verifier, run after every pass: SSA, order (hence no cycles), no dangling uses, params
exist and match their types, attributes valid, and result types equal to the op's inference."""
from __future__ import annotations

from ..errors import IRError, VerificationError
from .aten_ops import DYNAMIC_PREFIX
from .graph import Graph
from .registry import get_op


def verify(g: Graph, check_data: bool = True) -> None:
    defined = set()
    names = set()

    def define(v, what):
        if v.name in names:
            raise VerificationError(f"value %{v.name} ({what}) is defined more than once (SSA)")
        names.add(v.name)
        defined.add(id(v))

    for v in g.inputs:
        define(v, "graph input")
    for name, p in g.params.items():
        if p.value.name != name:
            raise VerificationError(f"param table key '{name}' names value %{p.value.name}")
        define(p.value, "param")
        if not p.value.type.is_static:
            raise VerificationError(f"param %{name}: {p.value.type} has symbolic dims; a param's shape is fixed")
        if check_data:
            if p.data is None:
                raise VerificationError(f"param %{name} has no data")
            want = p.value.type.storage_shape()
            if tuple(p.data.shape) != want or p.data.dtype != p.value.type.dtype.torch:
                raise VerificationError(
                    f"param %{name}: data is {p.data.dtype}{list(p.data.shape)} but its type "
                    f"{p.value.type} needs storage {p.value.type.dtype.torch}{list(want)}")
    for n in g.nodes:
        where = f"node %{n.name} ({n.op})"
        for i, v in enumerate(n.inputs):
            if v is None:
                continue
            if id(v) not in defined:
                state = "defined later (cycle or bad order)" if v.name in {o.name for m in g.nodes for o in m.outputs} \
                    else "not defined in this graph (dangling use)"
                raise VerificationError(f"{where}: operand {i} %{v.name} is {state}")
        try:
            opdef = get_op(n.op)
            opdef.complete_attrs(n.attrs, where)
            inferred = opdef.infer_types(n.inputs, n.attrs, where)
        except VerificationError:
            raise
        except IRError as e:
            raise VerificationError(str(e)) from None
        if len(inferred) != len(n.outputs):
            raise VerificationError(f"{where}: op yields {len(inferred)} results, node declares {len(n.outputs)}")
        for v, t in zip(n.outputs, inferred):
            if v.type != t and not (opdef.dynamic_shape and _dynamic_match(v.type, t)):
                raise VerificationError(f"{where}: result %{v.name} is declared {v.type} but op '{n.op}' "
                                        f"infers {t} from its operands")
            if v.node is not n:
                raise VerificationError(f"{where}: result %{v.name} does not point back to its node")
        for v in n.outputs:
            define(v, f"result of {n.op}")
    if not g.outputs:
        raise VerificationError("graph has no outputs")
    for v in g.outputs:
        if id(v) not in defined:
            raise VerificationError(f"graph output %{v.name} is not defined in this graph")


def _dynamic_match(declared, inferred) -> bool:
    """A value-dependent size (``dyn<k>`` from inference) may be declared as any symbol."""
    if declared.dtype != inferred.dtype or declared.rank != inferred.rank:
        return False
    return all(a == b or (isinstance(b, str) and b.startswith(DYNAMIC_PREFIX) and isinstance(a, str))
               for a, b in zip(declared.shape, inferred.shape))
