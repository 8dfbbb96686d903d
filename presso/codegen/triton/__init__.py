"""Triton codegen for the ``cuda`` target. With ``TRITON_INTERPRET=1`` every kernel runs on CPU
tensors through Triton's interpreter (slow, exact): that is how CI checks them.

* ``linear.py``: int4 / int8 group-wise and N:M sparse linears reading the packed storage;
* ``elementwise.py``: kernels generated from ``fused_elementwise`` regions (``fuse`` pass);
* ``norm.py``: RMSNorm / LayerNorm rows;
* ``program.py``: a graph -> a list of launches (the ``cuda`` target's executable).
"""
from .linear import int4_linear, int8_linear, nm_linear

__all__ = ["int4_linear", "int8_linear", "nm_linear"]
