"""Sequential (layer-wise) calibration, as GPTQ and llm-compressor's sequential pipeline do it:
each layer is calibrated on the outputs of the layers before it *as compressed*, so the errors of
earlier layers are seen, and compensated, by later ones.

The graph runs node-major over the calibration set: every node runs on every sample before the
next node does, and each sample keeps only the values that later nodes still read. When the walk
reaches the first target linear reading an activation ``x``, the statistics of ``x`` over all
samples are taken (one Gram matrix for all the linears sharing ``x``: q/k/v, gate/up) and
``compress(x, nodes, stats)`` rewrites those linears in place (new nodes before them, their readers
rerouted). The walk then runs the nodes it inserted, so everything downstream sees the compressed
outputs. One pass over the data; peak memory is one layer's activations for the calibration set
plus one Gram matrix, never statistics for the whole model.

With ``reference=True`` the uncompressed model runs alongside (a copy of the graph, advanced lazily
to each group's input), and each group's statistics also hold the uncompressed input's and the
cross Gram, so a method can fit the compressed layer to the *uncompressed* layer's outputs
(SVD-LLM's parameter update) instead of to the compressed inputs' image under the old weight."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from ..errors import InputError
from ..ir.graph import Graph, Node, Value
from ..ir.interpret import bind_inputs, bind_results
from ..ir.registry import get_op
from .calibrate import CalibrationError, LinearStats


def input_stats(xs: Iterable[torch.Tensor]) -> LinearStats:
    """Gram matrix (float32 products per sample, summed in float64), max and sum of |x| per channel."""
    gram = amax = abs_sum = None
    rows = 0
    for x in xs:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise CalibrationError("calibration activations hold NaN or Inf: check the calibration samples")
        g = (x.T @ x).double()
        if not torch.isfinite(g).all():
            raise CalibrationError("calibration activations are too large: their Gram matrix overflows float32")
        a, s = x.abs().amax(0).double(), x.abs().sum(0).double()
        gram, amax, abs_sum = (g, a, s) if gram is None else (gram + g, torch.maximum(amax, a), abs_sum + s)
        rows += x.shape[0]
    return LinearStats(gram, rows, amax, abs_sum)


def calibrate_sequentially(g: Graph, samples: Sequence[tuple], targets: Iterable[Node],
                           compress: Callable[[Value, list[Node], LinearStats], None],
                           progress: bool = False, desc: str = "calibrating", reference: bool = False) -> None:
    """Walk ``g`` over ``samples`` node-major, calling ``compress`` at each group of ``targets``
    sharing an input (see the module docstring). ``compress`` must leave the replaced linears
    without readers; they are skipped and left for dead-code elimination. Where it changes how an
    already computed value is produced (a scale folded into the norm feeding the group), it
    returns ``{value: f}``, and every sample's copy of that value becomes ``f(value)``."""
    targets = list(targets)
    pending = {id(n) for n in targets}
    total = len(pending)
    ref = _Reference(g, samples, targets) if reference else None
    envs, bindings = [], []
    for i, s in enumerate(samples):
        try:
            bindings.append(bind_inputs(g, s))
        except InputError as e:
            raise CalibrationError(f"calibration sample {i} does not fit the model: {e} (compile with "
                                   "dynamic_shapes=... to calibrate on other shapes)") from None
        envs.append({v: t for v, t in zip(g.inputs, s)})
    bar = None
    if progress:
        from .progress import progress as progress_bar
        bar = progress_bar(enabled=True, total=total, desc=desc, unit="layer")
    outputs = set(g.outputs)
    users = g.users()
    needed = _ancestors(g, pending)
    done: set[int] = set()
    i = 0
    with torch.no_grad():
        while i < len(g.nodes):
            n = g.nodes[i]
            if id(n) in pending:
                x = n.inputs[0]
                group = [m for m in g.nodes[i:] if id(m) in pending and m.inputs[0] is x]
                try:
                    stats = input_stats(env[x] for env in envs)
                    if ref is not None:
                        stats.reference, stats.cross = ref.stats(x, [env[x] for env in envs])
                except CalibrationError as e:
                    raise CalibrationError(f"layer %{n.name} (weight %{n.inputs[1].name}): {e}") from None
                pending.difference_update(id(m) for m in group)
                for v, f in (compress(x, group, stats) or {}).items():
                    for env in envs:
                        if v in env:
                            env[v] = f(env[v])
                if bar is not None:
                    bar.update(len(group))
                    bar.set_postfix_str(group[-1].name)
                users = g.users()
                needed = _ancestors(g, pending)
                continue            # compress inserted nodes before n: run those next
            _step(g, n, envs, bindings, needed, done, users, outputs)
            i += 1
    if bar is not None:
        bar.close()


def cross_gram(refs: Iterable[torch.Tensor], xs: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum over rows of x_ref x^T (float32 products per sample, summed in float64)."""
    out = None
    for r, x in zip(refs, xs):
        r, x = r.detach().reshape(-1, r.shape[-1]).float(), x.detach().reshape(-1, x.shape[-1]).float()
        c = (r.T @ x).double()
        out = c if out is None else out + c
    return out


class _Reference:
    """The uncompressed model beside the walk: a copy of ``g`` taken before any rewrite, run
    node-major up to each requested value and freeing what no later node reads."""

    def __init__(self, g: Graph, samples: Sequence[tuple], targets: list):
        self.g = g.copy()
        self.by_name = {v.name: v for v in self.g.values()}
        self.bindings = [bind_inputs(self.g, s) for s in samples]
        self.envs = [dict(zip(self.g.inputs, s)) for s in samples]
        names = {n.name for n in targets}
        self.needed = _ancestors(self.g, {id(n) for n in self.g.nodes if n.name in names})
        self.keep = {n.inputs[0] for n in self.g.nodes if n.name in names}   # not freed before they are read
        self.users, self.outputs = self.g.users(), set(self.g.outputs)
        self.done: set[int] = set()
        self.i = 0

    def stats(self, x: Value, xs: list) -> tuple[LinearStats, torch.Tensor]:
        """The uncompressed input's statistics and the cross Gram with the compressed ``xs``."""
        v = self.by_name.get(x.name)
        if v is None:
            raise CalibrationError(f"reference calibration: %{x.name} is not a value of the uncompressed model")
        kept = self.outputs | self.keep
        while v not in self.envs[0] and self.i < len(self.g.nodes):
            _step(self.g, self.g.nodes[self.i], self.envs, self.bindings, self.needed, self.done, self.users, kept)
            self.i += 1
        refs = [env[v] for env in self.envs]
        self.keep.discard(v)
        return input_stats(refs), cross_gram(refs, xs)


def _ancestors(g: Graph, pending: set) -> set:
    """Ids of the nodes some pending target depends on: only those run (the head after the last
    compressed layer, say, is never computed for calibration)."""
    need, frontier = set(), [n for n in g.nodes if id(n) in pending]
    while frontier:
        n = frontier.pop()
        if id(n) in need:
            continue
        need.add(id(n))
        frontier.extend(v.node for v in n.inputs if v is not None and v.node is not None)
    return need


def _step(g: Graph, n: Node, envs: list, bindings: list, needed: set, done: set, users: dict, kept) -> None:
    """Advance the walk past ``n``: run it on every sample if a pending target depends on it and its
    result is read, then free each input that no node still to run reads (except those in ``kept``)."""
    if id(n) in needed and any(users.get(v) or v in kept for v in n.outputs):
        _run_node(g, n, envs, bindings)
    done.add(id(n))
    for v in n.inputs:
        if v is not None and v.kind == "node" and v not in kept and all(id(u) in done for u in users.get(v, ())):
            for env in envs:
                env.pop(v, None)


def _run_node(g: Graph, n: Node, envs: list, bindings: list) -> None:
    opdef = get_op(n.op)
    if opdef.category != "random" and all(v is None or v.kind == "param" for v in n.inputs):
        # a weight producer (dequantize, densify_nm): the same for every sample, computed once
        outs = opdef.run([None if v is None else g.params[v.name].data for v in n.inputs], n.attrs, bindings[0])
        for env in envs:
            env.update(zip(n.outputs, outs))
        return
    for env, b in zip(envs, bindings):
        ins = [None if v is None else (g.params[v.name].data if v.kind == "param" else env[v]) for v in n.inputs]
        outs = opdef.run(ins, n.attrs, b)
        if opdef.dynamic_shape:
            bind_results(n.outputs, outs, b)
        for v, t in zip(n.outputs, outs):
            env[v] = t
