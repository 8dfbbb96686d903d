from .torch_frontend import from_torch

__all__ = ["from_torch", "from_onnx"]


def __getattr__(name):
    if name == "from_onnx":       # the ONNX frontend imports onnx: only on first use
        from .onnx_frontend import from_onnx
        return from_onnx
    raise AttributeError(f"module 'presso.frontend' has no attribute {name!r}")
