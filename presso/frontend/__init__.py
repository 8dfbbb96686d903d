from .torch_frontend import from_torch
from .onnx_frontend import from_onnx

__all__ = ["from_torch", "from_onnx"]
