"""What the compression passes share: finding compressible linears, exact output-error estimates
from calibration Gram matrices, greedy budget allocation, and the per-layer compression record
that ``CompiledModel.report()`` reads."""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import PipelineError
from ..ir.graph import Graph, Node, Value
from .calibrate import CalibrationError, LinearStats, collect_linear_stats, normalize_samples


@dataclass
class Linear:
    """A ``linear`` node whose weight is a dense float parameter."""
    g: Graph
    node: Node
    weight: Value

    @property
    def tensor(self) -> torch.Tensor:
        return self.g.params[self.weight.name].data

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.type.shape)


def dense_linears(g: Graph) -> list[Linear]:
    """Linears whose weight is a dense float param read by linears only (a weight tied to an
    embedding lookup is left alone: compressing one use would store it twice)."""
    users = g.users()
    out = []
    for n in g.nodes:
        w = n.inputs[1] if n.op == "linear" else None
        if w is not None and w.kind == "param" and w.type.rank == 2 and w.type.dtype.is_float and w.type.is_static \
                and all(u.op == "linear" and u.inputs[1] is w and u.inputs[0] is not w for u in users[w]):
            out.append(Linear(g, n, w))
    return out


@dataclass
class LookupTable:
    """A dense float table read by embedding lookups (``gather`` along axis 0) and, when tied, as
    the weight of linears (an LM head): compressing it means one packed table for all readers."""
    g: Graph
    weight: Value
    gathers: list
    linears: list

    @property
    def tensor(self) -> torch.Tensor:
        return self.g.params[self.weight.name].data


def lookup_tables(g: Graph) -> list[LookupTable]:
    """Params read by at least one axis-0 ``gather`` and otherwise only as linear weights (the
    tables ``dense_linears`` leaves alone). A table with any other reader is not returned:
    compressing it would store it twice."""
    users = g.users()
    out = []
    for p in g.params.values():
        w = p.value
        t = w.type
        if t.rank != 2 or not t.dtype.is_float or not t.is_static:
            continue
        readers = users.get(w, [])
        gathers = [u for u in readers if u.op == "gather" and u.inputs[0] is w and u.inputs[1] is not w
                   and u.attrs["axis"] % 2 == 0]
        linears = [u for u in readers if u.op == "linear" and u.inputs[1] is w and u.inputs[0] is not w]
        if gathers and len(gathers) + len(linears) == len(readers):
            out.append(LookupTable(g, w, gathers, linears))
    return out


def calibration_stats(g: Graph, ctx, nodes: Sequence[Node], need: bool, what: str) -> Optional[dict[str, LinearStats]]:
    """Stats for ``nodes`` from ``ctx.calibration``; raises when ``need`` and there is none."""
    samples = normalize_samples(getattr(ctx, "calibration", None))
    if not samples:
        if need:
            raise CalibrationError(f"{what} needs calibration data: pass calibration=[(input, ...), ...] "
                                   "to presso.compile")
        return None
    return collect_linear_stats(g, samples, nodes, progress=getattr(ctx, "progress", True), desc=what)


def output_error(w: torch.Tensor, w2: torch.Tensor, gram: Optional[torch.Tensor]) -> float:
    """Relative output error ||(W - W') X||^2 / ||W X||^2 over the calibration rows, computed
    exactly from the Gram matrix; without calibration, the relative weight error."""
    d = (w.double() - w2.double())
    if gram is None:
        return float((d * d).sum() / (w.double() ** 2).sum().clamp_min(1e-300))
    num = ((d @ gram) * d).sum()
    den = ((w.double() @ gram) * w.double()).sum()
    return float(num / den.clamp_min(1e-300))


def origin(g: Graph, param_name: str) -> str:
    """The original layer weight a (possibly derived) parameter comes from."""
    return g.meta.setdefault("param_origin", {}).get(param_name, param_name)


def derive(g: Graph, new_param: str, from_param: str) -> None:
    g.meta.setdefault("param_origin", {})[new_param] = origin(g, from_param)


def derive_stacked(g: Graph, new_param: str, parts: list[tuple[str, int]]) -> None:
    """``new_param`` stacks params by rows: ``parts`` are (param it took rows from, how many rows),
    in order; each part keeps its original layer, so reports attribute the stacked bytes by rows."""
    g.meta.setdefault("param_parts", {})[new_param] = [[origin(g, p), rows] for p, rows in parts]


def replace_linear(g: Graph, old: Node, new: Value) -> None:
    """Reroute the readers of linear ``old`` to its compressed form ``new``, which inherits what
    earlier passes noted on ``old`` (the kv_cache pass's cache point: without it the decode program
    would cache full keys and values instead of the latent)."""
    new.node.meta = {**old.meta, **new.node.meta}
    g.replace_uses(old.output, new)


def record(g: Graph, weight_name: str, **info) -> None:
    """Merge what a pass did to a layer into ``graph.meta['compression'][original weight]``."""
    key = origin(g, weight_name)
    rec = g.meta.setdefault("compression", {}).setdefault(key, {})
    for k, v in info.items():
        if k == "rel_error" and "rel_error" in rec:  # errors of successive passes compound
            rec[k] = float(rec[k]) + float(v)
        else:
            rec[k] = v


def match_patterns(spec: str, option: str, pass_name: str) -> list[tuple[re.Pattern, str]]:
    """Parse ``"regex:value;regex:value"`` options (``;`` since ``,`` separates passes)."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        if ":" not in item:
            raise PipelineError(f"pass '{pass_name}': option '{option}' entries must be 'regex:value', got {item!r}")
        pat, val = item.rsplit(":", 1)
        try:
            out.append((re.compile(pat), val.strip()))
        except re.error as e:
            raise PipelineError(f"pass '{pass_name}': option '{option}' has a bad regex {pat!r}: {e}") from None
    return out


def layer_names(g: Graph, limit: int = 8) -> str:
    """Some linear weight names of ``g``, for messages about patterns that match none."""
    names = [n.inputs[1].name for n in g.nodes if n.op == "linear" and n.inputs[1] is not None
             and n.inputs[1].kind == "param"]
    return (", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")) or "none"


def require_match(g: Graph, patterns: Sequence[re.Pattern], names: Sequence[str], option: str, pass_name: str) -> None:
    """A pattern that matches none of ``names`` is a typo (``fc_1`` for ``fc1``) that would
    silently leave every layer as it was: refuse it, naming the pattern and some layers."""
    for p in patterns:
        if not any(p.search(n) for n in names):
            raise PipelineError(f"pass '{pass_name}': option '{option}' pattern {p.pattern!r} matches no layer; "
                                f"layers: {layer_names(g)}")


def option_pattern(g: Optional[Graph], option: str, pattern: str, pass_name: str) -> Optional[re.Pattern]:
    """The compiled regex of a layer-selection option (None when empty). It must compile, and with
    ``g`` it must match some parameter of ``g``."""
    if not pattern:
        return None
    try:
        pat = re.compile(pattern)
    except re.error as e:
        raise PipelineError(f"pass '{pass_name}': option '{option}' has a bad regex {pattern!r}: {e}") from None
    if g is not None:
        require_match(g, [pat], list(g.params), option, pass_name)
    return pat


def skip_pattern(g: Graph, skip: str, pass_name: str) -> Optional[re.Pattern]:
    """The compiled ``skip=`` regex (None when empty); it must compile and match some parameter."""
    return option_pattern(g, "skip", skip, pass_name)


def greedy_allocate(options: list[list[tuple[int, float]]], budget: float) -> list[int]:
    """Choose one option per layer, options sorted by decreasing cost (option 0 = uncompressed,
    error 0), so that total cost <= budget while the summed error grows as little as possible:
    repeatedly take the step with the smallest error increase per unit of cost saved."""
    choice = [0] * len(options)
    total = sum(o[0][0] for o in options)
    heap = []

    def push(i):
        j = choice[i]
        if j + 1 < len(options[i]):
            (c0, e0), (c1, e1) = options[i][j], options[i][j + 1]
            saved = max(c0 - c1, 1e-12)
            heapq.heappush(heap, ((e1 - e0) / saved, i, j))

    for i in range(len(options)):
        push(i)
    while total > budget and heap:
        _, i, j = heapq.heappop(heap)
        if choice[i] != j:
            continue
        total -= options[i][j][0] - options[i][j + 1][0]
        choice[i] = j + 1
        push(i)
    return choice


def model_sensitivity(g: Graph, ctx, trials: Sequence[tuple[str, torch.Tensor]], max_samples: int = 4) -> list[float]:
    """End-to-end sensitivity: for each (weight name, replacement) trial, the relative squared
    change of the model's outputs on a few calibration samples when only that weight is replaced."""
    from ..ir.interpret import ReferenceRuntime
    samples = normalize_samples(getattr(ctx, "calibration", None))[:max_samples]
    rt = ReferenceRuntime(g)
    base = [rt.run(*s) for s in samples]
    out = []
    for name, w in trials:
        num = den = 0.0
        for s, ref in zip(samples, base):
            got = rt.run(*s, overrides={name: w})
            for a, b in zip(got, ref):
                if b.is_floating_point():
                    num += float(((a.double() - b.double()) ** 2).sum())
                    den += float((b.double() ** 2).sum())
        out.append(num / max(den, 1e-300))
    return out
