"""Calibration: run the reference runtime over sample inputs and stream, per linear layer, the
statistics compression passes need — the input Gram matrix X^T X (whitening, GPTQ Hessians, and
exact output-error estimates) and the per-channel squared norms (Wanda) — without holding any
activation after its layer has been seen."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from ..errors import PressoError
from ..ir.graph import Graph, Node


class CalibrationError(PressoError, ValueError):
    """Calibration data is missing where a method needs it, or is malformed."""


@dataclass
class LinearStats:
    """Statistics of one linear's input over the calibration set (rows = tokens)."""
    gram: torch.Tensor      # (in, in) float64: sum over rows of x x^T
    rows: int
    amax: Optional[torch.Tensor] = None   # (in,) float64: max over rows of |x_j| (SmoothQuant)
    abs_sum: Optional[torch.Tensor] = None  # (in,) float64: sum over rows of |x_j| (AWQ's saliency)
    # sequential calibration with reference=True: the same input in the uncompressed model, and
    # the cross Gram sum over rows of x_ref x^T (in, in), for fitting to the uncompressed outputs
    reference: Optional["LinearStats"] = None
    cross: Optional[torch.Tensor] = None

    @property
    def sq_norm(self) -> torch.Tensor:
        """Per input channel: sum of x_j^2 (Wanda's ||x_j||^2)."""
        return self.gram.diagonal()

    @property
    def abs_mean(self) -> Optional[torch.Tensor]:
        return None if self.abs_sum is None else self.abs_sum / max(self.rows, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """The mean second moment E[x x^T] (GPTQ's Hessian up to a factor 2)."""
        return self.gram / max(self.rows, 1)


MAX_SAMPLES = 10_000    # calibration is consumed into a list: an endless iterator must not hang


def normalize_samples(calibration) -> list[tuple]:
    """The calibration samples as a list of tuples of tensors, checked: each sample is a tensor or
    a tuple of tensors, every float value is finite (one NaN or Inf would poison the Gram
    matrices), and an iterable yields at most ``MAX_SAMPLES`` samples."""
    if calibration is None:
        return []
    if isinstance(calibration, _CheckedSamples):
        return calibration
    if isinstance(calibration, (str, bytes, dict)) or not hasattr(calibration, "__iter__"):
        raise CalibrationError(f"calibration must be a list (or iterable) of samples, each a tensor or a tuple of "
                               f"input tensors, e.g. [(x1,), (x2,)]; got {type(calibration).__name__}")
    samples = _CheckedSamples()
    for i, s in enumerate(calibration):
        if i >= MAX_SAMPLES:
            raise CalibrationError(f"calibration yields more than {MAX_SAMPLES} samples (an endless iterator?): "
                                   "pass a list, or itertools.islice(samples, n) for the first n")
        s = (s,) if isinstance(s, torch.Tensor) else tuple(s) if isinstance(s, (tuple, list)) else None
        if not s or not all(isinstance(t, torch.Tensor) for t in s):
            raise CalibrationError(f"calibration sample {i} must be a tensor or a tuple of tensors")
        for j, t in enumerate(s):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise CalibrationError(f"calibration sample {i}, input {j} holds {bad}: calibration data must be "
                                       "finite")
        samples.append(s)
    return samples


class _CheckedSamples(list):
    """Samples ``normalize_samples`` has checked (passes normalize again: no second check)."""
    _presso_checked = True


def collect_linear_stats(g: Graph, samples: Sequence[tuple], nodes: Optional[Iterable[Node]] = None,
                         progress: bool = False, desc: str = "calibrating") -> dict[str, LinearStats]:
    """Gram matrices of the inputs of ``nodes`` (default: every ``linear``), keyed by node name."""
    from ..ir.interpret import ReferenceRuntime
    wanted = {id(n) for n in (nodes if nodes is not None else [n for n in g.nodes if n.op == "linear"])}
    stats: dict[str, LinearStats] = {}
    sample = 0

    def observe(node, ins, outs):
        if id(node) not in wanted:
            return
        x = ins[0].detach().reshape(-1, ins[0].shape[-1]).to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(f"calibration sample {sample} makes the input of layer %{node.name} "
                                   f"(weight %{node.inputs[1].name}) NaN or Inf: the model overflows on it")
        st = stats.get(node.name)
        amax, abs_sum = x.abs().amax(0), x.abs().sum(0)
        if st is None:
            stats[node.name] = LinearStats(x.T @ x, x.shape[0], amax, abs_sum)
        else:
            st.gram += x.T @ x
            st.rows += x.shape[0]
            st.amax = torch.maximum(st.amax, amax)
            st.abs_sum += abs_sum

    rt = ReferenceRuntime(g)
    from .progress import progress as bar
    it = bar(samples, progress, desc=desc, unit="batch")
    from ..errors import InputError
    for i, s in enumerate(it):
        sample = i
        try:
            rt.run(*s, observer=observe)
        except InputError as e:
            raise CalibrationError(f"calibration sample {i} does not fit the model: {e} (compile with "
                                   "dynamic_shapes=... to calibrate on other shapes)") from None
    return stats
