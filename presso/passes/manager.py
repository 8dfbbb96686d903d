"""The pass manager: pipelines as text or lists of passes (registered in ``registry.py``),
the verifier after every pass, optional numeric checking against the reference runtime, timing,
and IR printing after chosen passes.

Pipeline text: ``"canonicalize,lowrank{ratio=0.5},quantize{weights=int4,group_size=128}"``.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..errors import PassCheckError, PipelineError
from ..ir.graph import Graph
from ..ir.interpret import run_graph
from ..ir.verify import verify
from .registry import Option, PassInfo, register_pass, registered_pass, registered_passes  # noqa: F401 (re-exported)


@dataclass
class PassSpec:
    name: str
    options: dict = field(default_factory=dict)

    def __str__(self):
        """Pipeline text; options at their default value are left out."""
        info = registered_pass(self.name)
        shown = {k: v for k, v in self.options.items() if info is None or k not in info.options
                 or info.options[k].default != v}
        if not shown:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_fmt(v)}" for k, v in shown.items()) + "}"


def _fmt(v):
    return str(v).lower() if isinstance(v, bool) else str(v)


_ITEM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_\-]*)\s*(\{([^{}]*)\})?\s*(,|$)")


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse ``"a,b{k=v,k2=v2}"`` (syntax only; options are checked by ``resolve``)."""
    if not isinstance(text, str):
        raise PipelineError(f"pipeline text must be a string, got {type(text).__name__}")
    specs, pos = [], 0
    text = text.strip()
    if not text:
        return []
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"malformed pipeline at column {pos + 1}: {text[pos:pos + 30]!r}; "
                                "expected name or name{key=value,...}, separated by commas")
        opts = {}
        if m.group(3) is not None and m.group(3).strip():
            for kv in m.group(3).split(","):
                if "=" not in kv:
                    raise PipelineError(f"malformed option {kv.strip()!r} in pass '{m.group(1)}': expected key=value")
                k, v = kv.split("=", 1)
                opts[k.strip()] = v.strip()
        specs.append(PassSpec(m.group(1), opts))
        pos = m.end()
        if m.group(4) == "," and pos >= len(text):
            raise PipelineError("malformed pipeline: trailing comma")
    return specs


def resolve(pipeline: Union[str, Sequence]) -> list[PassSpec]:
    """Turn text or a list (names, (name, options) pairs, PassSpecs) into checked PassSpecs."""
    if isinstance(pipeline, str):
        raw = parse_pipeline(pipeline)
    elif not isinstance(pipeline, (list, tuple)):
        raise PipelineError(f"a recipe is pipeline text such as 'lowrank{{ratio=0.5}},dce' or a list of passes, "
                            f"got {type(pipeline).__name__} {pipeline!r:.60}")
    else:
        raw = []
        for item in pipeline:
            if isinstance(item, PassSpec):
                raw.append(item)
            elif isinstance(item, str):
                raw.extend(parse_pipeline(item))
            elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict):
                raw.append(PassSpec(item[0], dict(item[1])))
            else:
                raise PipelineError(f"pipeline entries must be names, (name, options) pairs or PassSpecs, got {item!r}")
    passes = registered_passes()
    out = []
    for spec in raw:
        info = passes.get(spec.name)
        if info is None:
            raise PipelineError(f"unknown pass '{spec.name}'; registered passes: {', '.join(sorted(passes))}")
        unknown = set(spec.options) - set(info.options)
        if unknown:
            raise PipelineError(f"pass '{spec.name}' has no option(s) {sorted(unknown)}; "
                                f"options: {', '.join(sorted(info.options)) or 'none'}")
        opts = {k: o.default for k, o in info.options.items()}
        for k, v in spec.options.items():
            opts[k] = info.options[k].convert(spec.name, k, v)
        out.append(PassSpec(spec.name, opts))
    return out


@dataclass
class PassContext:
    """What passes may read: example inputs, calibration samples, and a place to report."""
    example_inputs: Optional[Sequence[torch.Tensor]] = None
    calibration: Optional[Sequence] = None
    progress: bool = True          # progress bars on long loops (see passes/progress.py)
    log: dict = field(default_factory=dict)


@dataclass
class PassRecord:
    name: str
    spec: str
    seconds: float
    ops_before: int
    ops_after: int
    max_abs_err: Optional[float] = None
    max_rel_err: Optional[float] = None


def _compare(before: list, after: list) -> tuple[float, float]:
    abs_err, rel_err = 0.0, 0.0
    for a, b in zip(before, after):
        if a.shape != b.shape:
            return float("inf"), float("inf")
        if not a.is_floating_point():
            e = float((a != b).any())
            abs_err, rel_err = max(abs_err, e), max(rel_err, e)
            continue
        d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        scale = a.double().abs().max().item() if a.numel() else 0.0
        abs_err = max(abs_err, d)
        rel_err = max(rel_err, d / scale if scale > 0 else d)
    return abs_err, rel_err


def run_pipeline(g: Graph, pipeline, ctx: Optional[PassContext] = None, check: Optional[str] = None,
                 rtol: float = 1e-4, print_ir_after=None, stream=None) -> tuple[Graph, list[PassRecord]]:
    """Run passes in order on a copy of ``g``. Verifies after each pass. With ``check="numeric"``
    runs the reference before/after each pass on ``ctx.example_inputs`` and raises
    PassCheckError at the first non-lossy pass whose outputs move by more than ``rtol``
    (relative to the largest output magnitude)."""
    if check not in (None, "numeric"):
        raise PipelineError(f"check must be None or 'numeric', got {check!r}")
    specs = resolve(pipeline)
    ctx = ctx or PassContext()
    if check and ctx.example_inputs is None:
        raise PipelineError("check='numeric' needs example inputs")
    names_to_print = _print_set(print_ir_after, specs)
    stream = stream or sys.stdout
    passes = registered_passes()
    g = g.copy()
    records = []
    reference = run_graph(g, *ctx.example_inputs) if check else None
    bar = None
    if ctx.progress and len(specs) > 1:
        from .progress import progress
        bar = progress(enabled=True, total=len(specs), desc="passes", unit="pass")
    for spec in specs:
        if bar is not None:
            bar.set_postfix_str(spec.name)
        info = passes[spec.name]
        n_before = len(g.nodes)
        if info.lossy:  # the size the compression ratio is measured against
            g.meta.setdefault("uncompressed_bytes", g.param_bytes())
        t0 = time.perf_counter()
        out = info.fn(g, ctx, **spec.options)
        g = out if out is not None else g
        dt = time.perf_counter() - t0
        verify(g)
        rec = PassRecord(spec.name, str(spec), dt, n_before, len(g.nodes))
        if check:
            now = run_graph(g, *ctx.example_inputs)
            rec.max_abs_err, rec.max_rel_err = _compare(reference, now)
            if rec.max_rel_err > rtol and not info.lossy:
                raise PassCheckError(f"pass '{spec}' changed the outputs: max abs err {rec.max_abs_err:.3g}, "
                                     f"max rel err {rec.max_rel_err:.3g} > rtol {rtol:g}")
            reference = now if info.lossy else reference
        records.append(rec)
        if bar is not None:
            bar.update(1)
        if spec.name in names_to_print or "*" in names_to_print:
            print(f"// ----- IR after {spec} -----", file=stream)
            print(g, file=stream)
    if bar is not None:
        bar.close()
    return g, records


def _print_set(print_ir_after, specs) -> set:
    if print_ir_after is None:
        return set()
    if print_ir_after in ("all", "*", True):
        return {"*"}
    names = {print_ir_after} if isinstance(print_ir_after, str) else set(print_ir_after)
    unknown = names - {s.name for s in specs}
    if unknown:
        raise PipelineError(f"print_ir_after names pass(es) not in the pipeline: {sorted(unknown)}; "
                            f"pipeline: {', '.join(s.name for s in specs)}")
    return names
