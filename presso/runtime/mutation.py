"""In-place updates of a model's inputs (``x.add_(1)``, batch norm's running statistics in
training mode). presso's graphs are functional: the frontend returns each updated input as an extra
graph output and lists it in ``graph.meta["input_mutations"]``; the caller's tensor is updated here,
after the run, as eager torch would have, and the extra outputs are dropped."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch


def apply_input_mutations(meta: Mapping, inputs: Sequence[torch.Tensor], outs: list) -> list:
    mutations = meta.get("input_mutations")
    if not mutations:
        return outs
    with torch.no_grad():
        for out_index, in_index in mutations:
            inputs[in_index].copy_(outs[out_index])
    first = min(o for o, _ in mutations)
    return list(outs[:first])
