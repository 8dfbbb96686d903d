"""Typed errors. Every error a user can trigger derives from PressoError and names what is at fault."""


class PressoError(Exception):
    """Base class of all presso errors."""


class UnsupportedOpError(PressoError):
    """A frontend met an op it cannot lower. Names the op, the node, where it came from, and what is supported."""

    def __init__(self, op: str, node: str, location: str, supported, reason: str = ""):
        self.op, self.node, self.location = op, node, location
        self.supported = sorted(supported)
        self.reason = reason
        super().__init__(
            f"unsupported op '{op}' at node '{node}' ({location})" + (f": {reason}" if reason else "")
            + f"\nsupported ops: {', '.join(self.supported)}"
        )


class FrontendError(PressoError):
    """The model could not be imported (untraceable module, malformed ONNX file, ...)."""


class IRError(PressoError):
    """Malformed IR built through the API (unknown op, wrong operand count, bad attribute)."""


class VerificationError(IRError):
    """The verifier rejected a graph; the message names the node and the broken rule."""


class IRParseError(IRError):
    """The IR text could not be parsed; the message carries the line and column."""

    def __init__(self, msg: str, line: int, col: int, text_line: str = ""):
        self.line, self.col = line, col
        where = f"line {line}, col {col}"
        start = max(col - 61, 0)          # a long line is shown as the 120 characters around col
        shown = text_line[start:start + 120]
        caret = f"\n  {shown}\n  {' ' * max(col - 1 - start, 0)}^" if text_line else ""
        super().__init__(f"{where}: {msg}{caret}")


class PipelineError(PressoError, ValueError):
    """Unknown pass, unknown or badly typed option, or malformed pipeline text."""


class PassCheckError(PressoError):
    """check='numeric' found a pass that changed the outputs beyond tolerance."""


class InputError(PressoError, ValueError):
    """Wrong number, shape or dtype of inputs given to a compiled model."""


class CodegenError(PressoError):
    """A target cannot compile the graph (an op without a lowering, a failing backend compiler);
    names the node and op at fault."""


class TargetUnavailableError(PressoError):
    """The machine cannot run the requested target (no GPU for ``cuda``, aarch64 code on x86);
    ``target`` names it (None for a device rather than a target) and the message says why."""

    def __init__(self, msg: str, target: str | None = None):
        self.target = target
        super().__init__(msg)


class UnknownTargetError(PressoError, ValueError):
    """A target name that is not registered (``presso.targets.REGISTRY``); lists the registered ones."""


class CacheError(PressoError):
    """presso's on-disk cache (``$PRESSO_CACHE_DIR``, default ``~/.cache/presso``: generated kernels,
    tuned launch configs) cannot be used: the path is a file, or the folder is not writable."""


class ArtifactError(PressoError):
    """A saved artifact is missing, damaged, of another format version or for a target this machine
    cannot run, or a save cannot be done without risking other data."""


class ArtifactAuthError(ArtifactError):
    """A keyed artifact does not authenticate: it was loaded without its key or with another key,
    or its manifest was changed after it was signed; or a key was given for an unsigned artifact."""


class ArtifactPathError(ArtifactError):
    """A manifest names a file that is not a regular file inside the artifact folder (``..``, an
    absolute path, a symlink). The message never says whether the named outside file exists."""


class UntrustedCodeError(ArtifactError):
    """An artifact holds native code (``code/model.so``) but is not authenticated by a key and the
    caller did not pass ``trust_code=True``; loading the library would run code from the file."""


class DimRangeError(FrontendError):
    """torch.export proved that a dynamic dim cannot take the whole range asked for (a sequence
    dim sliced from a fixed position table, say); names the dim, the range asked and the limit."""

    def __init__(self, dim: str, requested: int, limit: int, model: str):
        self.dim, self.requested, self.limit = dim, requested, limit
        super().__init__(f"{model}: dynamic dim '{dim}' was asked to reach {requested}, but the model supports "
                         f"{dim} <= {limit} only")


class MaxLenError(PressoError, ValueError):
    """``max_len`` (of ``compile(generation=True)`` or ``generate``) is beyond what the model or the
    compiled program supports; gives the limit."""

    def __init__(self, msg: str, max_len: int, limit: int):
        self.max_len, self.limit = max_len, limit
        super().__init__(msg)


class MissingDependencyError(PressoError, ImportError):
    """An optional package a path needs is not installed; names the package and the extra that
    installs it (``pip install 'presso[tvm]'``)."""
