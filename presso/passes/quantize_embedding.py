"""quantize{embeddings=int8|int4}: embedding tables and the LM head that shares them.

An embedding table is a large float param read by ``gather`` lookups (49152 x 576 in SmolLM2,
a fifth of the model; 30522 x 384 in MiniLM, half of it). This module stores it group-wise
quantized (groups along the hidden dim, RTN: a lookup has no input statistics to optimize
against) and turns each lookup into ``gather_dequantize``, which dequantizes only the rows looked
up. A table tied to the LM head (the head's ``linear`` reads the same param) stays ONE packed
tensor with two readers: the lookups and a ``dequantize`` feeding the head, which every target
runs as any other quantized linear. Its bits are the table's: the head is int4 only when
``embeddings=int4`` is asked for.

Which tables and layers a ``quantize`` pass touches is chosen by name (``selector``): ``skip``
excludes weights whose name matches, ``only`` restricts the pass to weights whose name matches;
a tied table is known by its param's name (which torch.export may take from the head).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ir.graph import Graph
from ..ir.ops import pack_int4
from ..ir.types import DType, TensorType
from .compress_common import (LookupTable, derive, lookup_tables, option_pattern, output_error, record,
                              replace_linear)
from .int_codes import check_int4_fits, dequant, rtn

EMBEDDING_BITS = {"none": 0, "int8": 8, "int4": 4}


def selector(pass_name: str, skip: str, only: str, g: Graph = None) -> Callable[[str], bool]:
    """Whether a weight name is to be compressed: not matching ``skip`` and (if given) matching
    ``only`` (both regexes, searched anywhere in the name). With ``g``, a pattern that matches no
    parameter of ``g`` is refused: a typo would silently leave every layer as it was."""
    skip_re, only_re = option_pattern(g, "skip", skip, pass_name), option_pattern(g, "only", only, pass_name)
    return lambda name: not (skip_re and skip_re.search(name)) and not (only_re and not only_re.search(name))


def quantize_embeddings(g: Graph, embeddings: str, group_size: int, symmetric: bool,
                        keep: Callable[[str], bool]) -> list[LookupTable]:
    """Quantize every selected lookup table (and the linears tied to it) in place; returns the
    tables done. All tables are checked before any is changed."""
    bits = EMBEDDING_BITS[embeddings]
    if not bits:
        return []
    tables = [t for t in lookup_tables(g) if keep(t.weight.name)]
    for t in tables:
        _check_table(t, group_size, bits)
    for t in tables:
        _quantize_table(g, t, bits, group_size or t.weight.type.shape[1], symmetric)
    return tables


def looked_up_params(g: Graph) -> set[str]:
    """Names of the params quantized tables are looked up in (``gather_dequantize``): passes that
    re-densify quantized linears leave a head reading one of them alone, or it would be stored twice."""
    return {v.name for n in g.nodes if n.op == "gather_dequantize" for v in n.inputs[1:] if v is not None}


def _check_table(t: LookupTable, group_size: int, bits: int) -> None:
    cols = t.weight.type.shape[1]
    check_int4_fits(cols, group_size, bits, f"table %{t.weight.name} (read by %{t.gathers[0].name}) has an odd row "
                    f"length {cols}", "embeddings=int4", f" for table %{t.weight.name}")


def _quantize_table(g: Graph, t: LookupTable, bits: int, group: int, symmetric: bool) -> None:
    name, w = t.weight.name, t.tensor
    codes, scales, zeros = rtn(w, bits, group, symmetric)
    err = output_error(w, dequant(codes, scales, zeros, group), None)
    q, s, z = _store(g, name, codes, scales, zeros, bits)
    attrs = {"bits": bits, "group_size": group, "dtype": t.weight.type.dtype.value}
    for n in t.gathers:
        g.replace_uses(n.output, g.op("gather_dequantize", n.inputs[1], q, s, z, before=n, **attrs))
    for n in t.linears:
        wd = g.op("dequantize", q, s, z, before=n, **attrs)
        replace_linear(g, n, g.op("linear", n.inputs[0], wd, n.inputs[2], before=n))
    record(g, name, bytes_before=t.weight.type.nbytes(), bits=bits, group_size=group, symmetric=symmetric,
           method="rtn", role="embedding+head" if t.linears else "embedding", rel_error=err, error_basis="weights")


def _store(g: Graph, name: str, codes: torch.Tensor, scales: torch.Tensor, zeros, bits: int):
    """The table's packed params: codes (i8/u8, or i4/u4 two per byte), fp16 scales, u8 zeros."""
    rows, cols = codes.shape
    signed = zeros is None
    if bits == 4:
        data, dt = pack_int4(codes.to(torch.int16)), DType.i4 if signed else DType.u4
    else:
        data, dt = codes.to(torch.int8 if signed else torch.uint8), DType.i8 if signed else DType.u8
    out = [g.add_param(g.fresh_name(name + ".q"), data.contiguous(), TensorType((rows, cols), dt)),
           g.add_param(g.fresh_name(name + ".scales"), scales.to(torch.float16).contiguous())]
    out.append(None if zeros is None
               else g.add_param(g.fresh_name(name + ".zeros"), zeros.to(torch.uint8).contiguous()))
    for v in out:
        if v is not None:
            derive(g, v.name, name)
    return out
