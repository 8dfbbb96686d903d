"""``select_kernels{target=...}``: rewrite nodes into the target's ops (``<target>.<kernel>``), so
the kernel every node runs is part of the IR: printed (``print_ir_after="select_kernels"``),
verified, run by the reference runtime (each target op's reference is the composition it
replaces) and checked by ``check="numeric"``. The patterns belong to the target
(``Target.select_kernels``); a target adds this pass to its ``default_passes``."""
from __future__ import annotations

from ..targets import get_target, target_names
from .registry import Option, register_pass


@register_pass("select_kernels", options={
    "target": Option(str, "reference", check=lambda t: t in target_names(), allowed="a registered target",
                     help="whose kernels to select (a target's own default passes name it)")})
def select_kernels(graph, ctx, target):
    """The target's kernel choice, written into the graph."""
    return get_target(target).select_kernels(graph)
