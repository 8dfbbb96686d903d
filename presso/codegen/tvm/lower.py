"""presso IR -> one TVM Relax function.

Each presso op lowers through one entry of ``LOWER`` (a Relax op, or a tensor expression via
``emit_te`` where Relax has no equivalent). Kernels are selected in the IR first (``select.py``):
linear layers whose weight is a parameter -- dense, ``dequantize``-d or ``densify_nm``-ed -- are
``llvm.*`` ops, each one ``packed_linear`` kernel reading the compressed storage (see
``linear.py``), their weight producers gone from the graph.

Symbolic dims (``batch``, ``batch*seq``) become TIR variables, so one module serves every size.
Parameters are function arguments (not constants baked into the library): the compiled code stays
small and the artifact keeps weights in safetensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import CodegenError
from ...ir.graph import Graph, Node, Value
from ...ir.ops import INT64_MAX, hadamard_matrix
from ...ir.types import DType, TensorType
from . import hadamard as fwht
from . import int8_avx2
from . import linear as lin
from .attention import emit_softmax
from .select import select_kernels
from .table import LOWER, TVM_DTYPE, lowers


@dataclass
class FusedLinear:
    """A linear node whose weight the kernel reads from packed params."""
    spec: lin.WeightSpec
    param_names: list          # runtime param names, one per spec.arrays entry


@dataclass
class Lowered:
    """The Relax module and what its ``main`` takes after the graph inputs: (name, numpy array)."""
    mod: object
    params: list


def _promote(a: TensorType, b: TensorType) -> str:
    """torch's result dtype for an elementwise op on a and b, the dtype the IR gives its result: a
    0-d operand does not widen a dimensioned one of the same category (i32[n] + i64[] is i32)."""
    probe = [torch.empty((1,) * t.rank, dtype=t.dtype.torch, device="meta") for t in (a, b)]
    return TVM_DTYPE[DType.from_torch(torch.result_type(*probe))]


class Lowering:
    def __init__(self, graph: Graph, target_spec: dict | None = None):
        from tvm import relax, te, tirx
        self.rx, self.te, self.tirx = relax, te, tirx
        self.g = select_kernels(graph, target_spec)      # in place; a no-op on a selected graph
        self.target_spec = target_spec or {}
        self.prim_funcs: dict[str, object] = {}
        self.u8_codes: set[Value] = set()      # quantize_per_token codes lowered as u8 (code + 64)
        self.users = graph.users()
        self.rotated_in_quant: set[Node] = set()   # hadamard nodes done inside their quantize kernel
        self.syms: dict[str, object] = {}
        self.env: dict[Value, object] = {}
        self.bb = relax.BlockBuilder()
        self.fused: dict[Node, FusedLinear] = {}
        self.tied_lookups: dict[Node, FusedLinear] = {}   # gather_dequantize reading a fused linear's tiles

    # ---- types -------------------------------------------------------------------------------
    def dim(self, d):
        if isinstance(d, int):
            return d
        out = 1
        for part in d.split("*"):
            if part.isdigit():
                out = out * int(part)
            else:
                if part not in self.syms:
                    self.syms[part] = self.tirx.Var(part, "int64")
                out = out * self.syms[part] if not (isinstance(out, int) and out == 1) else self.syms[part]
        return out

    def shape(self, t: TensorType):
        return [self.dim(d) for d in _storage_dims(t)]

    def sinfo(self, t: TensorType):
        return self.rx.TensorType(self.shape(t), TVM_DTYPE[t.dtype])

    # ---- planning: the prepacked weights of the selected linears ----------------------------------
    def plan(self) -> list:
        """Prepack the selected linears' weights; return the runtime params (name, array) in argument order."""
        g = self.g
        arrays: list = []
        used_raw: set[str] = set()
        for n in g.nodes:
            fl = self._fusable_linear(n) if n.op in PACKED_INPUTS else None
            if fl is not None:
                self.fused[n] = fl
                for (suffix, arr), name in zip(fl.spec.arrays.items(), fl.param_names):
                    arrays.append((name, arr))
        self.tied_lookups = _tied_lookups(g, self.fused)
        for n in g.nodes:
            for i, v in enumerate(n.inputs):
                if v is not None and v.kind == "param" and i not in self._packed_inputs(n):
                    used_raw.add(v.name)
        used_raw.update(v.name for v in g.outputs if v.kind == "param")   # a constant-folded output
        for name in sorted(used_raw):
            p = g.params[name]
            arrays.append((name, p.data.contiguous().numpy()))
        return arrays

    def _fusable_linear(self, n: Node):
        g = self.g
        data = [None if v is None or v.kind != "param" else g.params[v.name].data for v in n.inputs]
        w = n.inputs[PACKED_INPUTS[n.op][0]]
        if n.op == "llvm.w8a7_avx2_linear":
            rows, cols = w.type.shape
            spec = lin.WeightSpec("avx2_u8s8", rows, cols, 8, dtype="int8",
                                  arrays=int8_avx2.prepack(g.params[w.name].data.numpy()))
        elif n.op in ("llvm.packed_linear", "llvm.int8_linear"):
            spec = lin.prepack_dense(g.params[w.name].data)
        elif n.op == "llvm.quant_linear":
            spec = lin.prepack_quant(data[1], data[2], data[3], n.attrs["bits"], n.attrs["group_size"],
                                     signed=n.inputs[3] is None, out_dtype=TVM_DTYPE[DType[n.attrs["dtype"]]])
        else:
            spec = lin.prepack_nm(data[1], data[2], n.attrs["n"], n.attrs["m"])
        # (a weight read through a producer is named after its linear: the tiles are that linear's)
        base = w.name if len(PACKED_INPUTS[n.op]) == 1 else f"{n.name}.weight"
        names = [f"{base}.{k}.tiled{spec.nj}" for k in spec.arrays]
        return FusedLinear(spec, names)

    # ---- building --------------------------------------------------------------------------
    def build(self) -> Lowered:
        rx, g = self.rx, self.g
        arrays = self.plan()
        args = [rx.Var(v.name, self.sinfo(v.type)) for v in g.inputs]
        pvars = {name: rx.Var(_safe(name), rx.TensorType(list(arr.shape), str(arr.dtype))) for name, arr in arrays}
        for v, a in zip(g.inputs, args):
            self.env[v] = a
        for name, p in g.params.items():
            if name in pvars:
                self.env[p.value] = pvars[name]
        self.pvars = pvars
        with self.bb.function("main", args + list(pvars.values())):
            with self.bb.dataflow():
                for n in g.nodes:
                    self._lower_node(n)
                outs = [self.env[v] for v in g.outputs]
                out = self.bb.emit_output(outs[0] if len(outs) == 1 else rx.Tuple(outs))
            self.bb.emit_func_output(out)
        return Lowered(self.bb.get(), arrays)

    def _lower_node(self, n: Node):
        fn = LOWER.get(n.op)
        if fn is None:
            raise CodegenError(f"node '{n.name}': op '{n.op}' has no TVM lowering (the {len(LOWER)} lowered ops: "
                               "presso.codegen.tvm.table.LOWER, listed in docs/architecture.md)")
        skip = self._packed_inputs(n)      # read from packed params instead
        ins = [None if v is None or i in skip else self.env[v] for i, v in enumerate(n.inputs)]
        try:
            res = fn(self, n, ins)
        except CodegenError:
            raise
        except Exception as e:  # noqa: BLE001 - TVM raises many error types; name the node at fault
            raise CodegenError(f"node '{n.name}' (op '{n.op}'): TVM lowering failed: {e}") from e
        res = res if isinstance(res, (list, tuple)) else [res]
        for v, r in zip(n.outputs, res):
            self.env[v] = self._with_shape(r, v)

    def _with_shape(self, expr, v: Value):
        """``expr`` with the IR's shape stated where Relax lost it or wrote it another way
        (``min(seq, 128)`` for a slice the IR knows is ``seq`` long): a later node's broadcast and
        ``emit_te`` need operands whose symbolic dims match."""
        ty = getattr(expr, "ty", None)
        if not isinstance(ty, self.rx.TensorType) or v is None or v.type.rank != ty.ndim:
            return expr
        want = self.sinfo(v.type)
        if ty.shape is not None and str(ty.shape) == str(want.shape):
            return expr
        return self.bb.match_cast(expr, want)

    def _packed_inputs(self, n: Node) -> tuple:
        """Operand positions a node reads from prepacked params rather than as given."""
        if n in self.fused:
            return PACKED_INPUTS[n.op]
        return (1, 2, 3) if n in self.tied_lookups else ()

    def emit(self, expr):
        return self.bb.emit(expr)

    def kernel(self, name: str, make):
        """The hand-written TIR function ``name`` (built by ``make()``), added to the module once."""
        if name not in self.prim_funcs:
            self.prim_funcs[name] = self.bb.add_func(make().with_attr("global_symbol", name), name)
        return self.prim_funcs[name]

    def emit_te(self, f, *args, name=None):
        return self.bb.emit_te(f, *args, primfunc_name_hint=name or f.__name__)

    def cast(self, e, v: Value, dtype: str):
        return e if TVM_DTYPE[v.type.dtype] == dtype else self.emit(self.rx.op.astype(e, dtype))


# the selected linears: the operand positions read from prepacked params (the weight first)
PACKED_INPUTS = {"llvm.packed_linear": (1,), "llvm.quant_linear": (1, 2, 3), "llvm.nm_linear": (1, 2),
                 "llvm.int8_linear": (2,), "llvm.w8a7_avx2_linear": (2,)}


def _tied_lookups(g: Graph, fused: dict) -> dict:
    """``llvm.tied_gather_dequant`` nodes -> the quantized linear whose column tiles they read (a
    tied LM head reading the same codes, scales and zeros), so the table is held once."""
    tiles = {(tuple(n.inputs[1:4]), n.attrs["bits"], n.attrs["group_size"]): fl
             for n, fl in fused.items() if n.op == "llvm.quant_linear"}
    out = {}
    for n in g.nodes:
        if n.op == "llvm.tied_gather_dequant":
            fl = tiles.get((tuple(n.inputs[1:]), n.attrs["bits"], n.attrs["group_size"]))
            if fl is None:
                raise CodegenError(f"node '{n.name}': {n.op} reads a table no llvm.quant_linear reads")
            out[n] = fl
    return out


def _storage_dims(t: TensorType):
    if t.dtype.is_packed:
        *lead, last = t.shape
        return list(lead) + [last // 2 if isinstance(last, int) else last]
    return list(t.shape)


def _safe(name: str) -> str:
    return "p_" + "".join(c if c.isalnum() else "_" for c in name)


# ---- op lowerings ------------------------------------------------------------------------------


_BINARY = {"add": "add", "sub": "subtract", "mul": "multiply", "div": "divide", "pow": "power",
           "maximum": "maximum", "minimum": "minimum", "eq": "equal", "ne": "not_equal", "lt": "less",
           "le": "less_equal", "gt": "greater", "ge": "greater_equal", "logical_and": "logical_and",
           "logical_or": "logical_or"}
_UNARY = {"neg": "negative", "abs": "abs", "exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt",
          "tanh": "tanh", "erf": "erf", "sigmoid": "sigmoid", "sin": "sin", "cos": "cos", "logical_not": "logical_not"}


@lowers(*_BINARY)
def _binary(L, n, ins):
    a, b = n.inputs
    dt = "bool" if n.op in ("logical_and", "logical_or") else _promote(a.type, b.type)
    if n.op == "div" and not dt.startswith("float"):
        dt = TVM_DTYPE[n.output.type.dtype]
    return L.emit(getattr(L.rx.op, _BINARY[n.op])(L.cast(ins[0], a, dt), L.cast(ins[1], b, dt)))


@lowers(*_UNARY)
def _unary(L, n, ins):
    x = L.cast(ins[0], n.inputs[0], "bool") if n.op == "logical_not" else ins[0]
    return L.emit(getattr(L.rx.op, _UNARY[n.op])(x))


@lowers("relu")
def _relu(L, n, ins):
    return L.emit(L.rx.op.nn.relu(ins[0]))


# exp, erf and tanh through TVM's fast polynomial forms: they vectorize (libm calls do not), and
# stay within float32 rounding of the exact functions over the range activations take.
def _fast_float(x, f):
    """Apply ``f`` in float32 (TVM's fast math covers float32) and cast back."""
    from tvm import topi
    xf = topi.cast(x, "float32") if x.dtype != "float32" else x
    y = f(xf)
    return topi.cast(y, x.dtype) if x.dtype != "float32" else y


@lowers("silu", "sigmoid")
def _sigmoid_like(L, n, ins):
    def f(x):
        from tvm import te, topi

        def g(xf):
            e = topi.fast_exp(te.compute(xf.shape, lambda *i: -xf[i], name="neg"))
            if n.op == "sigmoid":
                return te.compute(xf.shape, lambda *i: 1.0 / (1.0 + e[i]), name="sigmoid")
            return te.compute(xf.shape, lambda *i: xf[i] / (1.0 + e[i]), name="silu")
        return _fast_float(x, g)
    return L.emit_te(f, ins[0], name=n.op)


@lowers("gelu")
def _gelu(L, n, ins):
    tanh = n.attrs["approximate"] == "tanh"

    def f(x):
        from tvm import te, topi

        def g(xf):
            if tanh:
                inner = te.compute(xf.shape, lambda *i: 0.7978845608028654 * (xf[i] + 0.044715 * xf[i] * xf[i] * xf[i]),
                                   name="gelu_inner")
                t = topi.fast_tanh(inner)
            else:
                t = topi.fast_erf(te.compute(xf.shape, lambda *i: xf[i] * 0.7071067811865476, name="gelu_inner"))
            return te.compute(xf.shape, lambda *i: 0.5 * xf[i] * (1.0 + t[i]), name="gelu")
        return _fast_float(x, g)
    return L.emit_te(f, ins[0], name="gelu")


@lowers("fused_elementwise")
def _fused(L, n, ins):
    """A fused region (``fuse`` pass) lowers op by op; Relax fuses it again into one function."""
    from ...ir.expr import Arg, Const, parse
    rx = L.rx

    def emit(e):
        if isinstance(e, Arg):
            return ins[e.index]
        if isinstance(e, Const):
            return rx.const(e.value, TVM_DTYPE[DType[e.dtype]])
        args = [emit(a) for a in e.args]
        if e.op in _BINARY:
            return L.emit(getattr(rx.op, _BINARY[e.op])(*args))
        if e.op in _UNARY:
            return L.emit(getattr(rx.op, _UNARY[e.op])(*args))
        if e.op == "cast":
            return L.emit(rx.op.astype(args[0], TVM_DTYPE[DType[e.attr]]))
        if e.op == "where":
            return L.emit(rx.op.where(*args))
        if e.op == "reciprocal":
            return L.emit(rx.op.divide(rx.const(1.0, "float32"), args[0]))
        return L.emit(getattr(rx.op.nn, {"gelu": "gelu_tanh" if e.attr == "tanh" else "gelu"}.get(e.op, e.op))(args[0]))
    return emit(parse(n.attrs["expr"]))


@lowers("where")
def _where(L, n, ins):
    c, a, b = n.inputs
    dt = _promote(a.type, b.type)
    cond = L.cast(ins[0], c, "bool")
    return L.emit(L.rx.op.where(cond, L.cast(ins[1], a, dt), L.cast(ins[2], b, dt)))


@lowers("cast")
def _cast(L, n, ins):
    return L.emit(L.rx.op.astype(ins[0], TVM_DTYPE[DType[n.attrs["dtype"]]]))


@lowers("full")
def _full(L, n, ins):
    t = n.output.type
    dt = TVM_DTYPE[t.dtype]
    if t.is_static:
        return L.rx.const(np.full(t.shape, n.attrs["value"], dtype=dt), dt)
    return L.emit(L.rx.op.full(L.shape(t), L.rx.const(n.attrs["value"], dt), dt))


@lowers("arange")
def _arange(L, n, ins):
    a = n.attrs
    return L.emit(L.rx.op.arange(a["start"], L.dim(a["end"]), a["step"], TVM_DTYPE[DType[a["dtype"]]]))


@lowers("reduce_sum", "reduce_mean", "reduce_max")
def _reduce(L, n, ins):
    f = {"reduce_sum": L.rx.op.sum, "reduce_mean": L.rx.op.mean, "reduce_max": L.rx.op.max}[n.op]
    axes = n.attrs["axes"] or None
    x = L.cast(ins[0], n.inputs[0], TVM_DTYPE[n.output.type.dtype])   # a sum of bools counts in i64
    return L.emit(f(x, axis=axes, keepdims=n.attrs["keepdim"]))


@lowers("softmax")
def _softmax(L, n, ins):
    return emit_softmax(L, ins[0], n.attrs["axis"] % n.inputs[0].type.rank)


@lowers("linear", "llvm.packed_linear", "llvm.quant_linear", "llvm.nm_linear")
def _linear(L, n, ins):
    b = n.inputs[-1]
    out_t = n.output.type
    fl = L.fused.get(n)
    if fl is None:
        y = L.emit(L.rx.op.matmul(ins[0], L.emit(L.rx.op.permute_dims(ins[1]))))
        return L.emit(L.rx.op.add(y, ins[2])) if b is not None else y
    spec = fl.spec
    params = [L.pvars[name] for name in fl.param_names]
    keys = list(spec.arrays)
    out_dtype = TVM_DTYPE[out_t.dtype]

    def kernel(xt, *rest):
        pmap = dict(zip(keys, rest[:len(keys)]))
        bias = rest[len(keys)] if b is not None else None
        epi = (lambda v, i, j: v + bias[j].astype("float32")) if bias is not None else None
        return lin.packed_linear(L.te, xt, spec, pmap, epilogue=epi, out_dtype=out_dtype)

    args = [ins[0]] + params + ([ins[-1]] if b is not None else [])
    return L.emit_te(kernel, *args, name=f"linear_{spec.kind}{spec.bits or ''}")


@lowers("matmul")
def _matmul(L, n, ins):
    return L.emit(L.rx.op.matmul(ins[0], ins[1]))


@lowers("conv2d")
def _conv2d(L, n, ins):
    a = n.attrs
    y = L.emit(L.rx.op.nn.conv2d(ins[0], ins[1], strides=a["stride"], padding=a["padding"], dilation=a["dilation"],
                                 groups=a["groups"]))
    if ins[2] is not None:
        y = L.emit(L.rx.op.add(y, L.emit(L.rx.op.reshape(ins[2], [1, -1, 1, 1]))))
    return y


@lowers("max_pool2d", "avg_pool2d")
def _pool(L, n, ins):
    a = n.attrs
    f = L.rx.op.nn.max_pool2d if n.op == "max_pool2d" else L.rx.op.nn.avg_pool2d
    return L.emit(f(ins[0], pool_size=a["kernel"], strides=a["stride"], padding=a["padding"],
                    **({} if n.op == "max_pool2d" else {"count_include_pad": True})))


@lowers("layer_norm")
def _layer_norm(L, n, ins):
    x = n.inputs[0]
    nd = n.attrs["ndim"]
    axes = list(range(x.type.rank - nd, x.type.rank))
    norm_shape = [L.dim(d) for d in x.type.shape[-nd:]]
    dt = TVM_DTYPE[x.type.dtype]
    gamma = ins[1] if ins[1] is not None else L.emit(L.rx.op.ones(norm_shape, dt))
    beta = ins[2] if ins[2] is not None else L.emit(L.rx.op.zeros(norm_shape, dt))
    return L.emit(L.rx.op.nn.layer_norm(ins[0], gamma, beta, axes, epsilon=n.attrs["eps"]))


@lowers("rms_norm")
def _rms_norm(L, n, ins):
    x = n.inputs[0]
    nd = n.attrs["ndim"]
    axes = list(range(x.type.rank - nd, x.type.rank))
    dt = TVM_DTYPE[x.type.dtype]
    weight = ins[1] if ins[1] is not None else L.emit(L.rx.op.ones([L.dim(d) for d in x.type.shape[-nd:]], dt))
    return L.emit(L.rx.op.nn.rms_norm(ins[0], weight, axes, epsilon=n.attrs["eps"]))


@lowers("rotary")
def _rotary(L, n, ins):
    rx = L.rx
    x = n.inputs[0]
    d = x.type.shape[-1]
    lo, hi = L.emit(rx.op.split(ins[0], [d // 2], axis=-1)), None
    a, hi = L.emit(rx.TupleGetItem(lo, 0)), L.emit(rx.TupleGetItem(lo, 1))
    rot = L.emit(rx.op.concat([L.emit(rx.op.negative(hi)), a], axis=-1))
    return L.emit(rx.op.add(L.emit(rx.op.multiply(ins[0], ins[1])), L.emit(rx.op.multiply(rot, ins[2]))))


@lowers("reshape")
def _reshape(L, n, ins):
    return L.emit(L.rx.op.reshape(ins[0], L.shape(n.output.type)))


@lowers("transpose")
def _transpose(L, n, ins):
    return L.emit(L.rx.op.permute_dims(ins[0], n.attrs["perm"]))


@lowers("expand")
def _expand(L, n, ins):
    return L.emit(L.rx.op.broadcast_to(ins[0], L.shape(n.output.type)))


@lowers("slice")
def _slice(L, n, ins):
    a = n.attrs
    x = n.inputs[0]
    axis = a["axis"] % x.type.rank
    dim = L.dim(x.type.shape[axis])
    start, end = L.dim(a["start"]), a["end"]
    end = dim if isinstance(end, int) and end >= INT64_MAX else L.dim(end)
    if isinstance(start, int) and start < 0:
        start = dim + start
    # a symbolic length (``slice(table, 0, seq)``) is one the IR proved in bounds: Relax would
    # otherwise write it min(seq, len), a dim later broadcasts against ``seq`` cannot match
    inbound = not isinstance(n.output.type.shape[axis], int)
    return L.emit(L.rx.op.strided_slice(ins[0], [axis], [start], [end], [a["step"]], assume_inbound=inbound))


@lowers("concat")
def _concat(L, n, ins):
    return L.emit(L.rx.op.concat(list(ins), axis=n.attrs["axis"]))


@lowers("split")
def _split(L, n, ins):
    sizes = n.attrs["sizes"]
    cuts = list(np.cumsum(sizes[:-1]).tolist())
    t = L.emit(L.rx.op.split(ins[0], cuts, axis=n.attrs["axis"]))
    return [L.emit(L.rx.TupleGetItem(t, i)) for i in range(len(sizes))]


@lowers("gather")
def _gather(L, n, ins):
    # "wrap": negative indices count from the end (ONNX Gather); "fast" would read out of bounds
    return L.emit(L.rx.op.take(ins[0], ins[1], axis=n.attrs["axis"] % n.inputs[0].type.rank, mode="wrap"))


@lowers("hadamard")
def _hadamard(L, n, ins):
    rx = L.rx
    x = n.inputs[0]
    b = n.attrs["block"]
    dt = TVM_DTYPE[x.type.dtype]
    shape = [L.dim(d) for d in x.type.shape]
    if fwht.fits(b, shape[-1], dt):
        users = L.users.get(n.outputs[0], [])
        if users and all(u.op == "quantize_per_token" for u in users):
            L.rotated_in_quant.add(n)       # the quantize kernel rotates its rows (hadamard.py)
            return ins[0]
        return _rows_call(L, f"presso_hadamard_{shape[-1]}_{b}", lambda: fwht.prim_func(shape[-1], b),
                          ins[0], shape, [("float32", None)])[0]
    blocks = L.emit(rx.op.reshape(ins[0], shape[:-1] + [shape[-1] // b, b]))
    h = rx.const(hadamard_matrix(b).numpy().astype(dt), dt)
    return L.emit(rx.op.reshape(L.emit(rx.op.matmul(blocks, h)), shape))


def _rows_call(L, name, make, x, shape, outs):
    """call_tir of a hand-written kernel over the rows of ``x`` ([..., d] viewed as [m, d]); ``outs``
    are (dtype, last dim or None for d) and come back reshaped to the leading dims."""
    rx = L.rx
    lead, m = shape[:-1], _numel(shape[:-1])
    flat = L.emit(rx.op.reshape(x, [m, shape[-1]]))
    sinfo = [rx.TensorType([m] + ([shape[-1]] if last is None else []), dt) for dt, last in outs]
    res = L.emit(rx.call_tir(L.kernel(name, make), rx.Tuple([flat]), sinfo if len(sinfo) > 1 else sinfo[0]))
    parts = [L.emit(rx.TupleGetItem(res, i)) for i in range(len(outs))] if len(outs) > 1 else [res]
    return [L.emit(rx.op.reshape(p, list(lead) + [shape[-1] if last is None else last]))
            for p, (_, last) in zip(parts, outs)]


def _numel(dims):
    """The product of (possibly symbolic) dims."""
    m = 1
    for d in dims:
        m = m * d
    return m


@lowers("quantize_per_token")
def _quantize_per_token(L, n, ins):
    qmax = float(2 ** (n.attrs["bits"] - 1) - 1)
    users = L.users.get(n.outputs[0], [])
    # codes read only by the AVX2 W8A7 kernels are produced as the u8 bytes they take (code + 64)
    as_u8 = bool(users) and all(L.fused.get(u) is not None and L.fused[u].spec.kind == "avx2_u8s8" for u in users)
    if as_u8:
        L.u8_codes.add(n.outputs[0])
    rot = n.inputs[0].node
    if rot in L.rotated_in_quant:
        shape, b = L.shape(n.inputs[0].type), rot.attrs["block"]
        name = f"presso_hadamard_quant{n.attrs['bits']}{'u' if as_u8 else 's'}_{shape[-1]}_{b}"
        return _rows_call(L, name, lambda: fwht.prim_func(shape[-1], b, (qmax, as_u8)), ins[0], shape,
                          [("uint8" if as_u8 else "int8", None), ("float32", 1)])

    def q(x):
        from tvm import te, tirx, topi
        xf = topi.cast(x, "float32") if x.dtype != "float32" else x
        amax = topi.max(topi.abs(xf), axis=-1, keepdims=True)
        s = te.compute(amax.shape, lambda *i: tirx.max(amax[i], tirx.const(1e-8, "float32")) / qmax,
                       name="token_scale")
        last = len(x.shape) - 1

        def code(*i):
            r = tirx.nearbyint(xf[i] / s[i[:last] + (0,)])  # half to even, as torch.round
            c = tirx.max(tirx.min(r, tirx.const(qmax, "float32")), tirx.const(-qmax, "float32"))
            return (c + 64.0).astype("uint8") if as_u8 else c.astype("int8")
        return [te.compute(x.shape, code, name="token_codes"), s]

    t = L.emit_te(q, ins[0], name="quantize_per_token")
    return [L.emit(L.rx.TupleGetItem(t, 0)), L.emit(L.rx.TupleGetItem(t, 1))]


def _linear_w8a7_avx2(L, n, ins, fl):
    """The hand-written AVX2 u8 x s8 kernel (int8_avx2.py) over [rows, K] activation bytes."""
    import numpy as np
    rx, te = L.rx, L.te
    rows, cols = fl.spec.rows, fl.spec.cols
    lead = L.shape(n.inputs[0].type)[:-1]
    m = _numel(lead)
    kernel = L.kernel(f"presso_w8a7_avx2_{cols}x{rows}", lambda: int8_avx2.prim_func(cols, rows))
    shifted = ins[0] if n.inputs[0] in L.u8_codes else L.emit_te(
        lambda x: te.compute(x.shape, lambda *i: (x[i].astype("int16") + 64).astype("uint8"), name="codes_u8"),
        ins[0], name="codes_u8")
    u = L.emit(rx.op.reshape(shifted, [m, cols]))
    xs = L.emit(rx.op.reshape(ins[1], [m]))
    w, colsum = (L.pvars[name_] for name_ in fl.param_names)
    bias = ins[4] if n.inputs[4] is not None else rx.const(np.zeros(rows, "float32"), "float32")
    y = L.emit(rx.call_tir(kernel, rx.Tuple([u, xs, w, colsum, ins[3], bias]),
                           rx.TensorType([m, rows], "float32")))
    return L.emit(rx.op.reshape(y, list(lead) + [rows]))


@lowers("linear_int8", "llvm.int8_linear", "llvm.w8a7_avx2_linear")
def _linear_int8(L, n, ins):
    b = n.inputs[4]
    fl = L.fused.get(n)
    if fl is None:
        raise CodegenError(f"node '{n.name}': linear_int8 lowers for parameter weights only")
    if fl.spec.kind == "avx2_u8s8":
        return _linear_w8a7_avx2(L, n, ins, fl)
    spec = fl.spec
    wvar = L.pvars[fl.param_names[0]]

    def kernel(xt, st, w, wscale, *bias):
        def epi(acc, i, j):
            y = acc.astype("float32") * st[(*i, 0)] * wscale[j]
            return y + bias[0][j] if bias else y
        return lin.packed_linear(L.te, xt, spec, {"w": w}, epilogue=epi, out_dtype="float32", acc="int32")

    args = [ins[0], ins[1], wvar, ins[3]] + ([ins[4]] if b is not None else [])
    return L.emit_te(kernel, *args, name="linear_int8")


@lowers("dequantize")
def _dequantize(L, n, ins):
    """A dequantize whose result is not a linear's weight: dense weights at run time."""
    a = n.attrs
    rows, cols = n.output.type.shape
    signed = n.inputs[2] is None
    dtype = TVM_DTYPE[DType[a["dtype"]]]

    def f(qt, s, *z):
        from tvm import te

        def deq(r, c):
            return lin.dequant_value(lambda i: qt[r, i], lambda g: s[r, g], (lambda g: z[0][r, g]) if z else None,
                                     c, a["bits"], signed, a["group_size"], dtype)
        return te.compute((rows, cols), deq, name="dequantize")

    return L.emit_te(f, *[i for i in ins if i is not None], name="dequantize")


@lowers("gather_dequantize", "llvm.tied_gather_dequant")
def _gather_dequantize(L, n, ins):
    """Rows of a quantized table dequantized as they are looked up (indices wrap, as ``gather``'s);
    a table tied to a fused linear is read in that linear's column tiles [rows/NJ, cols, NJ]."""
    a = n.attrs
    index, q = n.inputs[0], n.inputs[1]
    rows, cols = q.type.shape
    signed = n.inputs[3] is None
    dtype = TVM_DTYPE[DType[a["dtype"]]]
    lead = [L.dim(d) for d in index.type.shape]
    fl = L.tied_lookups.get(n)
    if fl is not None:
        nj = fl.spec.nj
        tables = [L.pvars[name] for name in fl.param_names]

        def at(t, r, c):
            return t[r // nj, c, r % nj]
    else:
        tables = [i for i in ins[1:] if i is not None]

        def at(t, r, c):
            return t[r, c]

    def f(ids, qt, s, *z):
        from tvm import te, tirx

        def deq(*i):
            *pos, c = i
            r = tirx.floormod(ids[tuple(pos)].astype("int64"), rows)
            return lin.dequant_value(lambda k: at(qt, r, k), lambda g: at(s, r, g),
                                     (lambda g: at(z[0], r, g)) if z else None, c, a["bits"], signed,
                                     a["group_size"], dtype)
        return te.compute(lead + [cols], deq, name="gather_dequantize")

    return L.emit_te(f, ins[0], *tables, name="gather_dequantize")


@lowers("densify_nm")
def _densify_nm(L, n, ins):
    vals, idx = n.inputs
    nn, m = n.attrs["n"], n.attrs["m"]
    packed = idx.type.dtype == DType.u4

    def f(v, ix):
        from tvm import te

        def dense(r, c):
            return lin.densify_value(lambda t: v[r, t], lambda t: ix[r, t], c, nn, m, packed, v.dtype)
        return te.compute(tuple(n.output.type.shape), dense, name="densify_nm")

    return L.emit_te(f, ins[0], ins[1], name="densify_nm")


def lower(graph: Graph, target_spec: dict | None = None) -> Lowered:
    """Lower a whole graph to a Relax module whose ``main`` takes (inputs..., params...);
    ``target_spec`` (the TVM target as a dict) enables CPU-specific kernels (int8_avx2.py)."""
    return Lowering(graph, target_spec).build()


from . import aten as _aten  # noqa: E402,F401 - registers the aten.* lowerings in LOWER
from . import decode_ops as _decode_ops  # noqa: E402,F401 - the decode program's cache ops
