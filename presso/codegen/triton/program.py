"""A graph selected into the ``cuda`` target's ops (``select.py``) -> its program: one launch per
node. A ``cuda.*`` node launches its kernel (a Triton kernel, or the torch routine the op names
for decode attention and cache writes); any other node runs the op's torch reference on the
device. Which kernel a node runs is chosen in the IR, not here; ``Program.kernels`` names it.

A kernel that reads params in its own layout declares a ``prepare``, which the runtime applies
once at load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ...errors import CodegenError
from ...ir.graph import Graph, Node
from ...ir.registry import get_op
from ...ir.types import DType
from .decode_steps import (PositionMask, cache_write_step, gqa_attention_step, latent_attention_step,
                           masked_attention_step, rotary_cache_step)
from .step import Step


def _nm_index_packer(kept: int, m: int):
    """A ``prepare`` function repacking an N:M index into the form the kernels read
    (``pack_nm_index``), and the dict where it records that form's bits per entry for ``run``."""
    from .linear import pack_nm_index
    bits = {}

    def pack_index(it):
        packed, bits["index"] = pack_nm_index(it, kept, m)
        return (packed,)
    return pack_index, bits


def _tiled_int4(group_size: int):
    """The ``prepare`` of int4 codes into ``int4.py``'s tiled layout; ``key`` lets the runtime
    prepare a table once for all its readers (a tied embedding's lookup and LM head)."""
    from .int4 import pack_int4

    def prepare(qt, st, zt):
        return pack_int4(qt, st, zt, group_size), None, None
    prepare.key = ("int4_tiled", group_size)
    return prepare


def _epilogue(n: Node, n_fixed: int):
    """The node's folded epilogue for the kernel (None without one), and the kernel name's suffix."""
    from .epilogue import Epilogue
    a = n.attrs
    if not a["epilogue"]:
        return None, ""
    out = n.outputs[0].type.dtype.torch
    if a.get("pair"):
        return Epilogue(a["epilogue"], a["acc"], (1 - a["acc"],), out), "+glu"
    n_ops = len(n.inputs) - n_fixed + 1
    return Epilogue(a["epilogue"], a["acc"], tuple(j for j in range(n_ops) if j != a["acc"]), out), "+epilogue"


def _linear_step(n: Node, kernel: str, n_fixed: int, launch: Callable, prepare=None) -> Step:
    """A compressed linear: ``launch(fixed operands..., epilogue=, extras=[, pair=])``."""
    epi, suffix = _epilogue(n, n_fixed)
    pair = n.attrs.get("pair", False)

    def run(*ins):
        kw = {"epilogue": epi, "extras": tuple(ins[n_fixed:])} if epi is not None else {}
        if pair:
            kw["pair"] = True
        return [launch(*ins[:n_fixed], **kw)]
    return Step(n, kernel + suffix, run, list(n.inputs), prepare)


def _int4_linear(n: Node) -> Step:
    from .int4 import int4_linear, int4_linear_tiled
    gs = n.attrs["group_size"]
    if n.attrs["tiled"]:
        return _linear_step(n, "triton:int4_linear", 5, lambda xt, w, _s, _z, bt, **e: int4_linear_tiled(xt, w, bt, **e),
                            prepare=((1, 2, 3), _tiled_int4(gs)))
    return _linear_step(n, "triton:int4_linear", 5, lambda xt, qt, st, zt, bt, **e: int4_linear(xt, qt, st, zt, bt, gs, **e))


def _int8_linear(n: Node) -> Step:
    from .linear import int8_linear
    gs = n.attrs["group_size"]
    return _linear_step(n, "triton:int8_linear", 5, lambda xt, qt, st, zt, bt, **e: int8_linear(xt, qt, st, zt, bt, gs, **e))


def _nm_select_linear(n: Node) -> Step:
    from .nm_select import nm_select_linear, pack_nm_select
    nn, m = n.attrs["n"], n.attrs["m"]
    return _linear_step(n, f"triton:nm_select_{nn}_{m}", 4, lambda xt, w, _i, bt, **e: nm_select_linear(xt, w, bt, **e),
                        prepare=((1, 2), lambda vt, it: (pack_nm_select(vt, it, m), None)))


def _nm_linear(n: Node) -> Step:
    from .linear import nm_linear
    nn, m = n.attrs["n"], n.attrs["m"]
    pack_index, bits = _nm_index_packer(n.inputs[1].type.shape[1], m)

    def launch(xt, vt, it, bt, **e):
        return nm_linear(xt, vt, it, nn, m, bt, index_bits=bits["index"], **e)
    return _linear_step(n, f"triton:nm_linear_{nn}_{m}", 4, launch, prepare=((2,), pack_index))


def _nm_select_int4_linear(n: Node) -> Step:
    from .nm_select import nm_select_linear, pack_nm_select_int4
    nn, m, gs = n.attrs["n"], n.attrs["m"], n.attrs["group_size"]
    return _linear_step(n, f"triton:nm_select_int4_{nn}_{m}", 6,
                        lambda xt, w, _s, _z, _i, bt, **e: nm_select_linear(xt, w, bt, **e),
                        prepare=((1, 2, 3, 4), lambda ct, st, zt, it: (pack_nm_select_int4(ct, st, zt, gs, it, m),
                                                                       None, None, None)))


def _nm_int4_linear(n: Node) -> Step:
    """The gather kernel reading the int4 codes of the kept values and their scales,
    dequantizing in registers."""
    from .linear import nm_linear
    nn, m, gs = n.attrs["n"], n.attrs["m"], n.attrs["group_size"]
    pack_index, bits = _nm_index_packer(n.inputs[1].type.shape[1], m)        # (logical) kept values per row

    def launch(xt, ct, st, zt, it, bt, **e):
        return nm_linear(xt, ct, it, nn, m, bt, index_bits=bits["index"], value_scales=st, value_zeros=zt,
                         value_group=gs, **e)
    return _linear_step(n, f"triton:nm_int4_linear_{nn}_{m}", 6, launch, prepare=((4,), pack_index))


def _gather_dequant(n: Node) -> Step:
    from .gather_dequant import gather_dequant, gather_dequant_tiled
    a = n.attrs
    gs, bits, dtype = a["group_size"], a["bits"], DType[a["dtype"]].torch
    if a["tiled"]:
        return Step(n, "triton:gather_dequant_int4", lambda ids, w, _s, _z: [gather_dequant_tiled(ids, w, dtype)],
                    list(n.inputs), prepare=((1, 2, 3), _tiled_int4(gs)))
    return Step(n, f"triton:gather_dequant_int{bits}",
                lambda ids, q, s_, z: [gather_dequant(ids, q, s_, z, bits, gs, dtype)], list(n.inputs))


def _elementwise(n: Node) -> Step:
    from .elementwise import fused_elementwise
    out = n.outputs[0].type
    expr = n.attrs["expr"]
    dtype = out.dtype.torch

    def run(*xs, bindings):
        return [fused_elementwise(expr, list(xs), out.concrete_shape(bindings), dtype)]
    return Step(n, "triton:fused_elementwise", run, list(n.inputs), takes_bindings=True)


def _norm(n: Node) -> Step:
    from .norm import layer_norm, rms_norm
    eps = n.attrs["eps"]
    if n.op == "cuda.rms_norm":
        return Step(n, "triton:rms_norm", lambda x, w: [rms_norm(x, w, eps)], list(n.inputs))
    return Step(n, "triton:layer_norm", lambda x, w, b: [layer_norm(x, w, b, eps)], list(n.inputs))


def _rotary(n: Node) -> Step:
    from .rotary import rotary
    out = n.outputs[0].type.dtype.torch
    return Step(n, "triton:rotary", lambda xt, c, s_: [rotary(xt, c, s_, out)], list(n.inputs))


def _torch_step(n: Node) -> Step:
    opdef = get_op(n.op)
    attrs = n.attrs

    def run(*ins, bindings):
        return opdef.run(list(ins), attrs, bindings)
    return Step(n, "torch", run, list(n.inputs), takes_bindings=True)


# target op -> its step (decode attention reads the program's position mask)
EMITTERS: dict[str, Callable[..., Step]] = {
    "cuda.int4_linear": _int4_linear,
    "cuda.int8_linear": _int8_linear,
    "cuda.nm_linear": _nm_linear,
    "cuda.nm_select_linear": _nm_select_linear,
    "cuda.nm_int4_linear": _nm_int4_linear,
    "cuda.nm_select_int4_linear": _nm_select_int4_linear,
    "cuda.gather_dequant": _gather_dequant,
    "cuda.elementwise": _elementwise,
    "cuda.rms_norm": _norm,
    "cuda.layer_norm": _norm,
    "cuda.rotary": _rotary,
    "cuda.rotary_into_caches": rotary_cache_step,
    "cuda.cache_write": cache_write_step,
    "cuda.gqa_decode_attention": gqa_attention_step,
}


@dataclass
class Program:
    graph: Graph
    steps: list
    mask: Optional[PositionMask] = None

    def begin_run(self) -> None:
        """Forget what the previous run computed once for all steps (the position mask)."""
        if self.mask is not None:
            self.mask.reset()

    @property
    def kernels(self) -> dict[str, str]:
        return {s.node.name: s.kernel for s in self.steps}


def emit_program(g: Graph) -> Program:
    """The program of a graph whose kernels are selected: one step per node."""
    mask = PositionMask()
    steps = []
    for n in g.nodes:
        if n.op == "cuda.masked_attention":
            steps.append(masked_attention_step(n, mask))
        elif n.op == "cuda.latent_attention":
            steps.append(latent_attention_step(n, g.params))
        elif n.op in EMITTERS:
            steps.append(EMITTERS[n.op](n))
        elif n.op.startswith("cuda."):
            raise CodegenError(f"node %{n.name}: the cuda program has no emitter for target op {n.op}")
        else:
            steps.append(_torch_step(n))
    return Program(g, steps, mask)


def build_program(g: Graph) -> Program:
    """Select ``g``'s kernels (in place; a no-op on a graph already selected) and emit its program."""
    from .select import select_kernels
    return emit_program(select_kernels(g))


def run_step(step: Step, ins: list, bindings: dict) -> list[torch.Tensor]:
    if step.takes_bindings:
        return step.run(*ins, bindings=bindings)
    return step.run(*ins)
