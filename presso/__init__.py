"""presso: a compiler for compressed neural networks."""
__version__ = "0.1.0"

from .api import CompiledModel, compile, import_model, load
from .errors import (FrontendError, InputError, IRError, IRParseError, PassCheckError, PipelineError, PressoError,
                     UnsupportedOpError, VerificationError)
from .frontend import from_onnx, from_torch
from .ir import DType, Graph, TensorType, parse

__all__ = ["compile", "load", "CompiledModel", "import_model", "from_torch", "from_onnx", "parse", "Graph", "TensorType",
           "DType", "PressoError", "UnsupportedOpError", "FrontendError", "IRError", "IRParseError",
           "VerificationError", "PipelineError", "PassCheckError", "InputError", "__version__"]
