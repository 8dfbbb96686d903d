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


def assert_ragged_batch_decodes_as_alone(cm, ref, lengths=(3, 7, 12, 20), new: int = 6, vocab: int = 256):
    """Prompts of ``lengths`` decoded as one left-padded batch by ``cm`` give, for each prompt, the
    tokens ``cm`` gives it alone and the tokens the reference-target model ``ref`` gives the batch."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    got = cm.generate(prompts, max_new_tokens=new)
    want = ref.generate(prompts, max_new_tokens=new)
    alone = [cm.generate(p[None], max_new_tokens=new)[0] for p in prompts]
    for i, (a, b, c) in enumerate(zip(got, want, alone)):
        a, b, c = a.cpu(), b.cpu(), c.cpu()
        assert torch.equal(a, b) and torch.equal(a, c), f"prompt {i}: {a} vs reference {b} vs alone {c}"
