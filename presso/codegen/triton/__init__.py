"""Triton kernels for presso's compressed ops. With ``TRITON_INTERPRET=1`` they run on CPU tensors
through Triton's interpreter (slow, exact): that is how CI checks every kernel."""
from .linear import int4_linear, nm_linear

__all__ = ["int4_linear", "nm_linear"]
