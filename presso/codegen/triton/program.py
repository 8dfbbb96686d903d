"""A graph -> the ``cuda`` target's program: one launch per node, Triton kernels where presso has
one (compressed linears reading packed weights, fused elementwise regions, norms), the op's
torch implementation on the device for the rest (matmuls with dense weights, attention, layout).

Weight producers (``dequantize``, ``densify_nm``) feeding exactly one linear are never run: the
linear's kernel reads their packed params. A decode step's attention and cache writes are built
by ``decode_steps.py``. ``Program.kernels`` says which node runs what.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...ir.analysis import packed_weight_producer, quantized_nm_producers
from ...ir.expr import node_expr
from ...ir.graph import Graph, Node, Value
from ...ir.registry import get_op
from ...ir.types import DType
from .decode_steps import (PositionMask, attention_cached_step, cache_update_step, latent_attention_step,
                           rotary_cache_groups, rotary_cache_step)
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


SELECT_PATTERNS = ((2, 4), (4, 8))      # N:M patterns the select kernel runs (nm_select.py)


def _linear_step(n: Node, p: Node) -> Step:
    from .int4 import int4_linear, int4_linear_tiled, tiled_layout_fits
    from .linear import int8_linear, nm_linear
    from .nm_select import fits as select_fits, nm_select_linear, pack_nm_select
    x, b = n.inputs[0], n.inputs[2]
    a = p.attrs
    if p.op == "dequantize":
        q, s, z = p.inputs
        gs = a["group_size"]
        if a["bits"] == 4 and tiled_layout_fits(gs, q.type.shape[1]):      # (the type's shape is logical)
            def run_tiled(xt, w, _s, _z, bt, **epilogue):
                return [int4_linear_tiled(xt, w, bt, **epilogue)]
            run_tiled.pairs = True          # takes pair=True (a gated pair's halves: _gated_pair)
            return Step(n, "triton:int4_linear", run_tiled, [x, q, s, z, b], prepare=((1, 2, 3), _tiled_int4(gs)))
        kern = int4_linear if a["bits"] == 4 else int8_linear

        def run(xt, qt, st, zt, bt, **epilogue):
            return [kern(xt, qt, st, zt, bt, gs, **epilogue)]
        return Step(n, f"triton:int{a['bits']}_linear", run, [x, q, s, z, b])
    vals, idx = p.inputs
    nn, m = a["n"], a["m"]
    if (nn, m) in SELECT_PATTERNS and vals.type.dtype in (DType.f16, DType.bf16) and select_fits(vals.type.shape[1] * 2):
        def run_select(xt, w, _i, bt, **epilogue):
            return [nm_select_linear(xt, w, bt, **epilogue)]
        return Step(n, f"triton:nm_select_{nn}_{m}", run_select, [x, vals, idx, b],
                    prepare=((1, 2), lambda vt, it: (pack_nm_select(vt, it, m), None)))
    pack_index, bits = _nm_index_packer(vals.type.shape[1], m)

    def run_nm(xt, vt, it, bt, **epilogue):
        return [nm_linear(xt, vt, it, nn, m, bt, index_bits=bits["index"], **epilogue)]
    return Step(n, f"triton:nm_linear_{nn}_{m}", run_nm, [x, vals, idx, b], prepare=((2,), pack_index))


def _tiled_int4(group_size: int):
    """The ``prepare`` of int4 codes into ``int4.py``'s tiled layout; ``key`` lets the runtime
    prepare a table once for all its readers (a tied embedding's lookup and LM head)."""
    from .int4 import pack_int4

    def prepare(qt, st, zt):
        return pack_int4(qt, st, zt, group_size), None, None
    prepare.key = ("int4_tiled", group_size)
    return prepare


def _gather_dequant_step(n: Node) -> Step:
    """An embedding lookup in a quantized table: int4 tables the tiled layout allows are read in
    it (``_tiled_int4``: shared with a tied head's GEMV), others in the graph's layout."""
    from .gather_dequant import gather_dequant, gather_dequant_tiled
    from .int4 import tiled_layout_fits
    a = n.attrs
    gs, bits, dtype = a["group_size"], a["bits"], DType[a["dtype"]].torch
    if bits == 4 and tiled_layout_fits(gs, n.inputs[1].type.shape[1]):
        return Step(n, "triton:gather_dequant_int4", lambda ids, w, _s, _z: [gather_dequant_tiled(ids, w, dtype)],
                    list(n.inputs), prepare=((1, 2, 3), _tiled_int4(gs)))
    return Step(n, f"triton:gather_dequant_int{bits}",
                lambda ids, q, s_, z: [gather_dequant(ids, q, s_, z, bits, gs, dtype)], list(n.inputs))


def _nm_int4_step(n: Node, d: Node, q: Node) -> Step:
    """linear(x, densify_nm(dequantize(codes, scales[, zeros]), index)): 2:4 and 4:8 run the select
    kernel of nm_select.py on its layout (repacked once at load); other N:M the gather kernel,
    which reads the int4 codes of the kept values and their scales, dequantizing in registers."""
    from .linear import nm_linear
    from .nm_select import fits, nm_select_linear, pack_nm_select_int4
    x, b = n.inputs[0], n.inputs[2]
    codes, scales, zeros = q.inputs
    nn, m, gs = d.attrs["n"], d.attrs["m"], q.attrs["group_size"]
    if (nn, m) in SELECT_PATTERNS and fits(codes.type.shape[1] * 2, group=gs):
        def run_select(xt, w, _s, _z, _i, bt, **epilogue):
            return [nm_select_linear(xt, w, bt, **epilogue)]
        return Step(n, f"triton:nm_select_int4_{nn}_{m}", run_select, [x, codes, scales, zeros, d.inputs[1], b],
                    prepare=((1, 2, 3, 4), lambda ct, st, zt, it: (pack_nm_select_int4(ct, st, zt, gs, it, m),
                                                                   None, None, None)))
    pack_index, bits = _nm_index_packer(codes.type.shape[1], m)        # (logical) kept values per row

    def run(xt, ct, st, zt, it, bt, **epilogue):
        return [nm_linear(xt, ct, it, nn, m, bt, index_bits=bits["index"], value_scales=st, value_zeros=zt,
                          value_group=gs, **epilogue)]
    return Step(n, f"triton:nm_int4_linear_{nn}_{m}", run, [x, codes, scales, zeros, d.inputs[1], b],
                prepare=((4,), pack_index))


def _epilogue_operand_fits(v: Value, out: Value) -> bool:
    """A float operand the kernel can read at the output tile: the output's shape, or one row of it."""
    t, o = v.type, out.type
    if not t.dtype.is_float:
        return False
    if t.shape == o.shape:
        return True
    return t.rank >= 1 and t.rank <= o.rank and t.shape[-1] == o.shape[-1] and all(d == 1 for d in t.shape[:-1])


def _gated_pair(st: Step, users: dict, outputs: set):
    """(split, elementwise node, epilogue) when an int4 linear's output is two stacked halves
    (``concat_linears``' gated pair) whose only user is one elementwise node of exactly those two:
    the kernel then computes both halves and the node in one launch (``int4_linear_tiled(pair=True)``)."""
    from .epilogue import Epilogue
    out = st.node.outputs[0]
    us = users.get(out, [])
    if not getattr(st.run, "pairs", False) or out in outputs or len(us) != 1 or us[0].op != "split":
        return None
    sp = us[0]
    sizes = sp.attrs["sizes"]
    if (len(sp.outputs) != 2 or sp.attrs["axis"] != out.type.rank - 1 or sizes[0] != sizes[1]
            or not isinstance(sizes[0], int) or sizes[0] % 16 or sp.meta.get("kv_cache_points")):
        return None
    fs = [users.get(h, []) for h in sp.outputs]
    if any(h in outputs or len(u) != 1 for h, u in zip(sp.outputs, fs)) or fs[0][0] is not fs[1][0]:
        return None
    f = fs[0][0]
    expr, fout = node_expr(f), f.outputs[0]
    where = [[j for j, v in enumerate(f.inputs) if v is h] for h in sp.outputs]
    if (expr is None or len(f.inputs) != 2 or any(len(w) != 1 for w in where)
            or fout.type.shape != sp.outputs[0].type.shape or not fout.type.dtype.is_float):
        return None
    return sp, f, Epilogue(expr, where[0][0], (where[1][0],), fout.type.dtype.torch)


def _fold_epilogues(steps: list, users: dict, outputs: set) -> list:
    """A compressed linear whose output's only user is an elementwise node (a fused region or one
    fusable op) takes that node's computation as its kernel epilogue: one launch and no round trip
    of the linear's output, provided the node's other operands (at most two, full-shaped or one
    row) are computed before the linear. A gated pair's stacked int4 linear takes the node of its
    two halves (``_gated_pair``)."""
    from .epilogue import MAX_EXTRA, Epilogue
    produced_at = {v: i for i, st in enumerate(steps) for v in st.outputs}
    folded: dict[int, Step] = {}
    dropped = set()
    for i, st in enumerate(steps):
        if st.node.op != "linear" or not st.kernel.startswith("triton:"):
            continue
        pair = _gated_pair(st, users, outputs)
        if pair is not None:
            sp, f, epi = pair

            def run_pair(*ins, _run=st.run, _epi=epi):
                return _run(*ins, epilogue=_epi, extras=(), pair=True)
            folded[i] = Step(f, st.kernel + "+glu", run_pair, st.inputs, st.prepare)
            dropped.update((sp, f))
            continue
        out = st.node.outputs[0]
        us = users.get(out, [])
        if out in outputs or len(us) != 1:
            continue
        f = us[0]
        expr = node_expr(f)
        if expr is None:
            continue
        fout = f.outputs[0]
        acc = [j for j, v in enumerate(f.inputs) if v is out]
        others = [(j, v) for j, v in enumerate(f.inputs) if v is not out]
        if (fout.type.shape != out.type.shape or not fout.type.dtype.is_float or len(acc) != 1
                or len(others) > MAX_EXTRA
                or not all(_epilogue_operand_fits(v, out) and produced_at.get(v, -1) < i for _, v in others)):
            continue
        epi = Epilogue(expr, acc[0], tuple(j for j, _ in others), fout.type.dtype.torch)
        k = len(st.inputs)

        def run(*ins, _run=st.run, _k=k, _epi=epi):
            return _run(*ins[:_k], epilogue=_epi, extras=tuple(ins[_k:]))
        folded[i] = Step(f, st.kernel + "+epilogue", run, st.inputs + [v for _, v in others], st.prepare)
        dropped.add(f)
    return [folded.get(i, st) for i, st in enumerate(steps) if st.node not in dropped or i in folded]


def _fused_step(n: Node) -> Step:
    from .elementwise import fused_elementwise
    out = n.outputs[0].type
    expr = n.attrs["expr"]
    dtype = out.dtype.torch

    def run(*xs, bindings=None):
        return [fused_elementwise(expr, list(xs), out.concrete_shape(bindings or {}), dtype)]
    return Step(n, "triton:fused_elementwise", run, list(n.inputs))


def _norm_step(n: Node) -> Step | None:
    from .norm import layer_norm, rms_norm
    if n.attrs["ndim"] != 1 or not n.inputs[0].type.dtype.is_float:
        return None
    eps = n.attrs["eps"]
    if n.op == "rms_norm":
        return Step(n, "triton:rms_norm", lambda x, w: [rms_norm(x, w, eps)], list(n.inputs))
    return Step(n, "triton:layer_norm", lambda x, w, b: [layer_norm(x, w, b, eps)], list(n.inputs))


def _rotary_step(n: Node) -> Step | None:
    from .rotary import fits, rotary
    x = n.inputs[0]
    if not (fits(x.type.shape) and all(v.type.dtype.is_float for v in n.inputs)
            and all(v.type.rank <= x.type.rank for v in n.inputs[1:])):
        return None
    out = n.outputs[0].type.dtype.torch
    return Step(n, "triton:rotary", lambda xt, c, s_: [rotary(xt, c, s_, out)], list(n.inputs))


def _torch_step(n: Node) -> Step:
    opdef = get_op(n.op)
    attrs = n.attrs

    def run(*ins, bindings=None):
        return opdef.run(list(ins), attrs, bindings or {})
    return Step(n, "torch", run, list(n.inputs))


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


def build_program(g: Graph) -> Program:
    users = g.users()
    outputs = set(g.outputs)
    skipped, covered, steps = set(), set(), []     # nodes whose step is dropped / never built
    mask = PositionMask()
    rope_caches = rotary_cache_groups(g, users)
    for anchor, four in rope_caches.items():
        covered.update(x for x in four if x is not None and x is not anchor)
    for n in g.nodes:
        if n in covered:          # run by another node's step
            continue
        if n in rope_caches:
            steps.append(rotary_cache_step(n, rope_caches[n]))
            continue
        if n.op == "linear":
            p = packed_weight_producer(n.inputs[1], users)
            if p is not None:
                skipped.add(p)
                steps.append(_linear_step(n, p))
                continue
            chain = quantized_nm_producers(n.inputs[1], users)
            if chain is not None:
                skipped.update(chain)
                steps.append(_nm_int4_step(n, *chain))
                continue
        step = None
        if n.op == "fused_elementwise":
            step = _fused_step(n)
        elif n.op in ("rms_norm", "layer_norm"):
            step = _norm_step(n)
        elif n.op == "rotary":
            step = _rotary_step(n)
        elif n.op == "gather_dequantize":
            step = _gather_dequant_step(n)
        elif n.op == "attention_cached":
            latent = latent_attention_step(n, users, outputs, g.params)
            if latent is not None:
                step, replaced = latent
                skipped.update(replaced)
                covered.add(step.node)
            else:
                step = attention_cached_step(n, mask)
        elif n.op == "cache_update" and n.inputs[0].kind == "input" and len(users.get(n.inputs[0], [])) == 1:
            step = cache_update_step(n)
        steps.append(step or _torch_step(n))
    steps = [s for s in steps if s.node not in skipped]
    return Program(g, _fold_epilogues(steps, users, outputs), mask)


def needs_bindings(step: Step) -> bool:
    return step.kernel in ("torch", "triton:fused_elementwise")


def run_step(step: Step, ins: list, bindings: dict) -> list[torch.Tensor]:
    if needs_bindings(step):
        return step.run(*ins, bindings=bindings)
    return step.run(*ins)
