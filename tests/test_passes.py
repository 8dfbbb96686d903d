"""Passes: golden IR text before -> after, each also checked numerically on the reference runtime;
and the pass manager (pipeline text, typed options, verification, numeric check, IR printing)."""
import io

import pytest
import torch

from presso import PassCheckError, PipelineError, parse
from presso.errors import IRError
from presso.ir import print_graph
from presso.passes import PassContext, Option, parse_pipeline, register_pass, resolve, run_pipeline
from presso.passes.canonicalize import canonicalize
from presso.passes.dce import dce
from presso.passes.fold_constants import fold_constants
from presso.runtime import run_graph


def check_golden(before: str, after: str, weights=None, inputs=None, fn=canonicalize, rtol=1e-5):
    g = parse(before, weights)
    out = fn(g.copy())
    assert print_graph(out) == after.strip() + "\n"
    if inputs is not None:
        ref, got = run_graph(g, *inputs), run_graph(out, *inputs)
        for a, b in zip(ref, got):
            assert torch.allclose(a, b, rtol=rtol, atol=1e-6)


def test_rotary_is_recognized():
    before = """
graph @g(%x: f32[1, 2, 4, 8], %cos: f32[4, 8], %sin: f32[4, 8]) {
  %lo: f32[1, 2, 4, 4] = slice(%x) {axis=3, end=4}
  %hi: f32[1, 2, 4, 4] = slice(%x) {axis=3, start=4}
  %neg: f32[1, 2, 4, 4] = neg(%hi)
  %rot: f32[1, 2, 4, 8] = concat(%neg, %lo) {axis=3}
  %a: f32[1, 2, 4, 8] = mul(%x, %cos)
  %b: f32[1, 2, 4, 8] = mul(%sin, %rot)
  %y: f32[1, 2, 4, 8] = add(%b, %a)
  return %y
}"""
    after = """
graph @g(%x: f32[1, 2, 4, 8], %cos: f32[4, 8], %sin: f32[4, 8]) {
  %rotary: f32[1, 2, 4, 8] = rotary(%x, %cos, %sin)
  return %rotary
}"""
    check_golden(before, after, inputs=(torch.randn(1, 2, 4, 8), torch.randn(4, 8), torch.randn(4, 8)))


def test_decomposed_attention_with_split_scale_and_causal_mask():
    # ONNX's spelling: k^T as reshape->transpose->reshape, the scale split as sqrt(s) on q and on k^T
    before = """
graph @g(%q: f32[1, 2, 4, 8], %k: f32[1, 2, 4, 8], %v: f32[1, 2, 4, 8]) {
  param %mask: f32[4, 4]
  %k3: f32[2, 4, 8] = reshape(%k) {shape=[2, 4, 8]}
  %kt3: f32[2, 8, 4] = transpose(%k3) {perm=[0, 2, 1]}
  %kt: f32[1, 2, 8, 4] = reshape(%kt3) {shape=[1, 2, 8, 4]}
  %s: f32[] = full() {value=0.5946035575013605}
  %qs: f32[1, 2, 4, 8] = mul(%q, %s)
  %ks: f32[1, 2, 8, 4] = mul(%kt, %s)
  %scores: f32[1, 2, 4, 4] = matmul(%qs, %ks)
  %masked: f32[1, 2, 4, 4] = add(%scores, %mask)
  %p: f32[1, 2, 4, 4] = softmax(%masked) {axis=3}
  %o: f32[1, 2, 4, 8] = matmul(%p, %v)
  return %o
}"""
    after = """
graph @g(%q: f32[1, 2, 4, 8], %k: f32[1, 2, 4, 8], %v: f32[1, 2, 4, 8]) {
  %attention: f32[1, 2, 4, 8] = attention(%q, %k, %v, _) {causal=true}
  return %attention
}"""
    mask = torch.full((4, 4), float("-inf")).triu(1)
    check_golden(before, after, {"mask": mask}, (torch.randn(1, 2, 4, 8),) * 3)


def test_attention_with_a_non_causal_mask_keeps_it_and_an_explicit_scale():
    before = """
graph @g(%q: f32[1, 2, 4, 8], %k: f32[1, 2, 4, 8], %v: f32[1, 2, 4, 8], %mask: f32[1, 1, 1, 4]) {
  %kt: f32[1, 2, 8, 4] = transpose(%k) {perm=[0, 1, 3, 2]}
  %scores: f32[1, 2, 4, 4] = matmul(%q, %kt)
  %c: f32[] = full() {value=2.0}
  %scaled: f32[1, 2, 4, 4] = div(%scores, %c)
  %masked: f32[1, 2, 4, 4] = add(%scaled, %mask)
  %p: f32[1, 2, 4, 4] = softmax(%masked) {axis=3}
  %o: f32[1, 2, 4, 8] = matmul(%p, %v)
  return %o
}"""
    after = """
graph @g(%q: f32[1, 2, 4, 8], %k: f32[1, 2, 4, 8], %v: f32[1, 2, 4, 8], %mask: f32[1, 1, 1, 4]) {
  %attention: f32[1, 2, 4, 8] = attention(%q, %k, %v, %mask) {scale=0.5}
  return %attention
}"""
    mask = torch.tensor([[[[0.0, 0.0, -1e9, 0.0]]]])
    check_golden(before, after, inputs=(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), mask))


SOFTCAPPED = """
graph @g(%q: f32[1, 2, seq, 8], %k: f32[1, 2, seq, 8], %v: f32[1, 2, seq, 8]) {
  param %table: f32[1, 1, 16, 16]
  %kt: f32[1, 2, 8, seq] = transpose(%k) {perm=[0, 1, 3, 2]}
  %scores: f32[1, 2, seq, seq] = matmul(%q, %kt)
  %s: f32[] = full() {value=0.25}
  %scaled: f32[1, 2, seq, seq] = mul(%scores, %s)
  %c: f32[] = full() {value=CAP_IN}
  %d: f32[1, 2, seq, seq] = div(%scaled, %c)
  %t: f32[1, 2, seq, seq] = tanh(%d)
  %c2: f32[] = full() {value=CAP_OUT}
  %capped: f32[1, 2, seq, seq] = mul(%t, %c2)
  %rows: f32[1, 1, seq, 16] = slice(%table) {axis=2, end=seq}
  %mask: f32[1, 1, seq, seq] = slice(%rows) {axis=3, end=seq}
  %masked: f32[1, 2, seq, seq] = add(%capped, %mask)
  %p: f32[1, 2, seq, seq] = softmax(%masked) {axis=3}
  %o: f32[1, 2, seq, 8] = matmul(%p, %v)
  return %o
}"""


def test_softcapped_attention_over_a_sliced_causal_table():
    # Gemma 2's eager attention as generation traces it: scores capped by c * tanh(s / c), then a
    # symbolic-length corner of a constant additive causal table (HF's 0 / finfo.min)
    table = torch.full((1, 1, 16, 16), torch.finfo(torch.float32).min).triu(1)
    after = """
graph @g(%q: f32[1, 2, seq, 8], %k: f32[1, 2, seq, 8], %v: f32[1, 2, seq, 8]) {
  %attention: f32[1, 2, seq, 8] = attention(%q, %k, %v, _) {causal=true, scale=0.25, softcap=2.0}
  return %attention
}"""
    inputs = tuple(4 * torch.randn(1, 2, 5, 8) for _ in range(3))   # scores well past the cap
    check_golden(SOFTCAPPED.replace("CAP_IN", "2.0").replace("CAP_OUT", "2.0"), after, {"table": table}, inputs)
    g = parse(after)
    plain = run_graph(parse(after.replace(", softcap=2.0", "")), *inputs)[0]
    assert not torch.allclose(run_graph(g, *inputs)[0], plain, atol=1e-3)   # the cap changes the result


def test_a_tanh_whose_two_constants_differ_is_not_a_softcap():
    table = torch.full((1, 1, 16, 16), torch.finfo(torch.float32).min).triu(1)
    g = canonicalize(parse(SOFTCAPPED.replace("CAP_IN", "2.0").replace("CAP_OUT", "3.0"), {"table": table}))
    assert "attention" not in {n.op for n in g.nodes} and "tanh" in {n.op for n in g.nodes}


def test_softcap_must_be_positive():
    with pytest.raises(IRError, match="softcap must be > 0.*got -1.0"):
        parse("""
graph @g(%q: f32[1, 2, 4, 8]) {
  %a: f32[1, 2, 4, 8] = attention(%q, %q, %q, _) {softcap=-1.0}
  return %a
}""")


def test_concat_drops_empty_operands():
    # torch.cat's legacy empty 1-D tensor joins any rank (HF's empty DynamicCache layer)
    before = """
graph @g(%x: f32[2, 3, 4], %y: f32[2, 0, 4]) {
  param %empty: f32[0]
  %c: f32[2, 3, 4] = concat(%empty, %x) {axis=0}
  %d: f32[2, 3, 4] = concat(%c, %y) {axis=1}
  %e: f32[2, 6, 4] = concat(%d, %empty, %x) {axis=1}
  return %e
}"""
    after = """
graph @g(%x: f32[2, 3, 4], %y: f32[2, 0, 4]) {
  %concat: f32[2, 6, 4] = concat(%x, %x) {axis=1}
  return %concat
}"""
    check_golden(before, after, {"empty": torch.zeros(0)}, (torch.randn(2, 3, 4), torch.randn(2, 0, 4)))


def test_matmul_by_constant_plus_bias_becomes_linear():
    before = """
graph @g(%x: f32[3, 5, 8]) {
  param %w: f32[8, 16]
  param %b: f32[16]
  %mm: f32[3, 5, 16] = matmul(%x, %w)
  %y: f32[3, 5, 16] = add(%b, %mm)
  return %y
}"""
    after = """
graph @g(%x: f32[3, 5, 8]) {
  param %b: f32[16]
  param %w: f32[16, 8]
  %linear_0: f32[3, 5, 16] = linear(%x, %w, %b)
  return %linear_0
}"""
    check_golden(before, after, {"w": torch.randn(8, 16), "b": torch.randn(16)}, (torch.randn(3, 5, 8),))


def test_decomposed_rms_norm_and_layer_norm():
    before = """
graph @g(%x: f32[2, 4, 8]) {
  param %w: f32[8]
  param %b: f32[8]
  %two: f32[] = full() {value=2.0}
  %sq: f32[2, 4, 8] = pow(%x, %two)
  %ms: f32[2, 4, 1] = reduce_mean(%sq) {axes=[2], keepdim=true}
  %eps: f32[] = full() {value=1e-06}
  %ad: f32[2, 4, 1] = add(%ms, %eps)
  %sd: f32[2, 4, 1] = sqrt(%ad)
  %inv: f32[2, 4, 1] = reciprocal(%sd)
  %n: f32[2, 4, 8] = mul(%x, %inv)
  %rms: f32[2, 4, 8] = mul(%w, %n)
  %mu: f32[2, 4, 1] = reduce_mean(%rms) {axes=[2], keepdim=true}
  %d: f32[2, 4, 8] = sub(%rms, %mu)
  %d2: f32[2, 4, 8] = mul(%d, %d)
  %var: f32[2, 4, 1] = reduce_mean(%d2) {axes=[2], keepdim=true}
  %e2: f32[] = full() {value=1e-05}
  %ve: f32[2, 4, 1] = add(%var, %e2)
  %sd2: f32[2, 4, 1] = sqrt(%ve)
  %ln: f32[2, 4, 8] = div(%d, %sd2)
  %lnw: f32[2, 4, 8] = mul(%ln, %w)
  %lnb: f32[2, 4, 8] = add(%lnw, %b)
  return %lnb
}"""
    after = """
graph @g(%x: f32[2, 4, 8]) {
  param %w: f32[8]
  param %b: f32[8]
  %rms_norm_0: f32[2, 4, 8] = rms_norm(%x, %w)
  %layer_norm_2: f32[2, 4, 8] = layer_norm(%rms_norm_0, %w, %b)
  return %layer_norm_2
}"""
    check_golden(before, after, {"w": torch.rand(8) + 0.5, "b": torch.randn(8)}, (torch.randn(2, 4, 8),))


LLAMA_NORM = """
graph @g(%x: f16[2, 4, 8]) {
  param %w: f16[8]
  %xf: f32[2, 4, 8] = cast(%x) {dtype=f32}
  %two: f32[] = full() {value=2.0}
  %sq: f32[2, 4, 8] = pow(%xf, %two)
  %ms: f32[2, 4, 1] = reduce_mean(%sq) {axes=[2], keepdim=true}
  %eps: f32[] = full() {value=1e-06}
  %ad: f32[2, 4, 1] = add(%ms, %eps)
  %sd: f32[2, 4, 1] = sqrt(%ad)
  %inv: f32[2, 4, 1] = reciprocal(%sd)
  %n: f32[2, 4, 8] = mul(%xf, %inv)
  %nh: DT[2, 4, 8] = cast(%n) {dtype=DT}
  %y: DT[2, 4, 8] = mul(%w, %nh)
  return %y
}"""


def test_rms_norm_in_float32_between_casts_is_one_norm():
    """Llama's spelling: widen, normalize in fp32, round back, then the weight. The same bits as
    rms_norm on the fp16 input (checked on the reference runtime with equality)."""
    after = """
graph @g(%x: f16[2, 4, 8]) {
  param %w: f16[8]
  %rms_norm_1: f16[2, 4, 8] = rms_norm(%x, %w)
  return %rms_norm_1
}"""
    x, w = torch.randn(2, 4, 8).half() * 3, (torch.rand(8) + 0.5).half()
    check_golden(LLAMA_NORM.replace("DT", "f16"), after, {"w": w}, (x,), rtol=0)
    # rounded to another dtype than the input's: the casts stay
    kept = parse(LLAMA_NORM.replace("DT", "bf16").replace("param %w: f16", "param %w: bf16"), {"w": w.bfloat16()})
    ops = [n.op for n in canonicalize(kept).nodes]
    assert ops.count("cast") == 2 and "rms_norm" in ops, ops


def test_gqa_repeat_kv_folds_into_attention():
    before = """
graph @g(%q: f32[1, 4, 3, 8], %k: f32[1, 2, 3, 8], %v: f32[1, 2, 3, 8]) {
  %k5: f32[1, 2, 1, 3, 8] = reshape(%k) {shape=[1, 2, 1, 3, 8]}
  %ke: f32[1, 2, 2, 3, 8] = expand(%k5) {shape=[1, 2, 2, 3, 8]}
  %kr: f32[1, 4, 3, 8] = reshape(%ke) {shape=[1, 4, 3, 8]}
  %v5: f32[1, 2, 1, 3, 8] = reshape(%v) {shape=[1, 2, 1, 3, 8]}
  %ve: f32[1, 2, 2, 3, 8] = expand(%v5) {shape=[1, 2, 2, 3, 8]}
  %vr: f32[1, 4, 3, 8] = reshape(%ve) {shape=[1, 4, 3, 8]}
  %o: f32[1, 4, 3, 8] = attention(%q, %kr, %vr, _) {causal=true}
  return %o
}"""
    after = """
graph @g(%q: f32[1, 4, 3, 8], %k: f32[1, 2, 3, 8], %v: f32[1, 2, 3, 8]) {
  %attention: f32[1, 4, 3, 8] = attention(%q, %k, %v, _) {causal=true}
  return %attention
}"""
    check_golden(before, after, inputs=(torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)))


def test_layout_chain_that_is_a_transpose():
    before = """
graph @g(%x: f32[2, 3, 4, 5]) {
  %a: f32[6, 4, 5] = reshape(%x) {shape=[6, 4, 5]}
  %b: f32[6, 5, 4] = transpose(%a) {perm=[0, 2, 1]}
  %c: f32[2, 3, 5, 4] = reshape(%b) {shape=[2, 3, 5, 4]}
  return %c
}"""
    after = """
graph @g(%x: f32[2, 3, 4, 5]) {
  %transpose: f32[2, 3, 5, 4] = transpose(%x) {perm=[0, 1, 3, 2]}
  return %transpose
}"""
    check_golden(before, after, inputs=(torch.randn(2, 3, 4, 5),))


def test_a_layout_chain_that_is_not_one_op_is_left_alone():
    before = """
graph @g(%x: f32[2, 6]) {
  %a: f32[6, 2] = transpose(%x) {perm=[1, 0]}
  %b: f32[3, 4] = reshape(%a) {shape=[3, 4]}
  return %b
}"""
    check_golden(before, before, inputs=(torch.randn(2, 6),))


def test_fold_constants_and_dce():
    before = """
graph @g(%x: f32[4]) {
  param %t: f32[8]
  param %unused: f32[3]
  %s: f32[4] = slice(%t) {axis=0, end=4}
  %e: f32[4] = exp(%s)
  %dead: f32[4] = neg(%x)
  %y: f32[4] = add(%x, %e)
  return %y
}"""
    after = """
graph @g(%x: f32[4]) {
  param %t.slice.exp: f32[4]
  %y: f32[4] = add(%x, %t.slice.exp)
  return %y
}"""
    w = {"t": torch.randn(8), "unused": torch.randn(3)}
    check_golden(before, after, w, (torch.randn(4),), fn=lambda g: dce(fold_constants(g)))


# ---- pass manager --------------------------------------------------------------------------
_seen = {}


@register_pass("test_options", options={
    "ratio": Option(float, 0.5, check=lambda r: 0 < r <= 1, allowed="in (0, 1]"),
    "group_size": Option(int, 128, choices=(32, 64, 128)),
    "exact": Option(bool, False),
    "method": Option(str, "rtn", choices=("rtn", "gptq")),
})
def _test_options(g, ctx, **opts):
    _seen.update(opts)
    return g


@register_pass("test_perturb")
def _test_perturb(g, ctx):
    """A deliberately wrong pass: scales the first output by 1.01."""
    out = g.outputs[0]
    g.outputs[0] = g.op("mul", out, g.op("full", value=1.01))
    return g


def test_pipeline_text_parses_and_types_options():
    specs = parse_pipeline("canonicalize,test_options{ratio=0.25,group_size=64,exact=true,method=gptq},dce")
    assert [s.name for s in specs] == ["canonicalize", "test_options", "dce"]
    resolved = resolve("canonicalize , test_options{ratio=0.25, group_size=64, exact=true, method=gptq}")
    assert resolved[1].options == {"ratio": 0.25, "group_size": 64, "exact": True, "method": "gptq"}
    assert str(resolved[1]) == "test_options{ratio=0.25,group_size=64,exact=true,method=gptq}"
    assert resolve([("test_options", {"ratio": 1})])[0].options["ratio"] == 1.0


@pytest.mark.parametrize("text, msg", [
    ("canonicalize,,dce", "malformed pipeline"),
    ("canonicalize,", "trailing comma"),
    ("test_options{ratio}", "expected key=value"),
    ("test_options{ratio=0}", r"option 'ratio' must be in \(0, 1\], got 0.0"),
    ("test_options{ratio=abc}", "option 'ratio' must be float"),
    ("test_options{group_size=100}", r"must be one of \[32, 64, 128\], got 100"),
    ("test_options{exact=maybe}", "must be bool"),
    ("test_options{bits=3}", r"has no option\(s\) \['bits'\]; options: exact, group_size, method, ratio"),
    ("frobnicate{weights=int4}", "unknown pass .frobnicate.; registered passes:"),
])
def test_bad_pipelines_raise_pipeline_errors(text, msg):
    with pytest.raises(PipelineError, match=msg):
        resolve(text)


def _mlp_graph():
    from presso import from_torch
    from presso.models import make_mlp
    m, ins = make_mlp()
    return from_torch(m, ins), ins


def test_run_pipeline_verifies_times_and_prints():
    g, ins = _mlp_graph()
    buf = io.StringIO()
    out, records = run_pipeline(g, "canonicalize,test_options{exact=true},dce", PassContext(example_inputs=ins),
                                check="numeric", print_ir_after=["dce"], stream=buf)
    assert _seen["exact"] is True
    assert [r.name for r in records] == ["canonicalize", "test_options", "dce"]
    assert all(r.seconds >= 0 and r.max_rel_err == 0.0 for r in records)
    assert buf.getvalue().startswith("// ----- IR after dce -----\ngraph @MLP(")
    assert len(g.nodes) > 0 and out is not g  # the input graph is not modified


def test_numeric_check_names_the_first_pass_that_changes_outputs():
    g, ins = _mlp_graph()
    with pytest.raises(PassCheckError, match=r"pass 'test_perturb' changed the outputs: .*max rel err 0.01"):
        run_pipeline(g, "canonicalize,test_perturb,dce", PassContext(example_inputs=ins), check="numeric")
    with pytest.raises(PipelineError, match="not in the pipeline"):
        run_pipeline(g, "dce", PassContext(example_inputs=ins), print_ir_after="canonicalize")
