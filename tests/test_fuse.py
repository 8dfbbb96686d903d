"""The ``fuse`` pass (golden IR) and its expression language."""
import re

import pytest
import torch

from presso import parse
from presso.errors import IRError
from presso.ir import expr as E
from presso.passes.fuse import fuse
from test_passes import check_golden


def test_swiglu_and_a_scaled_residual_become_regions():
    before = """
graph @g(%a: f32[2, 8], %b: f32[2, 8], %r: f32[8]) {
  %s: f32[2, 8] = silu(%a)
  %m: f32[2, 8] = mul(%s, %b)
  %half: f32[] = full() {value=0.5}
  %h: f32[2, 8] = mul(%m, %half)
  %y: f32[2, 8] = add(%h, %r)
  return %y
}"""
    after = """
graph @g(%a: f32[2, 8], %b: f32[2, 8], %r: f32[8]) {
  %y: f32[2, 8] = fused_elementwise(%a, %b, %r) {expr="add(mul(mul(silu(%0),%1),0.5:f32),%2)"}
  return %y
}"""
    check_golden(before, after, inputs=(torch.randn(2, 8), torch.randn(2, 8), torch.randn(8)), fn=fuse)


def test_a_value_read_outside_the_region_is_not_swallowed():
    """``%e`` has two users, so it ends its own region rather than being computed twice."""
    before = """
graph @g(%x: f32[4]) {
  %e: f32[4] = exp(%x)
  %n: f32[4] = neg(%e)
  %l: f32[4] = log(%e)
  %t: f32[4] = tanh(%n)
  %y: f32[4] = add(%t, %l)
  return %y, %e
}"""
    after = """
graph @g(%x: f32[4]) {
  %e: f32[4] = exp(%x)
  %y: f32[4] = fused_elementwise(%e) {expr="add(tanh(neg(%0)),log(%0))"}
  return %y, %e
}"""
    check_golden(before, after, inputs=(torch.randn(4),), fn=fuse)


def test_non_elementwise_ops_and_shape_changes_end_regions():
    before = """
graph @g(%x: f32[2, 8]) {
  param %w: f32[8, 8]
  %a: f32[2, 8] = relu(%x)
  %y: f32[2, 8] = linear(%a, %w, _)
  %s: f32[2, 1] = reduce_sum(%y) {axes=[1], keepdim=true}
  %z: f32[2, 8] = sub(%y, %s)
  return %z
}"""
    check_golden(before, before, {"w": torch.randn(8, 8)}, (torch.randn(2, 8),), fn=fuse)


@pytest.mark.parametrize("text,msg", [
    ("mul(%0)", "'mul' takes 2 operand"), ("softmax(%0)", "op 'softmax' cannot be fused"),
    ("add(%0,%1", "expected ',' or ')'"), ("add(%0,%1) x", "trailing text"),
])
def test_bad_expressions_are_refused(text, msg):
    with pytest.raises(IRError, match=re.escape(msg)):
        E.parse(text)


def test_expression_reading_a_missing_operand_fails_verification():
    with pytest.raises(IRError, match="reads %1 but has 1 operand"):
        parse('graph @g(%x: f32[4]) {\n  %v: f32[4] = fused_elementwise(%x) {expr="add(%0,%1)"}\n  return %v\n}')


def test_expressions_round_trip_through_text():
    for t in ["where(gt(%0,0.0:f32),gelu[tanh](%0),cast[f32](%1))", "mul(sub(1.0:f32,%0),-inf:f32)"]:
        assert E.to_text(E.parse(t)) == t
