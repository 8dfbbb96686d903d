"""The ``concat_linears`` pass: golden IR before -> after, exact on the reference runtime, for
dense and compressed (int4 / 2:4 packed) weights; what it must leave alone."""
import torch

from presso import parse
from presso.ir import print_graph
from presso.ir.ops import pack_int4
from presso.passes.concat_linears import concat_linears
from presso.runtime import run_graph
from test_passes import check_golden


def test_projections_of_one_input_become_one_linear_and_a_split():
    before = """
graph @g(%h: f32[2, 3, 8]) {
  param %wq: f32[8, 8]
  param %wk: f32[4, 8]
  param %wv: f32[4, 8]
  param %bq: f32[8]
  param %bk: f32[4]
  param %bv: f32[4]
  %q: f32[2, 3, 8] = linear(%h, %wq, %bq)
  %k: f32[2, 3, 4] = linear(%h, %wk, %bk)
  %v: f32[2, 3, 4] = linear(%h, %wv, %bv)
  %kv: f32[2, 3, 8] = concat(%k, %v) {axis=2}
  return %q, %kv
}"""
    after = """
graph @g(%h: f32[2, 3, 8]) {
  param %q.stacked.0: f32[16, 8]
  param %q.stacked.bias: f32[16]
  %q_k_v: f32[2, 3, 16] = linear(%h, %q.stacked.0, %q.stacked.bias)
  %q: f32[2, 3, 8], %k: f32[2, 3, 4], %v: f32[2, 3, 4] = split(%q_k_v) {axis=2, sizes=[8, 4, 4]}
  %kv: f32[2, 3, 8] = concat(%k, %v) {axis=2}
  return %q, %kv
}"""
    w = {n: torch.randn(*s) for n, s in [("wq", (8, 8)), ("wk", (4, 8)), ("wv", (4, 8)), ("bq", (8,)), ("bk", (4,)),
                                          ("bv", (4,))]}
    # (equal up to float rounding: the stacked matmul may block its sums differently: ~2% of random
    # draws differ by an ulp or two at rtol=0)
    check_golden(before, after, w, (torch.randn(2, 3, 8),), fn=concat_linears)


def test_packed_int4_and_2_4_weights_stack_their_storage_and_stay_exact():
    before = """
graph @g(%h: f32[3, 64]) {
  param %qa: i4[32, 64]
  param %sa: f16[32, 2]
  param %qb: i4[16, 64]
  param %sb: f16[16, 2]
  param %va: f32[8, 32]
  param %ia: u4[8, 32]
  param %vb: f32[24, 32]
  param %ib: u4[24, 32]
  %wa: f32[32, 64] = dequantize(%qa, %sa) {bits=4, group_size=32, dtype=f32}
  %a: f32[3, 32] = linear(%h, %wa)
  %wb: f32[16, 64] = dequantize(%qb, %sb) {bits=4, group_size=32, dtype=f32}
  %b: f32[3, 16] = linear(%h, %wb)
  %dc: f32[8, 64] = densify_nm(%va, %ia) {n=2, m=4}
  %c: f32[3, 8] = linear(%h, %dc)
  %dd: f32[24, 64] = densify_nm(%vb, %ib) {n=2, m=4}
  %d: f32[3, 24] = linear(%h, %dd)
  return %a, %b, %c, %d
}"""
    def packed(n, k, signed):
        codes = torch.randint(-8 if signed else 0, 8 if signed else 16, (n, k), dtype=torch.int16)
        return pack_int4(codes)
    w = {"qa": packed(32, 64, True), "sa": torch.rand(32, 2).half(), "qb": packed(16, 64, True),
         "sb": torch.rand(16, 2).half(), "va": torch.randn(8, 32), "vb": torch.randn(24, 32)}
    for n, rows in (("ia", 8), ("ib", 24)):      # two kept positions per group of 4, ascending
        pos = torch.stack([torch.randperm(4)[:2].sort().values for _ in range(rows * 16)]).reshape(rows, 32)
        w[n] = pack_int4(pos.to(torch.int16))
    g = parse(before, w)
    out = concat_linears(g.copy())
    text = print_graph(out)
    assert text.count(" = linear(") == 2 and text.count(" = split(") == 2, text
    assert "param %a.stacked.0: i4[48, 64]" in text and "param %c.stacked.1: u4[32, 32]" in text, text
    x = torch.randn(3, 64)
    for want, got in zip(run_graph(g, x), run_graph(out, x)):
        assert torch.equal(want, got)
    # the stacked storage is the layers' bytes, not a re-encoding
    assert torch.equal(out.params["a.stacked.0"].data, torch.cat([w["qa"], w["qb"]]))


def test_epilogue_candidates_shared_weights_and_different_inputs_are_left_alone():
    before = """
graph @g(%h: f32[2, 8], %x: f32[2, 8]) {
  param %w1: f32[8, 8]
  param %w2: f32[8, 8]
  param %w3: f32[8, 8]
  %g1: f32[2, 8] = linear(%h, %w1)
  %u: f32[2, 8] = linear(%h, %w2)
  %s: f32[2, 8] = silu(%g1)
  %m: f32[2, 8] = mul(%s, %x)
  %r: f32[2, 8] = add(%u, %x)
  %o: f32[2, 8] = linear(%x, %w3)
  %o2: f32[2, 8] = linear(%h, %w3)
  %y: f32[2, 8] = add(%o, %o2)
  return %m, %r, %y
}"""
    g = parse(before, {n: torch.randn(8, 8) for n in ("w1", "w2", "w3")})
    assert print_graph(concat_linears(g.copy())) == print_graph(g)


def test_a_gated_pair_stacks_although_its_outputs_feed_an_epilogue():
    """SwiGLU's gate and up projections meet in one elementwise expression: stacked as a pair (not
    with the third projection of the same input), so the cuda target runs both halves and the
    gate in one kernel."""
    before = """
graph @g(%h: f32[2, 8]) {
  param %wg: f32[8, 8]
  param %wu: f32[8, 8]
  param %wq: f32[4, 8]
  param %wk: f32[4, 8]
  %gate: f32[2, 8] = linear(%h, %wg)
  %up: f32[2, 8] = linear(%h, %wu)
  %q: f32[2, 4] = linear(%h, %wq)
  %k: f32[2, 4] = linear(%h, %wk)
  %half: f32[] = full() {value=0.5}
  %s: f32[2, 8] = silu(%gate)
  %sh: f32[2, 8] = mul(%s, %half)
  %m: f32[2, 8] = mul(%up, %sh)
  return %m, %q, %k
}"""
    after = """
graph @g(%h: f32[2, 8]) {
  param %gate.stacked.0: f32[16, 8]
  param %q.stacked.0: f32[8, 8]
  %gate_up: f32[2, 16] = linear(%h, %gate.stacked.0, _)
  %gate: f32[2, 8], %up: f32[2, 8] = split(%gate_up) {axis=1, sizes=[8, 8]}
  %q_k: f32[2, 8] = linear(%h, %q.stacked.0, _)
  %q: f32[2, 4], %k: f32[2, 4] = split(%q_k) {axis=1, sizes=[4, 4]}
  %half: f32[] = full() {value=0.5}
  %s: f32[2, 8] = silu(%gate)
  %sh: f32[2, 8] = mul(%s, %half)
  %m: f32[2, 8] = mul(%up, %sh)
  return %m, %q, %k
}"""
    w = {n: torch.randn(*s) for n, s in [("wg", (8, 8)), ("wu", (8, 8)), ("wq", (4, 8)), ("wk", (4, 8))]}
    check_golden(before, after, w, (torch.randn(2, 8),), fn=concat_linears)


def test_stacked_params_keep_each_layers_bytes_in_the_compression_report():
    """Stacking q/k/v's packed int4 params must not move their bytes out of the report: every
    original layer keeps the bytes of its rows of the stacked params (found a q_proj reported at
    0 bytes, ratio 16384, on the cuda target before the pass recorded the parts)."""
    import presso
    from presso.ir.analysis import compression_report
    from presso.models.llama import make_llama
    m, ex = make_llama(batch=1, seq=5)
    cm = presso.compile(m, example_inputs=ex, recipe="quantize{weights=int4,group_size=16}")
    want = compression_report(cm.graph)["layers"]
    g = concat_linears(cm.graph.copy())
    assert sum(n.op == "split" for n in g.nodes) == 4     # q/k/v and the gate/up pair of both layers stacked
    got = compression_report(g)["layers"]
    assert [(l["layer"], l["bytes_after"], l["ratio"]) for l in got] == \
        [(l["layer"], l["bytes_after"], l["ratio"]) for l in want]
    q = next(l for l in got if l["layer"] == "layers.0.self_attn.q_proj.weight")
    assert sorted(q["params"].values()) == ["f16[128, 4] rows 0:64", "i4[128, 64] rows 0:64"], q["params"]
    assert compression_report(g)["model_bytes"] == compression_report(cm.graph)["model_bytes"]
