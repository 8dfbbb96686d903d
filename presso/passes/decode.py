"""The decode program: turn a causal decoder graph (sequence dim symbolic, ``seq``) into one
graph that runs both prefill and single-token decode steps over an explicit KV cache.

    inputs:  the model's inputs (ids: i64[batch, seq]), positions: i64[seq] (cache slots),
             starts: i64[batch] (each sequence's first real slot: left padding),
             one preallocated cache per attention operand (cache.{layer}.{k|v})
    outputs: the model's outputs, then every updated cache

For each ``attention(q, k, v){causal}``, the cache stores the tensor the ``kv_cache`` pass marked
as k's / v's *cache point* (by default k and v themselves, post-RoPE): new entries are written
with ``cache_update`` at ``positions``; whatever lies between the cache point and the attention
(Palu's up-projection, RoPE) is recomputed over the whole cache; the attention becomes
``attention_cached`` (query i of sequence b sees cache slots starts[b]..positions[i]). Position
tables (``slice(table, 0, seq)``, ``arange(seq)``) become lookups of ``positions``.

Ragged batches are left-padded: every sequence writes a step's token at the same slot, and a
sequence's positions count from its start. RoPE needs nothing more: attention scores depend only
on the distance between query and key positions, which slots give exactly, so RoPE tables stay
looked up by slot. An absolute position table added to the embeddings (GPT-2's) is looked up per
sequence, at slot - start. A model whose positions feed anything else is marked
(``meta["decode"]["ragged_refusal"]``) and ``generate`` refuses ragged batches for it.
``specialize(graph, {"seq": 1})`` then gives the static single-token step graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import PressoError
from ..ir.graph import Graph, Node, Value
from ..ir.registry import canonical_op, get_op
from ..ir.types import DType, TensorType, dims_product
from ..ir.verify import verify
from .dce import dce
from .fold_constants import fold_constants

SEQ = "seq"


class DecodeError(PressoError):
    """The graph cannot be turned into a decode program (no causal attention, static sequence...)."""


@dataclass
class CacheSpec:
    name: str        # graph input (and, updated, output) name
    type: TensorType
    layer: int
    which: str       # "k" or "v"
    axis: int        # the sequence axis


def subst_dims(dims, bindings: dict):
    """Dims with symbols in ``bindings`` replaced (products too): ``batch*seq`` with seq=1 -> batch."""
    return [dims_product([bindings.get(s, s) for s in d.split("*")]) if isinstance(d, str) else d for d in dims]


def _subst_attrs(node_op: str, attrs: dict, bindings: dict) -> dict:
    opdef = get_op(node_op)
    out = dict(attrs)
    for k, v in attrs.items():
        kind = opdef.attrs[k].kind
        if kind == "shape" and v is not None:
            out[k] = subst_dims(v, bindings)
        elif kind == "dim" and isinstance(v, str):
            out[k] = subst_dims([v], bindings)[0]
    return out


def specialize(g: Graph, bindings: dict) -> Graph:
    """A copy of ``g`` with symbolic dims bound to sizes (types re-inferred, attributes rewritten)."""
    out = Graph(g.name)
    out.meta = dict(g.meta)
    env = {}
    for v in g.inputs:
        env[v] = out.add_input(v.name, v.type.with_shape(subst_dims(v.type.shape, bindings)))
    for p in g.params.values():
        env[p.value] = out.add_param(p.value.name, p.data, p.value.type)
    for n in g.nodes:
        new = out.add_node(n.op, [None if v is None else env[v] for v in n.inputs], _subst_attrs(n.op, n.attrs, bindings),
                           names=[v.name for v in n.outputs])
        new.meta = dict(n.meta)
        for a, b in zip(n.outputs, new.outputs):
            env[a] = b
    out.outputs = [env[v] for v in g.outputs]
    verify(out)
    return out


def build_decode_graph(g: Graph, max_len: int) -> tuple[Graph, list[CacheSpec]]:
    """See the module docstring. ``g`` must have ``seq`` symbolic (compile with generation in mind)."""
    g = g.copy()
    attns = [n for n in g.nodes if n.op == "attention"]
    if not attns:
        raise DecodeError(f"graph @{g.name} has no attention: there is no KV cache to build")
    if not any(SEQ in v.type.symbols for v in g.inputs):
        raise DecodeError(f"graph @{g.name} has no symbolic '{SEQ}' dim in its inputs; compile the model with "
                          "dynamic_shapes marking the sequence dim Dim('seq') (presso.compile(..., generation=True))")
    for a in attns:
        if not a.attrs["causal"] or a.inputs[3] is not None:
            raise DecodeError(f"attention %{a.name} is not plain causal attention (causal={a.attrs['causal']}, "
                              f"mask={'yes' if a.inputs[3] is not None else 'no'}); only causal decoders get a KV cache")
    latents = sum("kv_rank" in r for r in g.meta.get("compression", {}).values())
    marked = sum(bool(n.meta.get("kv_cache_point")) + len(n.meta.get("kv_cache_points", ())) for n in g.nodes)
    if marked < latents:
        raise DecodeError(f"graph @{g.name}: the kv_cache pass compressed {latents} K/V projections but only {marked} "
                          "of their latents are still marked as cache points (a later rewrite or an artifact saved "
                          "by an older presso dropped the mark); the decode program would cache full keys and "
                          "values: compile the model again")
    positions = g.add_input("positions", TensorType((SEQ,), DType.i64))
    batch = g.inputs[0].type.shape[0]
    starts = g.add_input("starts", TensorType((batch,), DType.i64))
    _positions_from_input(g, positions)
    ragged_refusal = _positions_per_sequence(g, positions, starts)
    specs = []
    for layer, a in enumerate(attns):
        q, k, v, _ = a.inputs
        full = []
        for which, val in (("k", k), ("v", v)):
            point = _cache_point(val)
            axis = list(point.type.shape).index(SEQ) if SEQ in point.type.shape else None
            if axis is None:
                raise DecodeError(f"attention %{a.name}: the {which} cache point %{point.name} {point.type} has no "
                                  f"'{SEQ}' axis")
            ctype = point.type.with_shape(subst_dims(point.type.shape, {SEQ: max_len}))
            name = f"cache.{layer}.{which}"
            cache = g.add_input(name, ctype)
            updated = g.op("cache_update", cache, point, positions, axis=axis, before=a, name=name + ".new")
            g.outputs.append(updated)
            specs.append(CacheSpec(name, ctype, layer, which, axis))
            full.append(updated if point is val else _recompute(g, point, val, updated, positions, max_len, a))
        out = g.op("attention_cached", q, full[0], full[1], positions, starts, scale=a.attrs["scale"],
                   softcap=a.attrs["softcap"], before=a)
        g.replace_uses(a.output, out)
    dce(g)
    fold_constants(g)
    verify(g)
    g.meta["decode"] = {"max_len": max_len, "caches": [s.__dict__ | {"type": str(s.type)} for s in specs],
                        "ragged_refusal": ragged_refusal}
    return g, specs


def _positions_from_input(g: Graph, positions: Value) -> None:
    """slice(table, 0, seq) -> gather(table, positions); arange(0, seq) -> positions."""
    for n in list(g.nodes):
        if n.op == "slice" and n.attrs["end"] == SEQ and n.attrs["start"] == 0 and n.attrs["step"] == 1 \
                and n.inputs[0].kind == "param" and n.attrs["axis"] == 0:
            g.replace_uses(n.output, g.op("gather", n.inputs[0], positions, axis=0, before=n))
        elif n.op == "arange" and n.attrs["end"] == SEQ and n.attrs["start"] == 0 and n.attrs["step"] == 1:
            rep = positions if n.attrs["dtype"] == "i64" else g.op("cast", positions, dtype=n.attrs["dtype"], before=n)
            g.replace_uses(n.output, rep)
    dce(g)


def _is_constant(v: Value) -> bool:
    """v depends on no graph input (a param, or computed from params and constants only)."""
    return v.kind == "param" or (v.node is not None and all(u is None or _is_constant(u) for u in v.node.inputs))


def _feeds_only_rope_tables(g: Graph, v: Value, users: dict) -> bool:
    """v is a pure function of the positions (every other operand on the way a constant) read
    only as the cos / sin tables of ``rotary`` nodes."""
    if v in g.outputs:
        return False
    for n in users.get(v, []):
        if canonical_op(n.op) == "rotary" and n.inputs[0] is not v:
            continue
        if any(u is not None and u is not v and not _is_constant(u) for u in n.inputs):
            return False
        if not all(_feeds_only_rope_tables(g, out, users) for out in n.outputs):
            return False
    return True


def _index_chain(v: Value, positions: Value) -> Optional[list[Node]]:
    """The nodes computing a table index v from the positions, if they act on each position on
    its own: reshapes adding leading 1s, casts, arithmetic with a constant (OPT's offset)."""
    chain = []
    while v is not positions:
        n = v.node
        if n is None or v.type.rank < 1 or v.type.shape[-1] != SEQ:
            return None
        data = [u for u in n.inputs if u is not None and not _is_constant(u)]
        if len(data) != 1 or not (n.op == "cast" or n.op in ("add", "sub", "mul") and data[0].type.shape == v.type.shape
                                  or n.op == "reshape" and all(d == 1 for d in v.type.shape[:-1])):
            return None
        chain.append(n)
        v = data[0]
    return chain[::-1]


def _added_to(v: Value, shape: list, users: dict) -> bool:
    """Every reader of v adds it to a value of ``shape`` (what v becomes looked up per sequence)."""
    def fits(n):
        other = n.inputs[1] if n.inputs[0] is v else n.inputs[0]
        return n.op == "add" and other is not v and list(other.type.shape) == shape
    return bool(users.get(v)) and all(fits(n) for n in users[v])


def _positions_per_sequence(g: Graph, positions: Value, starts: Value) -> Optional[str]:
    """Absolute position tables (added to the token embeddings) looked up at each sequence's own
    positions (slot - start, 0 for pads); RoPE tables stay by slot (see the module docstring).
    Returns why ragged batches cannot be decoded, or None."""
    users = g.users()
    batch = starts.type.shape[0]
    per_sequence = None
    for n in list(g.nodes):
        if n.op != "gather" or n.inputs[0].kind != "param" or n.attrs["axis"] != 0:
            continue
        chain = _index_chain(n.inputs[1], positions)
        if chain is None or not _added_to(n.output, [batch, SEQ] + list(n.inputs[0].type.shape[1:]), users):
            continue
        if per_sequence is None:
            rows = g.op("reshape", starts, shape=[batch, 1], before=n)
            cols = g.op("reshape", positions, shape=[1, SEQ], before=n)
            zero = g.add_param(g.fresh_name("zero"), torch.zeros((), dtype=torch.int64), TensorType((), DType.i64))
            per_sequence = g.op("maximum", g.op("sub", cols, rows, before=n), zero, before=n,
                                name="sequence_positions")
        index = per_sequence            # [batch, seq]: the chain's reshapes only added leading 1s
        for c in chain:
            if c.op != "reshape":
                index = g.add_node(c.op, [index if u is not None and not _is_constant(u) else u for u in c.inputs],
                                   dict(c.attrs), before=n).output
        g.replace_uses(n.output, g.op("gather", n.inputs[0], index, axis=0, before=n))
    dce(g)
    users = g.users()
    for n in users.get(positions, []):
        if per_sequence is not None and n is cols.node:
            continue
        if not all(_feeds_only_rope_tables(g, out, users) for out in n.outputs):
            return (f"its positions feed %{n.outputs[0].name} ({n.op}), neither a RoPE table nor a position "
                    "embedding added to the tokens'")
    return None


# ops between a cache point and the attention that act on each token on its own (walked through
# to find the point; recomputed over the whole cache): the kv_cache pass's key rebuild and RoPE,
# and the forms later passes give its linear (W8A8's per-token activation codes, Hadamard rotation),
# and the dequantization of a quantized cache (kv_quant, kv_cache{latent_bits})
_PER_TOKEN_OPS = ("rotary", "reshape", "transpose", "expand", "linear", "cast", "linear_int8", "quantize_per_token",
                  "hadamard", "kv_dequantize")


def _cache_point(v: Value) -> Value:
    """The value the kv_cache pass marked upstream of ``v`` (through per-token ops), else ``v``."""
    cur = v
    for _ in range(8):
        if cur.node is None:
            break
        if cur.node.meta.get("kv_cache_point") or cur.name in cur.node.meta.get("kv_cache_points", {}):
            return cur     # (the second: one part of linears stacked by concat_linears)
        data = [u for u in cur.node.inputs if u is not None and u.kind != "param"]
        if canonical_op(cur.node.op) not in _PER_TOKEN_OPS or not data:
            break
        cur = data[0]
    return v


def _recompute(g: Graph, point: Value, target: Value, cache: Value, positions: Value, max_len: int,
               before: Node) -> Value:
    """Re-run the ops between ``point`` and ``target`` over the whole cache (every slot's position)."""
    all_pos = g.op("arange", end=max_len, before=before, name=g.fresh_name("cache_positions"))
    memo: dict = {point: cache, positions: all_pos}

    def clone(v: Optional[Value]):
        if v is None or v.kind == "param":
            return v
        if v in memo:
            return memo[v]
        if v.kind == "input":
            raise DecodeError(f"cannot recompute %{target.name} over the cache: it depends on input %{v.name}")
        n = v.node
        new = g.add_node(n.op, [clone(u) for u in n.inputs], _subst_attrs(n.op, n.attrs, {SEQ: max_len}),
                         before=before)
        for a, b in zip(n.outputs, new.outputs):
            memo[a] = b
        return memo[v]

    return clone(target)
