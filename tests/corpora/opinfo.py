"""PyTorch's own operator database (OpInfo) as a corpus: the first float32 sample of each op,
wrapped as a one-op module, exported with ``torch.export`` and compiled by presso (reference
target), compared with eager torch.

``python -m tests.corpora.opinfo`` prints every op's outcome.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

import presso

RTOL, ATOL = 1e-4, 1e-5


@dataclass
class Outcome:
    op: str
    status: str     # "pass" | "pass (shape)" | "mismatch" | "error" | "not exportable" | "no sample"
    detail: str = ""


class OneOp(torch.nn.Module):
    """``op(*sample)`` with the sample's tensors as inputs and everything else baked in."""

    def __init__(self, fn, spec, leaves):
        super().__init__()
        self.fn, self.spec = fn, spec
        self.slots = [isinstance(x, torch.Tensor) for x in leaves]
        self.fixed = [None if s else x for s, x in zip(self.slots, leaves)]

    def forward(self, *tensors):
        it = iter(tensors)
        leaves = [next(it) if s else x for s, x in zip(self.slots, self.fixed)]
        inp, args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.fn(inp, *args, **kwargs)


def first_sample(op):
    try:
        return next(iter(op.sample_inputs("cpu", torch.float32, requires_grad=False)))
    except Exception:  # noqa: BLE001
        return None


def _tensors(out):
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def run_one(op, target="reference") -> Outcome:
    name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
    sample = first_sample(op)
    if sample is None:
        return Outcome(name, "no sample")
    leaves, spec = pytree.tree_flatten((sample.input, tuple(sample.args), dict(sample.kwargs)))
    module = OneOp(op.op, spec, leaves)
    inputs = tuple(x for x in leaves if isinstance(x, torch.Tensor))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            expected = module(*inputs)
            torch.manual_seed(1)
            undetermined = not _same(module(*inputs), expected)
            ep = torch.export.export(module, inputs, strict=False)
            undetermined |= _draws_random_numbers(ep) or _returns_uninitialised(ep)
    except Exception as e:  # noqa: BLE001
        return Outcome(name, "not exportable", f"{type(e).__name__}: {str(e)[:120]}")
    if not _tensors(expected) or any(x.is_complex() for x in _tensors(expected)):
        return Outcome(name, "not exportable", "no real tensor output")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = presso.compile(module, example_inputs=inputs, target=target)
            torch.manual_seed(0)
            got = cm(*inputs)
    except Exception as e:  # noqa: BLE001
        return Outcome(name, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    want = _tensors(expected)
    got = got if isinstance(got, (list, tuple)) else [got]
    got = _tensors(got)
    if len(got) != len(want):
        return Outcome(name, "mismatch", f"{len(got)} outputs, torch gives {len(want)}")
    for g, w in zip(got, want):
        if undetermined:  # random or uninitialised values: only their shape and dtype are defined
            if g.shape != w.shape or g.dtype != w.dtype:
                return Outcome(name, "mismatch", f"{g.dtype}{list(g.shape)}, torch gives {w.dtype}{list(w.shape)}")
            continue
        try:
            torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, equal_nan=True, check_device=False)
        except AssertionError as e:
            return Outcome(name, "mismatch", str(e).splitlines()[0][:200])
    return Outcome(name, "pass (shape)" if undetermined else "pass")


def _draws_random_numbers(ep) -> bool:
    """OpInfo wraps its random ops in ``wrapper_set_seed`` (a Python-side seed torch.export does not
    record), so eager repeats its numbers; the exported program's random ops do not."""
    return any(torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ()) for n in ep.graph.nodes)


UNINITIALISED = {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided"}


def _returns_uninitialised(ep) -> bool:
    """An output straight from an allocation (``empty`` and kin) holds whatever memory it got: two
    eager calls that reuse one freed buffer agree by chance, and agreeing with them means nothing.
    (An empty allocation of no elements, as OpInfo's signal windows of length 0 give, is determined.)"""
    (out,) = [n for n in ep.graph.nodes if n.op == "output"]
    return any(getattr(a, "op", None) == "call_function" and getattr(a.target, "_opname", None) in UNINITIALISED
               and getattr(a.meta.get("val"), "numel", lambda: 1)() > 0 for a in pytree.tree_leaves(out.args))


def _same(a, b) -> bool:
    """Outputs equal bit for bit (NaN equal): the sample's result does not depend on the seed."""
    xs, ys = _tensors(a), _tensors(b)
    return len(xs) == len(ys) and all(x.shape == y.shape and torch.equal(torch.nan_to_num(x), torch.nan_to_num(y))
                                      for x, y in zip(xs, ys))


def ops():
    from torch.testing._internal.common_methods_invocations import op_db
    return [op for op in op_db if torch.float32 in op.supported_dtypes("cpu")]


def run_all(selected=None, target="reference") -> list[Outcome]:
    return [run_one(op, target) for op in (selected if selected is not None else ops())]


def main():
    import collections
    import sys
    want = set(sys.argv[1:])
    outs = run_all([op for op in ops() if not want or op.name in want])
    for o in outs:
        if not o.status.startswith("pass"):
            print(f"{o.status:15s} {o.op:40s} {o.detail}")
    counts = collections.Counter(o.status for o in outs)
    print(dict(counts), summary(outs))


def summary(outs) -> str:
    passed = sum(o.status.startswith("pass") for o in outs)
    exportable = sum(o.status in ("pass", "pass (shape)", "mismatch", "error") for o in outs)
    shape_only = sum(o.status == "pass (shape)" for o in outs)
    return (f"OpInfo corpus: {passed}/{exportable} exportable float32 ops import and match eager torch "
            f"({100 * passed / max(exportable, 1):.1f}%; {shape_only} of them random or uninitialised, "
            "compared by shape and dtype)")


if __name__ == "__main__":
    main()
