"""The generic ``aten.*`` ops: generated from torch's schemas, printed and parsed as IR text, run
by ATen, never folded when random, and in-place updates of inputs written back."""
import pytest
import torch

import presso
from presso import FrontendError, from_torch
from presso.errors import IRError
from presso.ir.registry import get_op


def test_schema_becomes_operands_and_typed_attrs():
    op = get_op("aten.index_put")
    assert op.operands == ("self", "values", "indices?*")      # the tensor list is the variadic, last
    assert op.attrs["accumulate"].kind == "bool" and op.attrs["accumulate"].default is False
    conv = get_op("aten.convolution")
    assert conv.operands == ("input", "weight", "bias?")
    assert conv.attrs["stride"].kind == "shape" and conv.attrs["transposed"].kind == "bool"
    assert get_op("aten.add.Scalar").attrs["other"].kind == "scalar"


def test_unknown_or_non_functional_aten_names_are_typed_errors():
    for name in ("aten.no_such_op", "aten.add_.Tensor", "aten.add.NoOverload"):
        with pytest.raises(IRError, match=f"unknown op '{name}'.*core ATen op such as 'aten.acos'"):
            get_op(name)


GOLDEN = """graph @M(%x: f32[4, 5], %i: i64[4, 2]) {
  %cumsum: f32[4, 5] = aten.cumsum(%x) {dim=1}
  %gather: f32[4, 2] = aten.gather(%cumsum, %i) {dim=1}
  %add: f32[4, 2] = aten.add.Scalar(%gather) {other=2, alpha=3}
  return %add
}
"""


def test_ir_text_round_trip_and_reference_numbers():
    g = presso.parse(GOLDEN)
    assert str(g) == GOLDEN
    x, i = torch.randn(4, 5), torch.randint(0, 5, (4, 2))
    from presso.runtime.reference import ReferenceRuntime
    got = ReferenceRuntime(g).run(x, i)[0]
    torch.testing.assert_close(got, torch.gather(torch.cumsum(x, 1), 1, i) + 2 * 3)


class Noisy(torch.nn.Module):
    def forward(self, x):
        return x + torch.randn(3), torch.rand_like(x)


def test_random_ops_draw_new_numbers_every_run():
    """Folding a random op at import would return the same numbers forever (silently wrong)."""
    x = torch.zeros(3)
    cm = presso.compile(Noisy(), example_inputs=(x,))
    assert "random" in {get_op(n.op).category for n in cm.graph.nodes}
    a, b = cm(x), cm(x)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    torch.manual_seed(7)
    want = Noisy()(x)
    torch.manual_seed(7)
    got = cm(x)
    torch.testing.assert_close(got[0], want[0])   # the same ATen draws, in the same order
    torch.testing.assert_close(got[1], want[1])


class InPlace(torch.nn.Module):
    def forward(self, x, y):
        x.mul_(2)
        return x + y


def test_in_place_update_of_an_input_is_written_back():
    x, y = torch.randn(4), torch.randn(4)
    cm = presso.compile(InPlace(), example_inputs=(x.clone(), y))
    want_x = x.clone()
    want = InPlace()(want_x, y)
    got = cm(x, y)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x, want_x)          # the caller's tensor changed as in eager torch


class BatchNormTraining(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("running", torch.zeros(3))

    def forward(self, x):
        self.running.add_(x.mean(0))
        return x * 2


def test_in_place_update_of_a_buffer_is_refused():
    with pytest.raises(FrontendError, match=r"updates 'running' in place \(buffer_mutation\).*return the new value"):
        from_torch(BatchNormTraining(), (torch.randn(2, 3),))


class Spectral(torch.nn.Module):
    def forward(self, x):
        return torch.fft.irfft(torch.fft.rfft(x) * 2)


def test_complex_intermediates():
    x = torch.randn(2, 16)
    cm = presso.compile(Spectral(), example_inputs=(x,))
    assert any(v.type.dtype.value == "c64" for n in cm.graph.nodes for v in n.outputs)
    torch.testing.assert_close(cm(x), Spectral()(x), rtol=1e-4, atol=1e-5)


class PromotesThroughOneElement(torch.nn.Module):
    def forward(self, x):
        return torch.full((1,), 0.5, dtype=torch.float64) * x   # [1] f64 * [n] f32 -> f64


def test_one_element_constant_keeps_type_promotion():
    x = torch.randn(5)
    cm = presso.compile(PromotesThroughOneElement(), example_inputs=(x,))
    out = cm(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, PromotesThroughOneElement()(x))


class Selects(torch.nn.Module):
    def forward(self, x):
        picked = torch.masked_select(x, x > 0)        # as many elements as x has positives
        return picked * 2, torch.nonzero(x).float().sum(0)


def test_value_dependent_sizes_are_symbols_bound_at_run_time():
    x = torch.randn(4, 5)
    cm = presso.compile(Selects(), example_inputs=(x,))
    sel = next(n for n in cm.graph.nodes if n.op == "aten.masked_select")
    (size,) = sel.output.type.shape
    assert isinstance(size, str)                       # a symbol, not the example's count
    reparsed = presso.parse(str(cm.graph), weights={k: p.data for k, p in cm.graph.params.items()})
    assert str(reparsed) == str(cm.graph)
    for trial in (x, torch.randn(4, 5), torch.full((4, 5), -1.0)):
        got, want = cm(trial), Selects()(trial)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
