"""quantize{smooth=alpha} (SmoothQuant) on a pre-norm Llama with planted activation outliers, the
way real LLMs have them: folding the per-channel ranges into the norms' weights lowers the W8A7
output error; it needs quantized activations and calibration data."""
import pytest
import torch

import presso
from presso import PipelineError
from presso.models import make_llama
from presso.passes.calibrate import CalibrationError


def llama_with_outliers():
    torch.manual_seed(0)
    model, example = make_llama(batch=4, seq=32)
    with torch.no_grad():
        for layer in model.layers:
            layer.input_layernorm.weight[:4] *= 30
            layer.post_attention_layernorm.weight[:4] *= 30
    calib = [(torch.randint(0, 256, (4, 32)),) for _ in range(4)]
    return model, example, calib


def rel_err(model, cm, ids):
    with torch.no_grad():
        ref = model(ids)
    ref = ref[0] if isinstance(ref, tuple) else ref
    return ((cm(ids) - ref).norm() / ref.norm()).item()


def test_smoothing_moves_outliers_into_the_weights_and_lowers_the_error():
    model, example, calib = llama_with_outliers()
    ids = torch.randint(0, 256, (4, 32))
    plain = presso.compile(model, example_inputs=example, recipe="quantize{weights=int8,activations=int7}",
                           calibration=calib)
    smooth = presso.compile(model, example_inputs=example, calibration=calib,
                            recipe="quantize{weights=int8,activations=int7,smooth=0.5}")
    folded = [n for n in smooth.graph.params if n.endswith(".smoothed")]
    assert len(folded) == 2 * len(model.layers) + 1      # both norms of every layer, the final norm (lm_head)
    assert rel_err(model, smooth, ids) < 0.5 * rel_err(model, plain, ids)
    # the llvm target runs the smoothed graph like the reference (up to one-code rounding flips of
    # the per-token activation codes from 1e-7 float differences upstream: rare and small)
    on_cpu = presso.compile(smooth.graph, example_inputs=example, target="llvm")
    ref = smooth(*example)
    diff = (on_cpu(*example) - ref).abs() / ref.abs().max()
    assert diff.max().item() < 2e-2 and (diff > 1e-5).float().mean().item() < 0.02


def test_smoothing_needs_quantized_activations_and_calibration():
    model, example, calib = llama_with_outliers()
    with pytest.raises(PipelineError, match="needs activations=int8 or int7"):
        presso.compile(model, example_inputs=example, recipe="quantize{weights=int8,smooth=0.5}", calibration=calib)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        presso.compile(model, example_inputs=example, recipe="quantize{weights=int8,activations=int7,smooth=0.5}")
