"""Loss sensitivity of layer outputs: the diagonal Fisher information of chosen nodes' outputs.

A compression pass that spends a budget across layers (lowrank's ranks) needs to know how much
an error in each layer's output costs at the model's *end*, not only how large the error is in
that layer: an equal relative error in an early q_proj and a late down_proj moves the loss by
very different amounts. To second order, the loss change of a perturbation ``dy`` of a layer's
output is ``1/2 dy^T F dy`` with ``F`` the Fisher information of that output; its diagonal
``F_j = sum over tokens of (d log p(label) / d y_j)^2`` is what this module measures.

The graph's first output is read as logits over its last dimension, and the labels are sampled
from the model's own predictive distribution (the true Fisher, so no ground-truth labels are
needed and any classifier or language-model head qualifies). The graph runs on presso's reference
op implementations with autograd on: one forward and one backward pass per calibration sample.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..ir.graph import Graph, Node
from ..ir.interpret import bind_inputs, bind_results
from ..ir.registry import get_op
from .calibrate import CalibrationError


def sample_labels(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One label per row of ``probs`` [N, V], by inverse CDF (torch.multinomial is several times
    slower over a 49k-token vocabulary)."""
    u = torch.rand(probs.shape[0], 1, generator=gen, dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(probs.shape[-1] - 1)[:, 0]


def score(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """d log p(label) / d logits = onehot(label) - softmax(logits), labels sampled from the softmax:
    the gradient the backward pass starts from (no autograd through the softmax)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    grad = -torch.softmax(flat, -1)
    labels = sample_labels(-grad, gen)
    grad[torch.arange(flat.shape[0]), labels] += 1
    return grad.reshape(logits.shape).to(logits.dtype)


def output_fisher(g: Graph, samples: Sequence[tuple], nodes: Iterable[Node], seed: int = 0) -> dict[str, torch.Tensor]:
    """Per node name: the diagonal Fisher of its first output over the last dimension (float64,
    summed over every token of ``samples``), from labels sampled off the graph's first output."""
    nodes = list(nodes)
    names = {id(n): n.name for n in nodes}
    out = g.outputs[0]
    if not out.type.dtype.is_float or out.type.rank < 2:
        raise CalibrationError(f"Fisher sensitivity reads the graph's first output %{out.name} as logits over its "
                               f"last dim, but it is {out.type}")
    fisher: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    opdefs = [get_op(n.op) for n in g.nodes]
    for s in samples:
        bindings = bind_inputs(g, s)
        env = dict(zip(g.inputs, s))
        taps = []
        with torch.enable_grad():
            for n, opdef in zip(g.nodes, opdefs):
                ins = [None if v is None else (g.params[v.name].data if v.kind == "param" else env[v]) for v in n.inputs]
                outs = opdef.run(ins, n.attrs, bindings)
                if opdef.dynamic_shape:
                    bind_results(n.outputs, outs, bindings)
                if id(n) in names:
                    t = outs[0]
                    if t.requires_grad:         # downstream of an earlier tap: keep the path to it
                        t.retain_grad()
                    else:                       # upstream of every tap: a leaf
                        t = t.detach().requires_grad_(True)
                        outs = [t, *outs[1:]]
                    taps.append((names[id(n)], t))
                env.update(zip(n.outputs, outs))
            logits = env[out]
            logits.backward(score(logits.detach(), gen))
        for name, t in taps:
            if t.grad is None:
                raise CalibrationError(f"node %{name}: its output does not reach the graph's output %{out.name}")
            sq = t.grad.double().pow(2).reshape(-1, t.shape[-1]).sum(0)
            fisher[name] = sq if name not in fisher else fisher[name] + sq
        del env, taps
    return fisher
