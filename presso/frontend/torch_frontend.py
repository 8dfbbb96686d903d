"""Import a torch ``nn.Module`` through ``torch.export`` (ATen IR), falling back to
``torch.fx.symbolic_trace`` + ``make_fx`` when export cannot trace the module.

Each ATen op maps to presso ops through a small handler in ``ATEN``; anything else raises
``UnsupportedOpError`` naming the op, the node and its source line. Sub-graphs that depend on no
input and no parameter (masks, position tables, ``arange``) are evaluated eagerly into constants.
"""
from __future__ import annotations

import contextvars
import operator
import re
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from ..errors import DimRangeError, FrontendError, IRError, UnsupportedOpError
from ..ir.graph import Graph, Value
from ..ir.types import SYMBOL_RE, DType, TensorType, dims_product
from ..ir import aten_ops
from . import aten_generic, hf
from .common import GraphBuilder, registrar, check_type, clean_name

aten = torch.ops.aten
ATEN: dict[Any, Callable] = {}


handles = registrar(ATEN)


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


# torch's symbol (s77) -> the user's Dim name (batch), bound by ``from_torch`` for the import it runs
_SYMBOL_NAMES: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("presso_symbol_names")


def _dim(d):
    """A torch size (int, SymInt, or an fx node computing one) as an IR dim."""
    if isinstance(d, fx.Node):
        d = d.meta.get("val")
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt) and d.node.expr.is_number:
        return int(d)
    expr = str(d).replace(" ", "")
    for sym, name in sorted(_SYMBOL_NAMES.get({}).items(), key=lambda kv: -len(kv[0])):
        expr = re.sub(rf"\b{sym}\b", name, expr)
    parts = expr.split("*")
    if all(re.fullmatch(r"[A-Za-z_]\w*|\d+", p) for p in parts):  # canonical order: coefficient, then sorted symbols
        expr = dims_product(parts)
        if isinstance(expr, int):
            return expr
    if not SYMBOL_RE.match(expr):
        raise FrontendError(f"symbolic size '{expr}' cannot be expressed in presso's IR "
                            "(only symbols, products and integer multiples are)")
    return expr


def _type_of_val(val) -> TensorType:
    return TensorType(tuple(_dim(d) for d in val.shape), DType.from_torch(val.dtype))


class _Importer:
    def __init__(self, name: str):
        self.b = GraphBuilder(name)
        self.g: Graph = self.b.g
        self.env: dict[fx.Node, Any] = {}
        self.node: Optional[fx.Node] = None

    # -- operand access ------------------------------------------------------------------
    def t(self, a) -> Value:
        """A tensor operand: an fx node's value, an eagerly folded constant (made a param on
        first use), or a python scalar (made a 0-d constant)."""
        if isinstance(a, fx.Node):
            v = self.env[a]
            if isinstance(v, torch.Tensor):
                v = self.env[a] = self.b.const(a.name, v)
            if not isinstance(v, Value):
                raise FrontendError(f"node {self.node.name}: operand {a.name} is not a tensor")
            return v
        if isinstance(a, (int, float, bool)):
            return self.b.scalar(a)
        raise FrontendError(f"node {self.node.name}: cannot use {a!r} as a tensor operand")

    def out_type(self) -> TensorType:
        return _type_of_val(_val(self.node))

    def op(self, name, *ins, **attrs) -> Value:
        return self.g.op(name, *ins, **attrs)

    # -- driving -------------------------------------------------------------------------
    def location(self, n: fx.Node) -> str:
        st = n.meta.get("stack_trace")
        if st:
            lines = [l.strip() for l in st.strip().splitlines() if l.strip().startswith("File")]
            if lines:
                return lines[-1]
        return f"fx node {n.name}"

    def run(self, gm: fx.GraphModule, inputs: dict, consts: dict, outputs: Optional[list] = None):
        """Import ``gm``; ``outputs`` picks the positions of its output tuple that are the model's
        (torch.export also returns effect tokens there)."""
        live = _live_nodes(gm.graph)
        for n in gm.graph.nodes:
            if n.op == "call_function" and n not in live:
                continue  # dead code (e.g. mask bookkeeping nobody reads) need not be importable
            self.node = n
            if n.op == "placeholder":
                if n.name in consts:
                    self.env[n] = consts[n.name]
                else:
                    self.env[n] = self.g.add_input(clean_name(inputs[n.name]), _type_of_val(_val(n)))
            elif n.op == "get_attr":
                t = getattr(gm, n.target)
                self.env[n] = self.g.add_param(self.g.fresh_name(clean_name(n.target)), t.detach()) \
                    if isinstance(t, torch.Tensor) else t
            elif n.op == "call_function":
                self.env[n] = self.call(n)
            elif n.op == "output":
                outs = n.args[0]
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                if outputs is not None:
                    outs = [outs[i] for i in outputs]
                vals = [self.t(o) if isinstance(o, fx.Node) and isinstance(self.env[o], torch.Tensor)
                        else self.env.get(o, o) for o in outs]  # a folded constant is returned as a param
                if not all(isinstance(v, Value) for v in vals):
                    raise FrontendError("the model must return tensors (a tensor or a tuple/list of tensors)")
                self.g.outputs = vals
            else:
                raise FrontendError(f"node {n.name}: unexpected fx op {n.op}")
        return self.g

    def inline(self, sub: fx.GraphModule, operands: list):
        """Import a higher-order op's body (``torch.no_grad``/autocast regions) in place."""
        outer = self.node
        it = iter(operands)
        result = None
        for sn in sub.graph.nodes:
            self.node = sn
            if sn.op == "placeholder":
                a = next(it)
                self.env[sn] = self.env[a] if isinstance(a, fx.Node) else a
            elif sn.op == "get_attr":
                t = getattr(sub, sn.target)
                self.env[sn] = self.b.const(sn.name, t) if isinstance(t, torch.Tensor) else t
            elif sn.op == "call_function":
                self.env[sn] = self.call(sn)
            elif sn.op == "output":
                outs = sn.args[0]
                result = [self.env[o] if isinstance(o, fx.Node) else o for o in outs] \
                    if isinstance(outs, (list, tuple)) else self.env[outs]
        self.node = outer
        return result

    def call(self, n: fx.Node):
        target = n.target
        if target is operator.getitem:
            return self.env[n.args[0]][n.args[1]]
        name = getattr(target, "__name__", "")
        if name == "with_effects":  # (token, op, *args): checks such as _linalg_check_errors
            returns = getattr(n.args[1], "_schema", None)
            if returns is not None and not returns.returns:
                return [None]
            raise UnsupportedOpError(f"{n.args[1]} with side effects", n.name, self.location(n), supported_torch_ops())
        if name in ("wrap_with_set_grad_enabled", "wrap_with_autocast"):
            nctx = 1 if name == "wrap_with_set_grad_enabled" else 4
            return self.inline(self.env[n.args[nctx]], list(n.args[nctx + 1:]))
        if str(target).startswith(("aten._assert", "aten.sym_constrain", "aten.sym_size", "aten.sym_numel")) \
                or getattr(target, "__module__", None) in ("_operator", "operator"):
            return None  # runtime asserts and integer size arithmetic: sizes live in the IR types
        if self._is_constant(n):
            return self._fold(n)
        handler = ATEN.get(target)
        if handler is None and hasattr(target, "overloadpacket"):
            handler = ATEN.get(target.overloadpacket)
        if handler is None and not aten_generic.importable(target):
            e = UnsupportedOpError(str(target), n.name, self.location(n), supported_torch_ops(),
                                   "not a core ATen op, and torch has no decomposition of it to core ATen")
            e.target = target
            raise e
        try:
            try:
                if handler is None:
                    raise UnsupportedOpError(str(target), n.name, self.location(n), ())
                out = handler(self, *n.args, **n.kwargs)
            except (UnsupportedOpError, IRError, ZeroDivisionError):
                # a form presso's typed op does not cover (extra arguments, 0-d operands): the generic ATen op does
                if not aten_generic.importable(target):
                    raise
                out = aten_generic.import_node(self, n, _dim)
        except UnsupportedOpError as e:
            e.target = target   # what the import loops decompose before retrying
            raise
        except FrontendError:
            raise
        except IRError as e:
            raise FrontendError(f"node {n.name} ({target}) at {self.location(n)}: {e}") from None
        val = _val(n)
        if isinstance(out, Value) and isinstance(val, torch.Tensor):
            check_type(out, _type_of_val(val), f"node {n.name} ({target})")
            if out.node is not None and out.node.op not in ("full",):
                out.node.meta.setdefault("source", self.location(n))
        return out

    def _is_constant(self, n: fx.Node) -> bool:
        """True for a pure ATen op that reads no graph input and no parameter (creation ops,
        masks and tables built from them): it is evaluated now, at import."""
        schema = getattr(n.target, "_schema", None)
        if torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ()):
            return False  # random numbers are drawn at every run, not once at import
        return (schema is not None and not schema.is_mutable and isinstance(_val(n), torch.Tensor)
                and all(isinstance(self.env.get(a), torch.Tensor) for a in n.all_input_nodes))

    def _fold(self, n: fx.Node):
        args = fx.node.map_arg(n.args, lambda a: self.env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.env[a])
        with torch.no_grad():
            out = n.target(*args, **kwargs)
        return out


def _live_nodes(graph: fx.Graph) -> set:
    """Nodes the outputs depend on (through higher-order op bodies' operands too), and every
    in-place op: its effect is not visible in the data flow until functionalization returns it."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    roots = [out] + [n for n in graph.nodes if n.op == "call_function"
                     and getattr(getattr(n.target, "_schema", None), "is_mutable", False)]
    live, stack = set(), roots
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return live


def supported_torch_ops() -> list[str]:
    """What the torch frontend imports: every core ATen op (as presso's typed op where one matches,
    else as the generic ``aten.*`` op), and every op torch decomposes to them."""
    from ..ir.aten_ops import core_aten_names
    typed = {str(getattr(t, "overloadpacket", t)).replace("aten.", "") for t in ATEN}
    return sorted(typed | {n[len("aten."):] for n in core_aten_names()})


# ---- handlers ----------------------------------------------------------------------------
def _unary(presso_op):
    return lambda im, x, *a, **k: im.op(presso_op, im.t(x))


for _t, _p in [(aten.relu, "relu"), (aten.sigmoid, "sigmoid"), (aten.tanh, "tanh"), (aten.erf, "erf"),
               (aten.exp, "exp"), (aten.log, "log"), (aten.sqrt, "sqrt"), (aten.rsqrt, "rsqrt"),
               (aten.neg, "neg"), (aten.abs, "abs"), (aten.reciprocal, "reciprocal"), (aten.sin, "sin"),
               (aten.cos, "cos"), (aten.silu, "silu"), (aten.logical_not, "logical_not")]:
    handles(_t)(_unary(_p))


def _binary(presso_op):
    def h(im, a, b, *rest, alpha=1, **kw):
        if rest or kw.get("rounding_mode"):
            raise UnsupportedOpError(f"{im.node.target} with extra arguments", im.node.name, im.location(im.node),
                                     supported_torch_ops())
        bv = im.t(b)
        if alpha != 1:
            bv = im.op("mul", bv, im.b.scalar(alpha))
        return im.op(presso_op, im.t(a), bv)
    return h


for _t, _p in [(aten.add, "add"), (aten.sub, "sub"), (aten.mul, "mul"), (aten.div, "div"),
               (aten.pow, "pow"), (aten.maximum, "maximum"), (aten.minimum, "minimum"),
               (aten.eq, "eq"), (aten.ne, "ne"), (aten.lt, "lt"), (aten.le, "le"), (aten.gt, "gt"),
               (aten.ge, "ge"), (aten.logical_and, "logical_and"), (aten.logical_or, "logical_or")]:
    handles(_t)(_binary(_p))


@handles(aten.rsub)
def _rsub(im, a, b, alpha=1):
    return im.op("sub", im.t(b), im.t(a))


@handles(aten.clamp, aten.clamp_min, aten.clamp_max)
def _clamp(im, x, lo=None, hi=None):
    out = im.t(x)
    if im.node.target.overloadpacket is aten.clamp_max:
        lo, hi = None, lo
    if lo is not None:
        out = im.op("maximum", out, im.op("cast", im.t(lo), dtype=out.type.dtype.value))
    if hi is not None:
        out = im.op("minimum", out, im.op("cast", im.t(hi), dtype=out.type.dtype.value))
    return out


@handles(aten.gelu)
def _gelu(im, x, approximate="none"):
    return im.op("gelu", im.t(x), approximate=approximate)


@handles(aten.where)
def _where(im, c, a, b):
    return im.op("where", im.t(c), im.t(a), im.t(b))


@handles(aten.masked_fill)
def _masked_fill(im, x, mask, value):
    xv = im.t(x)
    fill = im.op("cast", im.t(value), dtype=xv.type.dtype.value)
    return im.op("where", im.t(mask), fill, xv)


@handles(aten.linear)
def _linear(im, x, w, b=None):
    return im.op("linear", im.t(x), im.t(w), None if b is None else im.t(b))


@handles(aten.addmm)
def _addmm(im, bias, a, b, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise UnsupportedOpError("addmm with alpha/beta != 1", im.node.name, im.location(im.node), supported_torch_ops())
    return im.op("add", im.op("matmul", im.t(a), im.t(b)), im.t(bias))


@handles(aten.mm, aten.bmm, aten.matmul)
def _matmul(im, a, b):
    return im.op("matmul", im.t(a), im.t(b))


@handles(aten.t, aten.transpose, aten.permute, aten.numpy_T)
def _transpose(im, x, *dims):
    xv = im.t(x)
    r = xv.type.rank
    if im.node.target in (aten.permute.default,):
        perm = [d % r for d in dims[0]]
    elif len(dims) == 2:
        perm = list(range(r))
        i, j = dims[0] % r, dims[1] % r
        perm[i], perm[j] = perm[j], perm[i]
    else:
        perm = list(reversed(range(r)))
    return im.op("transpose", xv, perm=perm)


@handles(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unsqueeze, aten.squeeze,
         aten.unflatten, aten.view_as, aten.reshape_as)
def _reshape(im, x, *a, **k):
    return im.op("reshape", im.t(x), shape=list(im.out_type().shape))


@handles(aten.expand, aten.expand_as)
def _expand(im, x, *a, **k):
    return im.op("expand", im.t(x), shape=list(im.out_type().shape))


@handles(aten.contiguous, aten.clone, aten.alias, aten.detach, aten.detach_, aten.lift_fresh_copy, aten.dropout,
         aten.feature_dropout, aten.alpha_dropout)
def _identity(im, x, *a, **k):
    return im.t(x)


@handles(aten.to, aten._to_copy, aten.type_as)
def _to(im, x, *a, **k):
    xv = im.t(x)
    dt = im.out_type().dtype
    return xv if dt == xv.type.dtype else im.op("cast", xv, dtype=dt.value)


@handles(aten.slice)
def _slice(im, x, dim=0, start=None, end=None, step=1):
    xv = im.t(x)
    end = 2 ** 63 - 1 if end is None else _dim(end)
    return im.op("slice", xv, axis=dim % xv.type.rank, start=0 if start is None else _dim(start),
                 end=min(end, 2 ** 63 - 1) if isinstance(end, int) else end, step=step)


@handles(aten.select)
def _select(im, x, dim, index):
    xv = im.t(x)
    dim = dim % xv.type.rank
    s = im.op("slice", xv, axis=dim, start=index, end=index + 1 if index != -1 else 2 ** 63 - 1)
    return im.op("reshape", s, shape=list(im.out_type().shape))


@handles(aten.narrow)
def _narrow(im, x, dim, start, length):
    xv = im.t(x)
    return im.op("slice", xv, axis=dim % xv.type.rank, start=start, end=start + length)


@handles(aten.cat, aten.concat)
def _cat(im, xs, dim=0):
    vals = [im.t(x) for x in xs]
    return im.g.add_node("concat", vals, {"axis": dim % vals[0].type.rank}).output


@handles(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind)
def _split(im, x, *a, **k):
    xv = im.t(x)
    vals = im.node.meta["val"]
    dim = a[1] if len(a) > 1 else k.get("dim", 0)
    if im.node.target in (aten.unbind.int,):
        dim = a[0] if a else k.get("dim", 0)
    dim %= xv.type.rank
    sizes = [int(v.shape[dim]) if im.node.target is not aten.unbind.int else 1 for v in vals]
    outs = im.g.add_node("split", [xv], {"axis": dim, "sizes": sizes}).outputs
    if im.node.target is aten.unbind.int:
        outs = [im.op("reshape", o, shape=list(_type_of_val(v).shape)) for o, v in zip(outs, vals)]
    return list(outs)


@handles(aten.arange)
def _arange(im, *args, **kw):
    ints = [a for a in args if isinstance(a, (int, fx.Node, torch.SymInt))]
    start, end, step = (0, ints[0], 1) if len(ints) == 1 else (ints + [1])[:3]
    dt = im.out_type().dtype.value
    if not isinstance(_dim(start), int) or not isinstance(step, int):
        raise UnsupportedOpError("arange with a symbolic start or step", im.node.name, im.location(im.node),
                                 supported_torch_ops())
    return im.op("arange", start=_dim(start), end=_dim(end), step=step, dtype=dt)


@handles(aten.full, aten.ones, aten.zeros, aten.new_ones, aten.new_zeros, aten.full_like, aten.ones_like,
         aten.zeros_like)
def _full(im, *args, **kw):
    name = im.node.target.overloadpacket.__name__
    value = {"ones": 1.0, "new_ones": 1.0, "ones_like": 1.0, "zeros": 0.0, "new_zeros": 0.0, "zeros_like": 0.0}.get(name)
    if value is None:
        value = args[1] if len(args) > 1 else kw.get("fill_value")
    t = im.out_type()
    return im.op("full", value=float(value), shape=list(t.shape), dtype=t.dtype.value)


@handles(aten.embedding)
def _embedding(im, w, ids, *a):
    return im.op("gather", im.t(w), im.t(ids), axis=0)


@handles(aten.index_select)
def _index_select(im, x, dim, idx):
    xv = im.t(x)
    return im.op("gather", xv, im.t(idx), axis=dim % xv.type.rank)


@handles(aten.layer_norm)
def _layer_norm(im, x, shape, w=None, b=None, eps=1e-5, *a):
    return im.op("layer_norm", im.t(x), None if w is None else im.t(w), None if b is None else im.t(b),
                 eps=eps, ndim=len(shape))


@handles(aten.rms_norm)
def _rms_norm(im, x, shape, w=None, eps=None):
    xv = im.t(x)
    if eps is None:
        eps = torch.finfo(xv.type.dtype.torch).eps
    return im.op("rms_norm", xv, None if w is None else im.t(w), eps=eps, ndim=len(shape))


@handles(aten._softmax, aten.softmax)
def _softmax(im, x, dim, *a):
    xv = im.t(x)
    out = im.op("softmax", xv, axis=dim % xv.type.rank)
    dt = im.out_type().dtype
    return out if dt == out.type.dtype else im.op("cast", out, dtype=dt.value)


@handles(aten.scaled_dot_product_attention)
def _sdpa(im, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return im.op("attention", im.t(q), im.t(k), im.t(v), None if attn_mask is None else im.t(attn_mask),
                 causal=bool(is_causal), scale=scale)


@handles(aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu(im, q, k, v, dropout_p=0.0, is_causal=False, attn_mask=None, scale=None):
    out = _sdpa(im, q, k, v, attn_mask, dropout_p, is_causal, scale)
    return [out, None]


def _reduce(presso_op):
    def h(im, x, dims=None, keepdim=False, *a, **k):
        xv = im.t(x)
        axes = [d % xv.type.rank for d in (dims if dims is not None else range(xv.type.rank))] \
            if not isinstance(dims, int) else [dims % xv.type.rank]
        return im.op(presso_op, xv, axes=axes, keepdim=bool(keepdim))
    return h


handles(aten.mean)(_reduce("reduce_mean"))
handles(aten.sum)(_reduce("reduce_sum"))
handles(aten.amax)(_reduce("reduce_max"))


def two(v) -> list:
    """A 2-D size argument: torch accepts (a,) for (a, a)."""
    return list(v) * 2 if len(v) == 1 else list(v)


@handles(aten.conv2d)
def _conv2d(im, x, w, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    if isinstance(padding, str):
        raise UnsupportedOpError("conv2d with string padding", im.node.name, im.location(im.node), supported_torch_ops())
    return im.op("conv2d", im.t(x), im.t(w), None if b is None else im.t(b), stride=two(stride),
                 padding=two(padding), dilation=two(dilation), groups=groups)


def _plain_pool(im, dilation=(1, 1), ceil_mode=False, count_include_pad=True, divisor_override=None):
    """presso's pool ops are the default forms; others go to the generic ATen op."""
    if list(two(dilation)) != [1, 1] or ceil_mode or not count_include_pad or divisor_override is not None:
        raise UnsupportedOpError("pooling with dilation, ceil_mode or a custom divisor", im.node.name,
                                 im.location(im.node), supported_torch_ops())


@handles(aten.max_pool2d)
def _max_pool(im, x, kernel, stride=(), padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    _plain_pool(im, dilation, ceil_mode)
    return im.op("max_pool2d", im.t(x), kernel=two(kernel), stride=two(stride or kernel), padding=two(padding))


@handles(aten.avg_pool2d)
def _avg_pool(im, x, kernel, stride=(), padding=(0, 0), ceil_mode=False, count_include_pad=True,
              divisor_override=None):
    _plain_pool(im, ceil_mode=ceil_mode, count_include_pad=count_include_pad, divisor_override=divisor_override)
    return im.op("avg_pool2d", im.t(x), kernel=two(kernel), stride=two(stride or kernel), padding=two(padding))


@handles(aten.adaptive_avg_pool2d)
def _adaptive_avg(im, x, size):
    if list(size) != [1, 1]:
        raise UnsupportedOpError("adaptive_avg_pool2d to a size other than 1x1", im.node.name, im.location(im.node),
                                 supported_torch_ops())
    return im.op("reduce_mean", im.t(x), axes=[2, 3], keepdim=True)


class _Retargeted:
    """An fx node seen as a call of another overload of the same schema."""

    def __init__(self, n: fx.Node, target):
        self.target, self.args, self.kwargs, self.meta, self.name = target, n.args, n.kwargs, n.meta, n.name


def _alias_of(target):
    def handler(im, *args, **kwargs):
        return aten_generic.import_node(im, _Retargeted(im.node, target), _dim)
    return handler


# Python's operators on tensors (``mask_a & mask_b`` in HF's mask code) are ATen ops of their own,
# neither core nor decomposable; each is the bitwise op of the same schema
for _dunder, _op in (("__and__", "bitwise_and"), ("__or__", "bitwise_or"), ("__xor__", "bitwise_xor")):
    for _ov in ("Tensor", "Scalar"):
        ATEN[getattr(getattr(aten, _dunder), _ov)] = _alias_of(getattr(getattr(aten, _op), _ov))


# ---- entry point -------------------------------------------------------------------------
def _export(module, example_inputs, dynamic_shapes):
    """torch.export; when its guard solver cannot prove a guard over a dynamic dim's whole range
    (torch 2.11 fails ``min(16*s, 32*s) == 16*s`` on Llama), retry with the guards as deferred
    runtime asserts -- which the importer drops, having typed every dim symbolically. When that
    fails too and torch capped a ``Dim`` below its asked maximum, ``DimRangeError`` says so. A
    dict of example inputs is passed as keyword arguments."""
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, dict) else (example_inputs, None)
    try:
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # noqa: BLE001
        if dynamic_shapes is None or "Constraints violated" not in str(e):
            raise
        first = str(e)
    try:
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=True)
    except Exception:  # noqa: BLE001
        _check_dim_ranges(first, dynamic_shapes, type(module).__name__)
        raise


def _widen_size_one_dims(example_inputs, dynamic_shapes):
    """The example inputs, with each dim that ``dynamic_shapes`` names (a ``torch.export.Dim``)
    and whose example size is 1 repeated to size ``max(2, Dim.min)``. torch.export cannot tell a
    size-1 dim from a broadcast one and specialises it, so a batch of one prompt fails its
    dynamic batch with "Constraints violated"; the graph is symbolic in the dim, so the example
    itself runs on it unchanged."""
    if not dynamic_shapes:
        return example_inputs
    keyed = isinstance(example_inputs, dict)
    names = list(example_inputs) if keyed else list(range(len(example_inputs)))
    if isinstance(dynamic_shapes, dict):
        pairs = [(k, spec) for k, spec in dynamic_shapes.items() if k in names]
    else:
        pairs = list(zip(names, dynamic_shapes))
    out = dict(example_inputs) if keyed else list(example_inputs)
    for key, spec in pairs:
        x = out[key]
        if not isinstance(x, torch.Tensor) or not isinstance(spec, (dict, list, tuple)):
            continue
        for axis, dim in (spec.items() if isinstance(spec, dict) else enumerate(spec)):
            if isinstance(dim, torch.export.Dim) and x.shape[axis] == 1:
                shape = list(x.shape)
                shape[axis] = max(2, dim.min)
                x = x.expand(shape).contiguous()
        out[key] = x
    return out if keyed else tuple(out)


_SUGGESTED_MAX = re.compile(r"(\w+) = Dim\('(\w+)'[^)\n]*\bmax=(\d+)")


def _check_dim_ranges(message: str, dynamic_shapes, model: str) -> None:
    """Raise ``DimRangeError`` when torch.export's suggested fixes cap a user's ``Dim`` below the
    maximum asked for: the model cannot take that range (the retry with deferred asserts failed too)."""
    asked = {d.__name__: d.max for spec in _flat_specs(dynamic_shapes) for d in spec.values()
             if hasattr(d, "__name__") and isinstance(getattr(d, "max", None), int)}
    for _, name, limit in _SUGGESTED_MAX.findall(message):
        if name in asked and int(limit) < asked[name]:
            raise DimRangeError(name, asked[name], int(limit), model)


def _flat_specs(dynamic_shapes) -> list[dict]:
    """The per-input ``{axis: Dim}`` dicts of a dynamic_shapes tuple, list or dict."""
    items = dynamic_shapes.values() if isinstance(dynamic_shapes, dict) else dynamic_shapes
    return [s for s in items if isinstance(s, dict)]


def from_torch(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], method: str = "auto",
               dynamic_shapes=None, name: Optional[str] = None) -> Graph:
    """Import ``module`` called on ``example_inputs`` (a tuple of positional inputs, or a dict of
    keyword inputs: HF models take ``input_ids=, attention_mask=, token_type_ids=``, and their
    positional order differs per model). ``method``: "auto" (export, then fx), "export" or "fx".
    The graph's ``meta["frontend"]`` says which tracer was used; ``meta["output_spec"]`` keeps the
    structure of the model's outputs (a ``ModelOutput``, dict, nested tuples) for the runtime."""
    if method not in ("auto", "export", "fx"):
        raise ValueError(f"method must be one of 'auto', 'export', 'fx', got {method!r}")
    if not isinstance(module, torch.nn.Module):
        raise FrontendError(f"from_torch needs an nn.Module, got {type(module).__name__}")
    example_inputs = _checked_inputs(module, example_inputs)
    name = name or type(module).__name__
    hf.prepare(module)
    was_training = module.training
    module.eval()
    symbols = _SYMBOL_NAMES.set({})
    errors = []
    try:
        if method in ("auto", "export"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ep = _export(module, _widen_size_one_dims(example_inputs, dynamic_shapes), dynamic_shapes)
            except DimRangeError:
                raise
            except Exception as e:  # noqa: BLE001 - any tracer failure means: try the next tracer
                errors.append(f"torch.export: {type(e).__name__}: {_first_line(e)}{hf.export_hint(module, str(e))}")
            else:
                _name_symbols(ep, dynamic_shapes, example_inputs)
                g = _import_exported(ep, name)
                g.meta["frontend"] = "torch.export"
                _record_call_structure(g, ep, example_inputs)
                return g
        if method in ("auto", "fx") and isinstance(example_inputs, dict):
            errors.append("torch.fx: keyword example inputs are traced by torch.export only")
        elif method in ("auto", "fx"):
            try:
                g = _import_fx(module, example_inputs, name)
            except (UnsupportedOpError,):
                raise
            except Exception as e:  # noqa: BLE001
                errors.append(f"torch.fx: {type(e).__name__}: {_first_line(e)}")
            else:
                g.meta["frontend"] = "torch.fx"
                return g
    finally:
        module.train(was_training)
        _SYMBOL_NAMES.reset(symbols)
    text = "; ".join(errors)
    hint = ""
    if any(k in text for k in ("control flow", "data-dependent", "DataDependent", "GuardOnDataDependent")):
        hint = (". Data-dependent Python control flow (if/while on tensor values) cannot be compiled: "
                "rewrite it with torch.where or torch.cond")
    raise FrontendError(f"cannot trace {name}: {text}{hint}")


def _checked_inputs(module: torch.nn.Module, example_inputs):
    """The example inputs as a tuple (or a dict of keyword inputs), after the checks tracing would
    otherwise fail on deep inside torch: positional inputs are tensors (a compiled model takes
    tensors only), and neither they nor the model's weights are on the ``meta`` device (no data)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list, dict)):
        raise FrontendError(f"example_inputs must be a tuple of tensors (or a dict of keyword inputs), "
                            f"got {type(example_inputs).__name__}")
    if isinstance(example_inputs, dict):
        example_inputs = dict(example_inputs)
        tensors = [(f"'{k}'", v) for k, v in example_inputs.items() if isinstance(v, torch.Tensor)]
    else:
        example_inputs = tuple(example_inputs)
        for i, v in enumerate(example_inputs):
            if not isinstance(v, torch.Tensor):
                raise FrontendError(f"example input {i} ({type(v).__name__} {v!r:.40}) is not a tensor: a compiled "
                                    "model takes tensors only; make other arguments constants of the model (a module "
                                    "attribute or a default argument) or pass them as tensors")
        tensors = [(str(i), v) for i, v in enumerate(example_inputs)]
    on_meta = [f"example input {n}" for n, v in tensors if v.is_meta]
    on_meta += [f"'{n}'" for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:
        raise FrontendError(f"{', '.join(on_meta[:5])}{' ...' if len(on_meta) > 5 else ''} on the meta device "
                            "(shapes without data): load real weights (e.g. module.to_empty(device='cpu') then "
                            "load_state_dict) and pass real example inputs")
    return example_inputs


def _name_symbols(ep, dynamic_shapes, example_inputs) -> None:
    """Call torch's symbols (s0, s77) by the names of the user's ``torch.export.Dim``s."""
    if not dynamic_shapes:
        return
    specs = dynamic_shapes if isinstance(dynamic_shapes, (list, tuple)) else list(dynamic_shapes.values())
    users = [n for n in ep.graph.nodes if n.op == "placeholder"][-len(example_inputs):]
    if isinstance(example_inputs, dict):    # keyword inputs: placeholders are named after the keywords
        by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        keys = list(dynamic_shapes) if isinstance(dynamic_shapes, dict) else list(example_inputs)
        pairs = [(by_name[k], s) for k, s in zip(keys, specs) if k in by_name]
        users, specs = [u for u, _ in pairs], [s for _, s in pairs]
    for node, spec in zip(users, specs):
        if not isinstance(spec, dict):
            continue
        for axis, dim in spec.items():
            size = node.meta["val"].shape[axis]
            name = getattr(dim, "__name__", None)
            if isinstance(size, torch.SymInt) and name and str(size).isidentifier():
                _SYMBOL_NAMES.get()[str(size)] = clean_name(name)


def _record_call_structure(g: Graph, ep, example_inputs) -> None:
    """``meta["output_spec"]``: the model's output pytree (see ``presso.frontend.hf``);
    ``meta["input_names"]``: the keywords of keyword example inputs, in graph input order (a
    compiled model is then called with the same keywords)."""
    spec = hf.output_spec(ep)
    if spec is not None:
        g.meta["output_spec"] = spec
    if isinstance(example_inputs, dict):
        g.meta["input_names"] = [k for k, v in example_inputs.items() if isinstance(v, torch.Tensor)]
        constants = {k: v for k, v in example_inputs.items()
                     if not isinstance(v, torch.Tensor) and isinstance(v, (bool, int, float, str, type(None)))}
        if constants:
            g.meta["constant_inputs"] = constants


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else ""


def _import_exported(ep, name: str) -> Graph:
    """Import ``ep``; an op that is neither handled nor core ATen is decomposed with torch's table
    and the import retried (decompositions can produce more such ops, hence the loop)."""
    decomposed: set = set()
    while True:
        try:
            return _import_exported_once(ep, name)
        except UnsupportedOpError as e:
            target = getattr(e, "target", None)
            if target is None or target in decomposed or not aten_generic.decomposable(target):
                raise
            decomposed.add(target)
            _alias_nested_constants(ep)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = ep.run_decompositions(aten_ops.decomposition_table(decomposed))


def _alias_nested_constants(ep) -> None:
    """Also file constants lifted inside submodules (``layers.0.self_attn.lifted_tensor_0``: HF's
    cache updates) under their last name: ``run_decompositions`` retraces them under that name and
    its verifier refuses the program otherwise."""
    for key, value in list(ep.constants.items()):
        short = key.rsplit(".", 1)[-1]
        if short != key and short not in ep.constants:
            ep._constants[short] = value


def _import_exported_once(ep, name: str) -> Graph:
    sig = ep.graph_signature
    state = dict(ep.state_dict)
    state.update(ep.constants)
    consts, inputs = {}, {}
    imp = _Importer(name)
    for spec in sig.input_specs:
        pname = spec.arg.name
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            t = state[spec.target]
            consts[pname] = imp.g.add_param(clean_name(spec.target), t.detach().contiguous())
        elif spec.kind.name == "TOKEN":
            consts[pname] = None   # an effect token orders side effects; presso's graphs have none
        elif spec.kind.name == "USER_INPUT":
            if isinstance(spec.arg, torch.export.graph_signature.TensorArgument):
                inputs[pname] = pname
            elif isinstance(spec.arg, torch.export.graph_signature.ConstantArgument):
                consts[pname] = spec.arg.value   # a non-tensor input (use_cache=False) was traced as given
        else:
            raise FrontendError(f"unsupported exported input kind {spec.kind.name}")
    g = imp.run(ep.graph_module, inputs, consts, _user_outputs(sig))
    _record_input_mutations(g, sig)
    _drop_unused_params(g)
    return g


def _user_outputs(sig) -> list[int]:
    """Positions of the model's outputs, then of the new values of inputs it updates in place
    (``graph.meta["input_mutations"]`` says which; the runtime writes them back). An in-place
    update of a buffer or parameter is refused: the compiled model would silently not perform it."""
    keep, mutated = [], []
    for i, spec in enumerate(sig.output_specs):
        kind = spec.kind.name
        if kind in ("BUFFER_MUTATION", "PARAMETER_MUTATION"):
            raise FrontendError(f"the model updates {spec.target!r} in place ({kind.lower()}); presso compiles "
                                "functional models: return the new value instead")
        if kind == "USER_OUTPUT":
            keep.append(i)
        elif kind == "USER_INPUT_MUTATION":
            mutated.append(i)
    return keep + mutated


def _record_input_mutations(g: Graph, sig) -> None:
    """``meta["input_mutations"]``: [graph output index, graph input index] per updated input."""
    names = [v.name for v in g.inputs]
    specs = [s for s in sig.output_specs if s.kind.name == "USER_INPUT_MUTATION"]
    n_user = len(g.outputs) - len(specs)
    if specs:
        g.meta["input_mutations"] = [[n_user + k, names.index(clean_name(s.target))] for k, s in enumerate(specs)]


def _import_fx(module, example_inputs, name: str) -> Graph:
    """Trace with torch.fx + make_fx; like the export path, an op that is neither handled nor
    admitted is decomposed with torch's table and the trace retried."""
    table: dict = {}
    while True:
        try:
            return _import_fx_once(module, example_inputs, name, table)
        except UnsupportedOpError as e:
            target = getattr(e, "target", None)
            if target is None or target in table or not isinstance(target, torch._ops.OpOverload) \
                    or target._schema.is_mutable or not aten_ops.decomposition_table([target]):
                raise
            table.update(aten_ops.decomposition_table([target]))


def _import_fx_once(module, example_inputs, name: str, table: dict) -> Graph:
    from torch.fx.experimental.proxy_tensor import make_fx
    traced = fx.symbolic_trace(module)   # fails on data-dependent control flow
    names = [n for n, _ in traced.named_parameters()] + [n for n, _ in traced.named_buffers()]
    tensors = [t for _, t in traced.named_parameters()] + [t for _, t in traced.named_buffers()]

    def fn(flat, *args):
        return torch.func.functional_call(traced, dict(zip(names, flat)), args)

    gm = make_fx(fn, tracing_mode="fake", pre_dispatch=True, decomposition_table=table)(tensors, *example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    imp = _Importer(name)
    consts = {p.name: imp.g.add_param(clean_name(nm), t.detach().contiguous())
              for p, nm, t in zip(placeholders, names, tensors)}
    arg_names = [p for p in placeholders[len(names):]]
    fwd_args = [a for a in traced.graph.nodes if a.op == "placeholder"]
    inputs = {p.name: (fwd_args[i].name if i < len(fwd_args) else p.name) for i, p in enumerate(arg_names)}
    g = imp.run(gm, inputs, consts)
    _drop_unused_params(g)
    return g


def _drop_unused_params(g: Graph) -> None:
    used = {v.name for n in g.nodes for v in n.inputs if v is not None} | {v.name for v in g.outputs}
    for name in [n for n in g.params if n not in used]:
        g.remove_param(name)
