"""Reading an ONNX file with the parts of the ``onnx`` package that reading needs, and no more.

``import onnx`` costs about as much as half of ``import torch``, most of it ``ml_dtypes`` (numpy
types for bfloat16, float8, int4), which ``onnx/__init__`` imports through ``onnx.helper`` whether
or not a model holds such a tensor. Reading a model needs only onnx's generated protobuf classes
(``onnx.onnx_ml_pb2``) and its C++ checker (``onnx.onnx_cpp2py_export``): this module loads those
two under their own names without running ``onnx/__init__``, and decodes tensors of the numpy-native
types itself. Everything else (text formats, external data, bfloat16 / float8 / int4 / string
tensors, constant folding, opset conversion) goes to the full ``onnx`` package, imported then.

The classes are onnx's own (a ``ModelProto`` read here *is* an ``onnx.ModelProto``), and a later
``import onnx`` finds both modules already loaded and reuses them.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

import numpy as np

_PROTOBUF_SUFFIXES = (".onnx", ".pb")   # what onnx.load reads as binary protobuf; others go to onnx
_MAX_PROTOBUF = 2 ** 31                  # onnx.checker.MAXIMUM_PROTOBUF: beyond it the checker wants a path


def _submodule(name: str) -> ModuleType:
    """``onnx.<name>`` loaded under its own name, without importing the ``onnx`` package itself."""
    full = f"onnx.{name}"
    if full in sys.modules:
        return sys.modules[full]
    if "onnx" in sys.modules:
        return importlib.import_module(full)
    package = importlib.util.find_spec("onnx")          # finds the package without running it
    spec = importlib.machinery.PathFinder.find_spec(full, package.submodule_search_locations)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[full]
        raise
    _BindOnImport.preloaded[name] = module
    _BindOnImport.install()
    return module


class _BindOnImport(importlib.abc.MetaPathFinder):
    """When ``onnx`` is imported after submodules were loaded here, set them as attributes of the
    package before its ``__init__`` runs, as an ordinary import of a submodule does (a submodule
    already in ``sys.modules`` is reused without being set on its package; code that spells
    ``onnx.onnx_ml_pb2.TensorProto`` needs the attribute)."""

    preloaded: dict[str, ModuleType] = {}

    @classmethod
    def install(cls) -> None:
        if not any(isinstance(f, cls) for f in sys.meta_path):
            sys.meta_path.insert(0, cls())

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "onnx":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("onnx")
        run_init = spec.loader.exec_module

        def exec_module(package):
            for name, module in self.preloaded.items():
                setattr(package, name, module)
            run_init(package)

        spec.loader.exec_module = exec_module
        return spec


def cpp() -> ModuleType:
    """``onnx.onnx_cpp2py_export``: the checker, the schemas and the version converter, in C++."""
    return _submodule("onnx_cpp2py_export")


def pb() -> ModuleType:
    """The module of onnx's protobuf classes (``ModelProto``, ``TensorProto``, ...)."""
    return _submodule("onnx_ml_pb2" if cpp().ONNX_ML else "onnx_pb2")


def full_onnx() -> ModuleType:
    import onnx
    return onnx


def read_model(source) -> object:
    """A ``ModelProto`` from bytes or a path, as ``onnx.load`` / ``onnx.load_from_string`` give it.

    Binary protobuf is parsed here; a text-format path, or a model whose tensors live in external
    data files, is read by ``onnx.load`` itself (it resolves those files next to the model; bytes
    have no place for them to be next to).
    """
    if isinstance(source, bytes):
        model = pb().ModelProto()
        model.ParseFromString(source)
        return model
    path = os.fspath(source)
    if not path.lower().endswith(_PROTOBUF_SUFFIXES):
        return full_onnx().load(path)
    with open(path, "rb") as f:
        data = f.read()
    model = pb().ModelProto()
    model.ParseFromString(data)
    return model if not _uses_external_data(model) else full_onnx().load(path)


def _tensors(graph):
    """Every TensorProto of a graph, its sub-graphs' included (where external data can hang)."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def _uses_external_data(model) -> bool:
    external = pb().TensorProto.EXTERNAL
    return any(t.HasField("data_location") and t.data_location == external for t in _tensors(model.graph))


def check_model(model) -> None:
    """``onnx.checker.check_model(model)``: the same C++ check, without importing ``onnx.checker``."""
    data = model.SerializeToString()
    if len(data) > _MAX_PROTOBUF:
        full_onnx().checker.check_model(model)
        return
    cpp().checker.check_model(data, False, False, False)


def opset_version() -> int:
    """``onnx.defs.onnx_opset_version()``: the newest default-domain opset this onnx knows."""
    return cpp().defs.schema_version_map()[""][1]


def dtype_name(elem_type: int) -> str:
    """``TensorProto.DataType.Name``: the name of an ONNX element type (ValueError if none)."""
    return pb().TensorProto.DataType.Name(elem_type)


# element type -> (numpy dtype, the repeated field that holds it when not in raw_data)
_NATIVE = {1: (np.float32, "float_data"), 2: (np.uint8, "int32_data"), 3: (np.int8, "int32_data"),
           4: (np.uint16, "int32_data"), 5: (np.int16, "int32_data"), 6: (np.int32, "int32_data"),
           7: (np.int64, "int64_data"), 9: (np.bool_, "int32_data"), 10: (np.float16, "int32_data"),
           11: (np.float64, "double_data"), 12: (np.uint32, "uint64_data"), 13: (np.uint64, "uint64_data")}
_BIT_PATTERNS = {np.float16: np.uint16, np.uint16: np.uint16, np.int16: np.uint16, np.bool_: np.uint8}


def to_array(tensor) -> np.ndarray:
    """``onnx.numpy_helper.to_array`` for the numpy-native element types; the rest (bfloat16, float8,
    int4, strings, complex, external or segmented data, a big-endian host) go to onnx itself."""
    kind = _NATIVE.get(tensor.data_type)
    if (kind is None or sys.byteorder == "big" or tensor.HasField("segment")
            or (tensor.HasField("data_location") and tensor.data_location == pb().TensorProto.EXTERNAL)):
        from onnx import numpy_helper
        return numpy_helper.to_array(tensor)
    dtype, field = kind
    dims = tuple(tensor.dims)
    if tensor.HasField("raw_data"):
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(dims)
    if dtype in _BIT_PATTERNS:      # 16- and 8-bit types are stored one per int32, as bit patterns
        bits = np.array(tensor.int32_data, dtype=np.int32).view(np.uint32).astype(_BIT_PATTERNS[dtype])
        return bits.reshape(dims).view(dtype)
    return np.array(getattr(tensor, field), dtype=dtype).reshape(dims)


def attribute_value(attr):
    """``onnx.helper.get_attribute_value``: the Python value of a node attribute."""
    if attr.ref_attr_name:
        raise ValueError(f"Cannot get value of reference attribute: {attr}")
    kinds = pb().AttributeProto
    scalar = {kinds.FLOAT: "f", kinds.INT: "i", kinds.STRING: "s", kinds.TENSOR: "t",
              kinds.SPARSE_TENSOR: "sparse_tensor", kinds.GRAPH: "g", kinds.TYPE_PROTO: "tp"}
    repeated = {kinds.FLOATS: "floats", kinds.INTS: "ints", kinds.STRINGS: "strings", kinds.TENSORS: "tensors",
                kinds.SPARSE_TENSORS: "sparse_tensors", kinds.GRAPHS: "graphs", kinds.TYPE_PROTOS: "type_protos"}
    if attr.type in scalar:
        return getattr(attr, scalar[attr.type])
    if attr.type in repeated:
        return list(getattr(attr, repeated[attr.type]))
    if attr.type == kinds.UNDEFINED:
        return None
    raise ValueError(f"Unsupported ONNX attribute: {attr}")
