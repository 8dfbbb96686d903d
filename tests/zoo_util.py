"""Shared helpers for zoo tests: ONNX export of a zoo model, and tolerant comparison."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch


def export_onnx(module, inputs, dynamic_shapes=None):
    """The model's own torch.onnx.export (dynamo exporter), quietly."""
    buf = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, tuple(inputs), dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes)
    return prog.model_proto


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_ort(proto, inputs):
    import onnxruntime as ort
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]
