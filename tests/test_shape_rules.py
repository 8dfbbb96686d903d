"""The closed-form type rules of hot ops agree with torch's meta kernels, which they stand in for.

The rules exist because torch's meta kernels for ``mm``, ``add``, ``relu``... are Python, and the first
call imports torch._dynamo and sympy (about as long as ``import torch``): a small ``presso inspect`` paid it.
"""
import itertools

import pytest
import torch

from presso.errors import IRError
from presso.ir.registry import get_op, meta_infer
from presso.ir.types import DType, TensorType

FLOATS = [DType.f32, DType.f16, DType.bf16, DType.f64]
BINARY = ["add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
          "logical_and", "logical_or"]
UNARY = ["neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "erf", "sigmoid", "relu", "silu",
         "sin", "cos", "logical_not"]
SHAPE_PAIRS = [((4, 8), (8,)), ((4, 1), (1, 8)), (("B", "T", 16), (16,)), (("B", 1, "T"), ("B", 3, 1)),
               ((), (2, 3)), (("T",), (1,)), ((2, 1, 5), (3, 1))]


def both(op, types, attrs=None):
    opdef = get_op(op)
    attrs = opdef.complete_attrs(attrs or {}, op)
    closed = opdef.infer(types, attrs)
    return closed, meta_infer(opdef, types, attrs, op)


@pytest.mark.parametrize("op", BINARY)
def test_binary_rules_match_meta(op):
    checked = 0
    for (sa, sb), dt in itertools.product(SHAPE_PAIRS, FLOATS):
        for a, b in ((sa, sb), (sb, sa)):
            closed, meta = both(op, [TensorType(a, dt), TensorType(b, dt)])
            assert closed is not None and closed == meta, (op, a, b, dt)
            checked += 1
    assert checked == 2 * len(SHAPE_PAIRS) * len(FLOATS)


@pytest.mark.parametrize("op", UNARY)
def test_unary_rules_match_meta(op):
    for shape, dt in itertools.product([(3,), ("B", "T", 8), ()], FLOATS):
        closed, meta = both(op, [TensorType(shape, dt)])
        assert closed == meta, (op, shape, dt)


def test_integer_operands_are_left_to_the_meta_kernel_which_knows_promotion():
    i32 = TensorType((4,), DType.i32)
    assert get_op("div").infer([i32, i32], {}) is None
    assert get_op("sqrt").infer([i32], {}) is None
    out = get_op("div").infer_types([_Value(i32), _Value(i32)], {})
    assert out == [TensorType((4,), DType.f32)]  # true division promotes, as torch does


@pytest.mark.parametrize("a,b", [((4, 8), (8, 3)), (("B", 4, 8), (8, 3)), ((2, 1, 4, 8), (5, 8, 3)),
                                 (("B", 4, 8, 64), (4, 64, "S"))])
def test_matmul_rule_matches_meta(a, b):
    for dt in FLOATS:
        closed, meta = both("matmul", [TensorType(a, dt), TensorType(b, dt)])
        assert closed == meta


@pytest.mark.parametrize("x,w,bias", [((4, 8), (3, 8), None), (("B", "T", 8), (3, 8), (3,)), ((8,), (5, 8), (5,))])
def test_linear_rule_matches_meta(x, w, bias):
    for dt in FLOATS:
        types = [TensorType(x, dt), TensorType(w, dt), TensorType(bias, dt) if bias else None]
        closed, meta = both("linear", types)
        assert closed == meta


def test_mismatched_operands_are_typed_errors_naming_the_dims():
    with pytest.raises(IRError, match=r"x's last dim 7 does not match weight's in_features 8"):
        get_op("linear").infer_types([_Value(TensorType((4, 7), DType.f32)), _Value(TensorType((3, 8), DType.f32)),
                                      None], {})
    with pytest.raises(IRError, match="inner dims differ"):
        get_op("matmul").infer_types([_Value(TensorType((4, 7), DType.f32)), _Value(TensorType((8, 3), DType.f32))],
                                     {})
    with pytest.raises(IRError, match="cannot take operands"):  # no broadcast: the meta kernel reports it
        get_op("add").infer_types([_Value(TensorType((4, 7), DType.f32)), _Value(TensorType((4, 3), DType.f32))], {})


class _Value:
    def __init__(self, t):
        self.type = t
