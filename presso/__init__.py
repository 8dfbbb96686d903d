"""presso: a compiler for compressed neural networks.

``import presso`` loads torch and presso's own modules only; ONNX, TVM, Triton and transformers
are imported by the paths that use them (``from_onnx``, ``target="llvm"``, ``target="cuda"``,
Hugging Face models), so a torch-only user never pays for them."""
from .version import __version__
from .api import CompiledModel, compile, import_model, load
from .errors import (FrontendError, InputError, IRError, IRParseError, PassCheckError, PipelineError, PressoError,
                     UnsupportedOpError, VerificationError)
from .frontend import from_torch
from .ir import DType, Graph, TensorType, parse

__all__ = ["compile", "load", "CompiledModel", "import_model", "from_torch", "from_onnx", "parse", "Graph", "TensorType",
           "DType", "PressoError", "UnsupportedOpError", "FrontendError", "IRError", "IRParseError",
           "VerificationError", "PipelineError", "PassCheckError", "InputError", "__version__"]


def __getattr__(name):
    if name == "from_onnx":       # imports onnx (a large part of import torch's time)
        from .deps import require
        require("onnx", "onnx", "presso.from_onnx", load=False)
        from .frontend.onnx_frontend import from_onnx
        return from_onnx
    raise AttributeError(f"module 'presso' has no attribute {name!r}")
