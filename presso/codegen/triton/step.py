"""One launch of the ``cuda`` target's program: the node it is attached to, what it runs, what
it reads (and, for a step covering several nodes, what it produces)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ...ir.graph import Node


@dataclass
class Step:
    node: Node
    kernel: str                      # "triton:<name>" or "torch"
    run: Callable                    # (env lookups resolved by the runtime) -> list of tensors
    inputs: list                     # Values read
    # params the kernel reads in its own layout: (input positions, fn(those tensors) -> the
    # kernel's forms); the runtime applies it once, at load, and keeps only the result
    prepare: Optional[tuple[tuple[int, ...], Callable]] = None
    # the Values its run returns, when they are not ``node``'s outputs (a step covering several nodes)
    produces: Optional[list] = None
    # whether ``run`` takes the symbolic dims' sizes (``bindings=``): torch references, generated kernels
    takes_bindings: bool = False

    @property
    def outputs(self) -> list:
        return self.produces if self.produces is not None else self.node.outputs
