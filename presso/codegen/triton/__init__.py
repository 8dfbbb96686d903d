"""Triton codegen for the ``cuda`` target. With ``TRITON_INTERPRET=1`` every kernel runs on CPU
tensors through Triton's interpreter (slow, exact): that is how CI checks them.

* ``int4.py``: group-wise int4 linears (tiled layout repacked at load, split-K GEMV, tl.dot GEMM);
* ``linear.py``: N:M sparse and int8 linears reading the packed storage;
* ``elementwise.py``: kernels generated from ``fused_elementwise`` regions (``fuse`` pass);
* ``norm.py``: RMSNorm / LayerNorm rows;
* ``select.py``: kernel selection, patterns rewriting nodes into the ``cuda.*`` ops (``ir/cuda_ops.py``);
* ``program.py``: a selected graph -> a list of launches, one per node (the ``cuda`` target's executable).
"""
from .int4 import int4_linear
from .linear import int8_linear, nm_linear

__all__ = ["int4_linear", "int8_linear", "nm_linear"]
