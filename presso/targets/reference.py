"""The ``reference`` target: the graph runs on the ops' torch reference implementations
(``ReferenceRuntime``), on the CPU or any torch device; nothing is compiled."""
from __future__ import annotations

from ..ir.interpret import ReferenceRuntime
from .base import Target


class ReferenceTarget(Target):
    name = "reference"
    supports_generation = True

    def runtime(self, graph, code, device="cpu"):
        return ReferenceRuntime(graph, device)
