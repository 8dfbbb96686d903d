"""Import an ONNX model into presso IR (opsets 13-23 directly, others through onnx's version converter).

Constant sub-graphs (initializers, ``Constant`` nodes, shape arithmetic on static shapes) are
evaluated at import, so reshape targets and masks arrive as attributes and params. ``Shape`` of a
value with symbolic dims yields a *symbolic shape* (a list of dims) that Gather/Slice/Concat/
Unsqueeze/Squeeze/Cast can rearrange and Reshape/Expand/ConstantOfShape consume.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch

from ..errors import FrontendError, IRError, UnsupportedOpError
from ..ir.graph import Graph, Value
from ..ir.types import DType, TensorType
from . import onnx_proto
from .common import GraphBuilder, clean_name, clean_symbol
from .onnx_table import ONNX_OPS, OPSETS, Seq, SymShape, _dtype, handles

if TYPE_CHECKING:       # read with onnx_proto, which imports the onnx package only where it must
    import onnx

class _Importer:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.b = GraphBuilder(model.graph.name or "onnx_model")
        self.g: Graph = self.b.g
        self.env: dict[str, Any] = {}   # name -> Value | torch.Tensor (constant) | SymShape
        self.node: Optional[onnx.NodeProto] = None

    # -- operands ------------------------------------------------------------------------
    @property
    def where(self) -> str:
        n = self.node
        return f"ONNX node '{n.name or n.output[0]}' ({n.op_type})"

    def has(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] != ""

    def t(self, i: int) -> Optional[Value]:
        """Input i as a graph value (constants become params / 0-d ``full`` nodes on first use)."""
        if not self.has(i):
            return None
        name = self.node.input[i]
        v = self.env[name]
        if isinstance(v, SymShape):
            raise FrontendError(f"{self.where}: a shape with symbolic dims cannot be used as data")
        if isinstance(v, torch.Tensor):
            v = self.env[name] = self.b.const(name, v)
        return v

    def c(self, i: int, what: str):
        """Input i as an import-time constant (tensor or symbolic shape), or a clear error."""
        if not self.has(i):
            return None
        v = self.env[self.node.input[i]]
        if isinstance(v, Value):
            if v.node is not None and v.node.op == "full" and not v.type.shape:
                return torch.tensor(v.node.attrs["value"], dtype=v.type.dtype.torch)
            raise FrontendError(f"{self.where}: {what} must be a constant known at import, "
                                f"but '{self.node.input[i]}' is computed from the model's inputs")
        return v

    def ints(self, i: int, what: str) -> Optional[list]:
        v = self.c(i, what)
        if v is None:
            return None
        return list(v) if isinstance(v, SymShape) else [int(x) for x in v.reshape(-1).tolist()]

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                return onnx_proto.attribute_value(a)
        return default

    def op(self, name, *ins, **attrs) -> Value:
        return self.g.op(name, *ins, **attrs)

    def aten(self, name, *ins, **attrs) -> Value:
        """The first result of the generic ``aten.<name>`` op (see presso/ir/aten_ops.py)."""
        return self.g.add_node(f"aten.{name}", list(ins), attrs).outputs[0]

    def aten_n(self, name, *ins, **attrs) -> list:
        return list(self.g.add_node(f"aten.{name}", list(ins), attrs).outputs)

    def like(self, value, x: Value) -> Value:
        """A 0-d constant of ``x``'s dtype (ONNX ops never mix dtypes, torch would promote)."""
        return self.op("full", value=float(value), shape=[], dtype=x.type.dtype.value)

    def axis(self, a: int, rank: int, what: str = "axis") -> int:
        """An ONNX axis in [-rank, rank) as a non-negative dim, or a FrontendError naming it."""
        if not -rank <= a < rank:
            raise FrontendError(f"{self.where}: attribute '{what}' = {a} is out of range for rank {rank} "
                                f"(allowed: {-rank}..{rank - 1})")
        return a % rank

    def unsupported(self, what: str):
        raise UnsupportedOpError(what, self.node.name or self.node.output[0], f"ONNX node '{self.node.name}'",
                                 sorted(ONNX_OPS))

    # -- driving -------------------------------------------------------------------------
    def run(self) -> Graph:
        gp = self.model.graph
        inits = {i.name for i in gp.initializer}
        for init in gp.initializer:
            try:
                self.env[init.name] = torch.from_numpy(np.array(onnx_proto.to_array(init)))
            except Exception as e:  # noqa: BLE001 - onnx raises KeyError/ValueError/TypeError for bad tensors
                raise FrontendError(f"ONNX initializer '{init.name}' cannot be read (data type {init.data_type}, "
                                    f"dims {list(init.dims)}): {type(e).__name__}: {e}") from None
        for inp in gp.input:
            if inp.name in inits:
                continue
            tt = inp.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else clean_symbol(d.dim_param or f"{inp.name}_{k}")
                    for k, d in enumerate(tt.shape.dim)]
            self.env[inp.name] = self.g.add_input(clean_name(inp.name),
                                                  TensorType(tuple(dims), _dtype(tt.elem_type, f"input {inp.name}")))
        for node in gp.node:
            self.node = node
            if node.domain not in ("", "ai.onnx"):
                self.unsupported(f"{node.domain}.{node.op_type}")
            handler = ONNX_OPS.get(node.op_type)
            if handler is None:
                self.unsupported(node.op_type)
            try:
                if self._all_const(node) and node.op_type not in ("Shape",) and "Sequence" not in node.op_type:
                    outs = self._fold(node)
                else:
                    outs = handler(self)
            except (UnsupportedOpError, FrontendError):
                raise
            except (IRError, ValueError, RuntimeError, TypeError, IndexError) as e:
                raise FrontendError(f"{self.where}: {e}") from None
            outs = outs if isinstance(outs, (list, tuple)) and not isinstance(outs, (SymShape, Seq)) else [outs]
            for name, v in zip(node.output, outs):
                if name:
                    self.env[name] = v
                    if isinstance(v, Value) and v.node is not None and "source" not in v.node.meta:
                        v.node.meta["source"] = f"ONNX node '{node.name}'"
        outs = []
        for o in gp.output:
            v = self.env[o.name]
            if isinstance(v, SymShape):
                raise FrontendError(f"graph output '{o.name}' is a symbolic shape, not a tensor")
            if isinstance(v, Seq):
                raise FrontendError(f"graph output '{o.name}' is an ONNX sequence; presso graphs return tensors")
            outs.append(self.b.const(o.name, v) if isinstance(v, torch.Tensor) else v)
        self.g.outputs = outs
        return self.g

    def _all_const(self, node) -> bool:
        return all(isinstance(self.env.get(i), torch.Tensor) for i in node.input if i)

    def _fold(self, node):
        """Evaluate a node whose inputs are all constants with ONNX's reference evaluator."""
        import onnx
        from onnx.reference import ReferenceEvaluator
        ins = [i for i in node.input if i]
        feeds = {i: self.env[i].numpy() for i in ins}
        g = onnx.helper.make_graph(
            [node], "fold",
            [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(feeds[i].dtype), feeds[i].shape)
             for i in ins],
            [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o])
        m = onnx.helper.make_model(g, opset_imports=self.model.opset_import)
        res = ReferenceEvaluator(m).run(None, feeds)
        return [torch.from_numpy(np.array(r)) for r in res]


# ---- handlers ----------------------------------------------------------------------------
for _o, _p in {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Equal": "eq",
               "Less": "lt", "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge", "And": "logical_and",
               "Or": "logical_or", "MatMul": "matmul"}.items():
    handles(_o)((lambda p: lambda im: im.op(p, im.t(0), im.t(1)))(_p))

for _o, _p in {"Neg": "neg", "Abs": "abs", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Reciprocal": "reciprocal",
               "Tanh": "tanh", "Erf": "erf", "Sigmoid": "sigmoid", "Relu": "relu", "Sin": "sin", "Cos": "cos",
               "Not": "logical_not"}.items():
    handles(_o)((lambda p: lambda im: im.op(p, im.t(0)))(_p))


@handles("Max", "Min")
def _maxmin(im):
    op = "maximum" if im.node.op_type == "Max" else "minimum"
    out = im.t(0)
    for i in range(1, len(im.node.input)):
        out = im.op(op, out, im.t(i))
    return out


@handles("Clip")
def _clip(im):
    out = im.t(0)
    lo, hi = (im.attr("min"), im.attr("max")) if im.attr("min") is not None or im.attr("max") is not None \
        else (im.t(1), im.t(2))
    for bound, op in ((lo, "maximum"), (hi, "minimum")):
        if bound is None:
            continue
        b = bound if isinstance(bound, Value) else im.b.scalar(float(bound))
        out = im.op(op, out, b if b.type.dtype == out.type.dtype else im.op("cast", b, dtype=out.type.dtype.value))
    return out


@handles("Identity", "Dropout")
def _identity(im):
    v = im.env[im.node.input[0]]
    return [v, None] if im.node.op_type == "Dropout" else v


@handles("Gelu")
def _gelu(im):
    return im.op("gelu", im.t(0), approximate=im.attr("approximate", b"none").decode())


@handles("Where")
def _where(im):
    return im.op("where", im.t(0), im.t(1), im.t(2))


@handles("Cast")
def _cast(im):
    dt = _dtype(im.attr("to"), im.where)
    v = im.env[im.node.input[0]]
    if isinstance(v, SymShape):
        return v
    x = im.t(0)
    return x if x.type.dtype == dt else im.op("cast", x, dtype=dt.value)


@handles("Softmax")
def _softmax(im):
    x = im.t(0)
    return im.op("softmax", x, axis=im.axis(im.attr("axis", -1), x.type.rank))


@handles("LayerNormalization")
def _layer_norm(im):
    x = im.t(0)
    axis = im.axis(im.attr("axis", -1), x.type.rank)
    return [im.op("layer_norm", x, im.t(1), im.t(2), eps=im.attr("epsilon", 1e-5), ndim=x.type.rank - axis), None, None]


@handles("Reshape")
def _reshape(im):
    x = im.t(0)
    shape = im.ints(1, "Reshape's shape")
    if not im.attr("allowzero", 0):
        shape = [x.type.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return im.op("reshape", x, shape=shape)


@handles("Unsqueeze")
def _unsqueeze(im):
    v = im.env[im.node.input[0]]
    axes = im.attr("axes") or im.ints(1, "Unsqueeze's axes")
    if isinstance(v, SymShape):
        if v and not (len(axes) == 1 and axes[0] == 0 and len(v) == 1):
            raise FrontendError(f"{im.where}: unsupported rearrangement of a symbolic shape")
        return SymShape(v)
    x = im.t(0)
    shape = list(x.type.shape)
    rank = len(shape) + len(axes)
    for a in sorted(im.axis(a, rank, "axes") for a in axes):
        shape.insert(a, 1)
    return im.op("reshape", x, shape=shape)


@handles("Squeeze")
def _squeeze(im):
    x = im.t(0)
    axes = im.attr("axes") or im.ints(1, "Squeeze's axes")
    axes = {im.axis(a, x.type.rank, "axes") for a in axes} if axes else {i for i, d in enumerate(x.type.shape) if d == 1}
    return im.op("reshape", x, shape=[d for i, d in enumerate(x.type.shape) if i not in axes])


@handles("Transpose")
def _transpose(im):
    x = im.t(0)
    perm = im.attr("perm") or list(reversed(range(x.type.rank)))
    return im.op("transpose", x, perm=list(perm))


@handles("Split")
def _split(im):
    x = im.t(0)
    axis = im.axis(im.attr("axis", 0), x.type.rank)
    sizes = im.attr("split") or im.ints(1, "Split's sizes")
    if not sizes:
        n = im.attr("num_outputs") or len(im.node.output)
        dim = x.type.shape[axis]
        if not isinstance(dim, int):
            raise FrontendError(f"{im.where}: cannot split symbolic dim '{dim}' evenly at import")
        chunk = -(-dim // n)
        sizes = [min(chunk, dim - i * chunk) for i in range(n)]
    return list(im.g.add_node("split", [x], {"axis": axis, "sizes": list(sizes)}).outputs)


@handles("Expand")
def _expand(im):
    x = im.t(0)
    shape = im.ints(1, "Expand's shape")
    # ONNX Expand broadcasts both ways; torch expand needs the result shape.
    rank = max(len(shape), x.type.rank)
    xs = [1] * (rank - x.type.rank) + list(x.type.shape)
    ss = [1] * (rank - len(shape)) + list(shape)
    out = [a if b == 1 else b for a, b in zip(xs, ss)]
    if xs != list(x.type.shape):
        x = im.op("reshape", x, shape=xs)
    return x if out == xs else im.op("expand", x, shape=out)


@handles("Shape")
def _shape(im):
    x = im.env[im.node.input[0]]
    shape = list(x.shape) if isinstance(x, torch.Tensor) else list(x.type.shape)
    start, end = im.attr("start", 0), im.attr("end", len(shape))
    shape = shape[start:end]
    if all(isinstance(d, int) for d in shape):
        return torch.tensor(shape, dtype=torch.int64)
    return SymShape(shape)


@handles("ConstantOfShape")
def _const_of_shape(im):
    shape = im.ints(0, "ConstantOfShape's shape")
    val = im.attr("value")
    arr = onnx_proto.to_array(val) if val is not None else np.zeros(1, np.float32)
    return im.op("full", value=float(arr.reshape(-1)[0]), shape=shape,
                 dtype=DType.from_torch(torch.from_numpy(np.array(arr)).dtype).value)


@handles("Constant")
def _constant(im):
    a = im.node.attribute[0]
    if a.name == "value":
        return torch.from_numpy(np.array(onnx_proto.to_array(a.t)))
    v = onnx_proto.attribute_value(a)
    return torch.tensor(v)


@handles("Range")
def _const_only(im):
    raise FrontendError(f"{im.where}: Range is supported only on constant inputs (its length is data)")


from . import onnx_ops_math, onnx_ops_nn, onnx_ops_resample, onnx_ops_shape  # noqa: E402,F401  (they fill ONNX_OPS)


# ---- entry point -------------------------------------------------------------------------
def load_onnx(model: Union[str, os.PathLike, bytes, onnx.ModelProto]) -> onnx.ModelProto:
    """Load and check an ONNX model, turning every failure into a FrontendError."""
    if isinstance(model, onnx_proto.pb().ModelProto):
        proto = model
    else:
        try:
            proto = onnx_proto.read_model(model)
        except FileNotFoundError:
            raise FrontendError(f"ONNX file not found: {model}") from None
        except Exception as e:  # noqa: BLE001 - protobuf raises several types for corrupt data
            raise FrontendError(f"cannot read ONNX model {model if not isinstance(model, bytes) else '<bytes>'}: "
                                f"malformed or truncated file ({type(e).__name__}: {e})") from None
    try:
        onnx_proto.check_model(proto)
    except Exception as e:  # noqa: BLE001
        raise FrontendError(f"invalid ONNX model: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if len(proto.graph.node) == 0:
        raise FrontendError("invalid ONNX model: the graph has no nodes (empty or truncated file?)")
    return upgrade(proto)


def upgrade(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Bring the default-domain opset into ``OPSETS`` with onnx's own version converter.

    The handlers are written against opsets 13..23 (later opsets change no semantics they rely on
    but add types); an older model is upgraded to 13, a newer one that onnx knows is converted down
    to 23. A model the converter cannot bring across (an op with no adapter) is a FrontendError.
    """
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    allowed = f"opsets {OPSETS.start}..{OPSETS.stop - 1} import directly, 1..{OPSETS.start - 1} and " \
              f"{OPSETS.stop}..{onnx_proto.opset_version()} are converted with onnx.version_converter"
    if opset is None:
        raise FrontendError(f"the ONNX model imports no default-domain (ai.onnx) opset; {allowed}")
    if opset in OPSETS:
        return proto
    if not 1 <= opset <= onnx_proto.opset_version():
        raise FrontendError(f"ONNX default-domain opset {opset} is not supported: {allowed}")
    target = OPSETS.start if opset < OPSETS.start else OPSETS.stop - 1
    try:
        from onnx import version_converter
        return version_converter.convert_version(proto, target)
    except Exception as e:  # noqa: BLE001 - the converter raises RuntimeError/IndexError/... per adapter
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FrontendError(f"ONNX default-domain opset {opset} could not be converted to opset {target} "
                            f"by onnx.version_converter ({msg}); {allowed}") from None


def from_onnx(model: Union[str, os.PathLike, bytes, onnx.ModelProto]) -> Graph:
    """Import an ONNX model (path, bytes or ModelProto)."""
    proto = load_onnx(model)
    g = _Importer(proto).run()
    g.meta["frontend"] = "onnx"
    used = {v.name for n in g.nodes for v in n.inputs if v is not None} | {v.name for v in g.outputs}
    for name in [n for n in g.params if n not in used]:
        g.remove_param(name)
    return g
