"""CPU schedules for the kernels presso's lowering produces.

TVM's default CPU pipeline leaves every loop nest serial and scalar. After Relax fuses operators
into TIR functions, each one gets a schedule here:

* ``presso_matmul`` kernels (every linear, dense or compressed): a parallel loop over column
  tiles, the tile's weights decoded once into a local buffer, rows in blocks of ``ROWS`` with a
  register accumulator, the tile's columns as one vector;
* other reductions and GEMV-like functions: TVM's dlight CPU rules;
* everything else (elementwise, layout, fused epilogues): outer loops fused and parallel, the
  innermost loop vectorized.
"""
from __future__ import annotations

ROWS = 4     # rows x VECTOR columns of accumulators (4 x 2 AVX2 registers); on the 2-core Zen 3
VECTOR = 16  # 4x16 and 6x16 (with row blocks that divide the rows) measure the same


def _row_block(extent) -> int:
    """ROWS, or a smaller block that divides a static row count (a remainder check inside the
    unrolled row loop stops LLVM from vectorizing it)."""
    n = _static(extent)
    if n is None or n % ROWS == 0:
        return ROWS
    return next(r for r in range(ROWS, 0, -1) if n % r == 0)


def cpu_pipeline(target, tune: bool = True):
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            passes = cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
            if tune:
                passes.append(schedule_pass())
            passes += cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
            mod = tvm.transform.Sequential(passes)(mod)
        return mod

    return _pipeline


def schedule_pass():
    from tvm.s_tir import dlight as dl
    rules = [schedule_linear, schedule_matmul, schedule_token_quant, schedule_softmax, dl.cpu.GEMV(),
             dl.cpu.Reduction(), schedule_injective]
    return dl.ApplyDefaultSchedule(*[_guarded(r) for r in rules])


def _guarded(rule):
    """A rule that meets a function it cannot schedule declines (None) instead of failing the build:
    the next rule, or TVM's plain loops, take it."""
    from tvm.s_tir import dlight as dl
    apply = rule.apply if hasattr(rule, "apply") else rule

    def run(func, target, tunable):
        try:
            return apply(func, target, tunable)
        except Exception:  # noqa: BLE001 - a schedule primitive refused this function
            return None
    return dl.ScheduleRule.from_callable(getattr(rule, "__name__", type(rule).__name__))(run)


def _block(sch, name):
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - no such block in this function
        return None


def _static(extent) -> int | None:
    v = getattr(extent, "value", None)
    return int(v) if v is not None else None


def _inline_epilogues(sch, producer):
    """Inline every elementwise consumer chain of ``producer`` (a complete block) into it."""
    changed = True
    while changed:
        changed = False
        for c in sch.get_consumers(producer):
            try:
                sch.reverse_compute_inline(c)
                changed = True
                break
            except Exception:  # noqa: BLE001 - not inlinable: stays a separate loop nest
                continue


def _inline_intermediates(sch, keep):
    """Inline every injective block except ``keep`` and the function's outputs into its consumers,
    so what remains is kernel -> one output block (which then inlines into the write-back)."""
    from tvm.s_tir.dlight.analysis import get_root_block
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(get_root_block(sch))}
    for blk in list(_all_blocks(sch)):
        name = sch.get(blk).name_hint
        if name in keep or name in outputs:
            continue
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001 - not inlinable: stays a separate loop nest
            pass


def _all_blocks(sch):
    from tvm.s_tir.dlight.analysis import get_root_block
    root = get_root_block(sch)
    return sch.get_child_blocks(root)


def schedule_linear(func, target, tunable):
    """presso's packed linear kernels (``linear.py``): see the module docstring. Loop order: column
    tile (parallel), its VECTOR-wide sub-panel, then row blocks, so the sub-panel's K x VECTOR
    weights stay in L1 while every row block streams past it (measured on the 2-core Zen 3 with
    both cores: 1024x1536->384 138-172 GFLOP/s vs 82-97 with the row blocks outside the sub-panels
    and K blocked)."""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    mm = _block(sch, "presso_matmul")
    if mm is None:
        return None
    wtile = _block(sch, "presso_wtile")
    _inline_intermediates(sch, {"presso_matmul", "presso_wtile"})
    nj = _tile_width(sch, mm)
    *outer, i, j, k = sch.get_loops(mm)   # (fusing the leading dims would blur the write-back region)
    vec = min(nj, VECTOR)
    jo, jm, ji = sch.split(j, [None, nj // vec, vec])
    io, ii = sch.split(i, [None, _row_block(sch.get(i).extent)])
    sch.reorder(jo, jm, *outer, io, k, ii, ji)
    acc = sch.cache_write(mm, 0, "local")
    _inline_epilogues(sch, acc)
    sch.reverse_compute_at(acc, io)
    if wtile is not None:
        sch.compute_at(wtile, jo)
        sch.vectorize(sch.get_loops(wtile)[-1])
    sch.vectorize(ji)
    sch.unroll(ii)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.parallel(jo)
    sch.decompose_reduction(mm, k)
    return sch


def schedule_token_quant(func, target, tunable):
    """``quantize_per_token``: rows in parallel; per row the |x| max, the scale and the codes (the
    last vectorized), so each row is read twice from L1 instead of three passes over memory
    (measured 0.86 ms per 1024 x 384 call unscheduled by dlight's rules)."""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    codes, scale, red = _block(sch, "token_codes"), _block(sch, "token_scale"), _block(sch, "compute_red")
    if codes is None or scale is None or red is None:
        return None
    absb = _block(sch, "compute")
    if absb is not None:
        sch.compute_inline(absb)
    *rows, _one, _k = sch.get_loops(red)
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    sch.reverse_compute_at(scale, row)
    sch.reverse_compute_at(codes, row)
    col = sch.get_loops(codes)[-1]
    if (_static(sch.get(col).extent) or 0) % VECTOR == 0:
        sch.vectorize(sch.split(col, [None, VECTOR])[1])
    sch.parallel(row)
    return sch


def schedule_softmax(func, target, tunable):
    """Softmax (``lower.py``'s, blocks ``softmax_*``): max, exp, sum and normalize are row stages.
    All move under one parallel row loop (the row stays in L1 between them), single-use
    elementwise intermediates are inlined, and elementwise stages are vectorized along the row:
    [8, 12, 128, 128] 2.95 -> 1.73 ms on the 2-core Zen 3. (Layer norm measured slower this way
    than under dlight's rule, 0.63 -> 1.13 ms, so it is left to dlight.)"""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    blocks = list(_all_blocks(sch))
    kinds = [_iter_kinds(sch, b) for b in blocks]
    if not any(k and k[-1] == "R" and "R" not in k[:-1] for k in kinds) or len(blocks) > 10:
        return None
    first = next(b for b, k in zip(blocks, kinds) if k and k[-1] == "R")
    if not sch.get(first).name_hint.startswith("softmax"):
        return None
    rows = sch.get_loops(first)[:-1]
    if not rows:
        return None
    for b, k in zip(blocks, kinds):
        if b is first or "R" in k or len(sch.get_consumers(b)) != 1:
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001 - an output or a non-inlinable stage stays
            pass
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    after = False
    for b in list(_all_blocks(sch)):
        if sch.get(b).name_hint == sch.get(first).name_hint:
            after = True
            continue
        if after:
            sch.reverse_compute_at(b, row)
    for b in list(_all_blocks(sch)):
        if "R" in _iter_kinds(sch, b):
            continue
        inner = sch.get_loops(b)[-1]
        if (_static(sch.get(inner).extent) or 0) % VECTOR == 0:
            sch.vectorize(sch.split(inner, [None, VECTOR])[1])
    sch.parallel(row)
    return sch


def _iter_kinds(sch, blk) -> str:
    """'S'/'R' per block iter var (spatial / reduction)."""
    from tvm.tirx import IterVar
    return "".join("R" if iv.iter_type == IterVar.CommReduce else "S" for iv in sch.get(blk).iter_vars)


def _tile_width(sch, mm) -> int:
    """The column tile NJ: the innermost dim of the [rows/NJ, cols, NJ] weight the kernel reads."""
    for region in sch.get(mm).reads:
        buf = getattr(region, "buffer", None) or getattr(region, "source", None)
        if buf is not None and len(buf.shape) == 3 and ("tiled" in buf.name or "presso_wtile" in buf.name):
            return _static(buf.shape[-1])
    raise ValueError("presso_matmul reads no tiled weight")


def schedule_matmul(func, target, tunable):
    """Batched matmuls (attention scores and values): parallel over batch x row blocks, a register
    accumulator of ROWS x 16, the 16 columns vectorized."""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    mm = _block(sch, "matmul")
    if mm is None:
        return None
    loops = sch.get_loops(mm)
    *batch, i, j, k = loops
    ext = _static(sch.get(j).extent) or 0
    nj = next((w for w in (16, 8) if ext % w == 0), None)
    if nj is None:
        return None
    jo, ji = sch.split(j, [None, nj])
    io, ii = sch.split(i, [None, _row_block(sch.get(i).extent)])
    sch.reorder(*batch, io, jo, k, ii, ji)
    _inline_intermediates(sch, {"matmul"})
    acc = sch.cache_write(mm, 0, "local")
    _inline_epilogues(sch, acc)
    sch.reverse_compute_at(acc, jo)
    sch.vectorize(ji)
    sch.unroll(ii)
    outer = sch.fuse(*batch, io) if batch else io
    sch.parallel(outer)
    sch.decompose_reduction(mm, k)
    return sch


def schedule_injective(func, target, tunable):
    """Elementwise/layout functions: inline intermediates, parallel outer loops."""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    blocks = list(_all_blocks(sch))
    for blk in blocks[:-1]:
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001
            pass
    blocks = list(_all_blocks(sch))
    for blk in blocks:
        loops = sch.get_loops(blk)
        if not loops:
            continue
        if any(sch.get(lp).kind != 0 for lp in loops) or _has_reduction(sch, blk):
            return None
        outer = sch.fuse(*loops[:-1]) if len(loops) > 1 else loops[0]
        sch.parallel(outer)
    return sch


def _has_reduction(sch, blk):
    return any(iv.iter_type != 0 for iv in sch.get(blk).iter_vars)
