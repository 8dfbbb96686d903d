"""Kernel selection as an IR rewrite (``select_kernels{target=...}``): golden IR, before -> after,
of the kernel every node of a zoo model runs, and the lowered graph's numbers on the reference
runtime (each target op's reference is the composition it replaces). Graph rewrites only: no GPU,
no kernel launch."""
import io

import pytest
import torch

import presso
from presso.models import LlamaConfig, make_gpt2, make_llama
from presso.passes import run_pipeline
from presso.passes.decode import build_decode_graph, specialize
from presso.runtime import run_graph
from presso.targets import get_target

INT4 = "quantize{weights=int4,group_size=32}"
INT4_EMBEDDINGS = "quantize{weights=int4,group_size=32,embeddings=int4}"


def nodes_text(g) -> str:
    """The printed graph without its param declarations (the golden is about nodes)."""
    return "\n".join(line for line in str(g).splitlines() if not line.startswith("  param "))


def llama_layer():
    return make_llama(batch=1, seq=5, config=LlamaConfig(layers=1))


CUDA_BEFORE = """
graph @Llama(%input_ids: i64[1, 5]) {
  %gather: f32[1, 5, 64] = gather(%embed_tokens.weight, %input_ids)
  %rms_norm_0: f32[1, 5, 64] = rms_norm(%gather, %layers.0.input_layernorm.weight) {eps=1e-05}
  %dequantize_30: f32[128, 64] = dequantize(%linear_13.stacked.0, %linear_13.stacked.1, _) {bits=4, group_size=32}
  %linear_13_linear_15_linear_17: f32[1, 5, 128] = linear(%rms_norm_0, %dequantize_30, _)
  %linear_13: f32[1, 5, 64], %linear_15: f32[1, 5, 32], %linear_17: f32[1, 5, 32] = split(%linear_13_linear_15_linear_17) {axis=2, sizes=[64, 32, 32]}
  %reshape: f32[1, 5, 4, 16] = reshape(%linear_13) {shape=[1, 5, 4, 16]}
  %transpose: f32[1, 4, 5, 16] = transpose(%reshape) {perm=[0, 2, 1, 3]}
  %reshape_4: f32[1, 5, 2, 16] = reshape(%linear_15) {shape=[1, 5, 2, 16]}
  %transpose_5: f32[1, 2, 5, 16] = transpose(%reshape_4) {perm=[0, 2, 1, 3]}
  %rotary: f32[1, 4, 5, 16] = rotary(%transpose, %cos_cached.slice, %sin_cached.slice)
  %rotary_1: f32[1, 2, 5, 16] = rotary(%transpose_5, %cos_cached.slice, %sin_cached.slice)
  %reshape_11: f32[1, 5, 2, 16] = reshape(%linear_17) {shape=[1, 5, 2, 16]}
  %transpose_12: f32[1, 2, 5, 16] = transpose(%reshape_11) {perm=[0, 2, 1, 3]}
  %attention_6: f32[1, 4, 5, 16] = attention(%rotary, %rotary_1, %transpose_12, _) {causal=true}
  %transpose_26: f32[1, 5, 4, 16] = transpose(%attention_6) {perm=[0, 2, 1, 3]}
  %reshape_27: f32[1, 5, 64] = reshape(%transpose_26) {shape=[1, 5, 64]}
  %dequantize_18: f32[64, 64] = dequantize(%layers.0.self_attn.o_proj.weight.q, %layers.0.self_attn.o_proj.weight.scales, _) {bits=4, group_size=32}
  %linear_19: f32[1, 5, 64] = linear(%reshape_27, %dequantize_18, _)
  %add_29: f32[1, 5, 64] = add(%gather, %linear_19)
  %rms_norm_8: f32[1, 5, 64] = rms_norm(%add_29, %layers.0.post_attention_layernorm.weight) {eps=1e-05}
  %dequantize_28: f32[320, 64] = dequantize(%linear_21.stacked.0, %linear_21.stacked.1, _) {bits=4, group_size=32}
  %linear_21_linear_23: f32[1, 5, 320] = linear(%rms_norm_8, %dequantize_28, _)
  %linear_21: f32[1, 5, 160], %linear_23: f32[1, 5, 160] = split(%linear_21_linear_23) {axis=2, sizes=[160, 160]}
  %mul_40: f32[1, 5, 160] = fused_elementwise(%linear_21, %linear_23) {expr="mul(silu(%0),%1)"}
  %dequantize_24: f32[64, 160] = dequantize(%layers.0.mlp.down_proj.weight.q, %layers.0.mlp.down_proj.weight.scales, _) {bits=4, group_size=32}
  %linear_25: f32[1, 5, 64] = linear(%mul_40, %dequantize_24, _)
  %add_42: f32[1, 5, 64] = add(%add_29, %linear_25)
  %rms_norm_10: f32[1, 5, 64] = rms_norm(%add_42, %norm.weight) {eps=1e-05}
  %dequantize_26: f32[256, 64] = dequantize(%lm_head.weight.q, %lm_head.weight.scales, _) {bits=4, group_size=32}
  %linear_27: f32[1, 5, 256] = linear(%rms_norm_10, %dequantize_26, _)
  return %linear_27
}
"""

# norms, RoPE and int4 linears (tiled layout) get kernels; the residual adds become the o / down
# projections' epilogues, the gate / up pair with SwiGLU one paired GEMV; the rest runs torch
CUDA_AFTER = """
graph @Llama(%input_ids: i64[1, 5]) {
  %gather: f32[1, 5, 64] = gather(%embed_tokens.weight, %input_ids)
  %rms_norm_0: f32[1, 5, 64] = cuda.rms_norm(%gather, %layers.0.input_layernorm.weight) {eps=1e-05}
  %linear_13_linear_15_linear_17: f32[1, 5, 128] = cuda.int4_linear(%rms_norm_0, %linear_13.stacked.0, %linear_13.stacked.1, _, _) {group_size=32, tiled=true}
  %linear_13: f32[1, 5, 64], %linear_15: f32[1, 5, 32], %linear_17: f32[1, 5, 32] = split(%linear_13_linear_15_linear_17) {axis=2, sizes=[64, 32, 32]}
  %reshape: f32[1, 5, 4, 16] = reshape(%linear_13) {shape=[1, 5, 4, 16]}
  %transpose: f32[1, 4, 5, 16] = transpose(%reshape) {perm=[0, 2, 1, 3]}
  %reshape_4: f32[1, 5, 2, 16] = reshape(%linear_15) {shape=[1, 5, 2, 16]}
  %transpose_5: f32[1, 2, 5, 16] = transpose(%reshape_4) {perm=[0, 2, 1, 3]}
  %rotary: f32[1, 4, 5, 16] = cuda.rotary(%transpose, %cos_cached.slice, %sin_cached.slice)
  %rotary_1: f32[1, 2, 5, 16] = cuda.rotary(%transpose_5, %cos_cached.slice, %sin_cached.slice)
  %reshape_11: f32[1, 5, 2, 16] = reshape(%linear_17) {shape=[1, 5, 2, 16]}
  %transpose_12: f32[1, 2, 5, 16] = transpose(%reshape_11) {perm=[0, 2, 1, 3]}
  %attention_6: f32[1, 4, 5, 16] = attention(%rotary, %rotary_1, %transpose_12, _) {causal=true}
  %transpose_26: f32[1, 5, 4, 16] = transpose(%attention_6) {perm=[0, 2, 1, 3]}
  %reshape_27: f32[1, 5, 64] = reshape(%transpose_26) {shape=[1, 5, 64]}
  %linear_19: f32[1, 5, 64] = cuda.int4_linear(%reshape_27, %layers.0.self_attn.o_proj.weight.q, %layers.0.self_attn.o_proj.weight.scales, _, _, %gather) {group_size=32, tiled=true, epilogue="add(%0,%1)", acc=1}
  %rms_norm_8: f32[1, 5, 64] = cuda.rms_norm(%linear_19, %layers.0.post_attention_layernorm.weight) {eps=1e-05}
  %linear_21_linear_23: f32[1, 5, 160] = cuda.int4_linear(%rms_norm_8, %linear_21.stacked.0, %linear_21.stacked.1, _, _) {group_size=32, tiled=true, pair=true, epilogue="mul(silu(%0),%1)"}
  %linear_25: f32[1, 5, 64] = cuda.int4_linear(%linear_21_linear_23, %layers.0.mlp.down_proj.weight.q, %layers.0.mlp.down_proj.weight.scales, _, _, %linear_19) {group_size=32, tiled=true, epilogue="add(%0,%1)", acc=1}
  %rms_norm_10: f32[1, 5, 64] = cuda.rms_norm(%linear_25, %norm.weight) {eps=1e-05}
  %linear_27: f32[1, 5, 256] = cuda.int4_linear(%rms_norm_10, %lm_head.weight.q, %lm_head.weight.scales, _, _) {group_size=32, tiled=true}
  return %linear_27
}
"""


def check_selection(target: str, passes: list, before_text: str, after_text: str) -> None:
    """A one-layer Llama through ``passes``, then ``select_kernels{target=...}``: both golden; selecting
    again changes nothing; the lowered graph's reference gives the same numbers, bit for bit."""
    m, ex = llama_layer()
    before, _ = run_pipeline(presso.api.import_model(m, ex, None), passes)
    assert nodes_text(before) == before_text.strip()
    after, _ = run_pipeline(before, [f"select_kernels{{target={target}}}"])
    assert nodes_text(after) == after_text.strip()
    again, _ = run_pipeline(after, [f"select_kernels{{target={target}}}"])
    assert str(again) == str(after)
    torch.testing.assert_close(run_graph(after, *ex)[0], run_graph(before, *ex)[0], rtol=0, atol=0)


def test_cuda_kernel_choice_of_a_llama_layer():
    check_selection("cuda", ["canonicalize", INT4, "concat_linears", "fuse"], CUDA_BEFORE, CUDA_AFTER)


CUDA_STEP_BEFORE = """
graph @Llama(%input_ids: i64[batch, 1], %positions: i64[1], %starts: i64[batch], %cache.0.k: f32[batch, 2, 32, 16], %cache.0.v: f32[batch, 2, 32, 16]) {
  %gather_0: f32[1, 16] = gather(%cos_cached, %positions)
  %gather_1: f32[1, 16] = gather(%sin_cached, %positions)
  %gather: f32[batch, 1, 64] = gather(%embed_tokens.weight, %input_ids)
  %rms_norm_0: f32[batch, 1, 64] = cuda.rms_norm(%gather, %layers.0.input_layernorm.weight) {eps=1e-05}
  %linear_13_linear_15_linear_17: f32[batch, 1, 128] = cuda.int4_linear(%rms_norm_0, %linear_13.stacked.0, %linear_13.stacked.1, _, _) {group_size=32, tiled=true}
  %linear_13: f32[batch, 1, 64], %linear_15: f32[batch, 1, 32], %linear_17: f32[batch, 1, 32] = split(%linear_13_linear_15_linear_17) {axis=2, sizes=[64, 32, 32]}
  %reshape: f32[batch, 1, 4, 16] = reshape(%linear_13) {shape=[batch, 1, 4, 16]}
  %transpose: f32[batch, 4, 1, 16] = transpose(%reshape) {perm=[0, 2, 1, 3]}
  %reshape_4: f32[batch, 1, 2, 16] = reshape(%linear_15) {shape=[batch, 1, 2, 16]}
  %transpose_5: f32[batch, 2, 1, 16] = transpose(%reshape_4) {perm=[0, 2, 1, 3]}
  %rotary: f32[batch, 4, 1, 16] = cuda.rotary(%transpose, %gather_0, %gather_1)
  %rotary_1: f32[batch, 2, 1, 16] = cuda.rotary(%transpose_5, %gather_0, %gather_1)
  %reshape_11: f32[batch, 1, 2, 16] = reshape(%linear_17) {shape=[batch, 1, 2, 16]}
  %transpose_12: f32[batch, 2, 1, 16] = transpose(%reshape_11) {perm=[0, 2, 1, 3]}
  %cache.0.k.new: f32[batch, 2, 32, 16] = cache_update(%cache.0.k, %rotary_1, %positions) {axis=2}
  %cache.0.v.new: f32[batch, 2, 32, 16] = cache_update(%cache.0.v, %transpose_12, %positions) {axis=2}
  %attention_cached: f32[batch, 4, 1, 16] = attention_cached(%rotary, %cache.0.k.new, %cache.0.v.new, %positions, %starts)
  %transpose_26: f32[batch, 1, 4, 16] = transpose(%attention_cached) {perm=[0, 2, 1, 3]}
  %reshape_27: f32[batch, 1, 64] = reshape(%transpose_26) {shape=[batch, 1, 64]}
  %linear_19: f32[batch, 1, 64] = cuda.int4_linear(%reshape_27, %layers.0.self_attn.o_proj.weight.q, %layers.0.self_attn.o_proj.weight.scales, _, _, %gather) {group_size=32, tiled=true, epilogue="add(%0,%1)", acc=1}
  %rms_norm_8: f32[batch, 1, 64] = cuda.rms_norm(%linear_19, %layers.0.post_attention_layernorm.weight) {eps=1e-05}
  %linear_21_linear_23: f32[batch, 1, 160] = cuda.int4_linear(%rms_norm_8, %linear_21.stacked.0, %linear_21.stacked.1, _, _) {group_size=32, tiled=true, pair=true, epilogue="mul(silu(%0),%1)"}
  %linear_25: f32[batch, 1, 64] = cuda.int4_linear(%linear_21_linear_23, %layers.0.mlp.down_proj.weight.q, %layers.0.mlp.down_proj.weight.scales, _, _, %linear_19) {group_size=32, tiled=true, epilogue="add(%0,%1)", acc=1}
  %rms_norm_10: f32[batch, 1, 64] = cuda.rms_norm(%linear_25, %norm.weight) {eps=1e-05}
  %linear_27: f32[batch, 1, 256] = cuda.int4_linear(%rms_norm_10, %lm_head.weight.q, %lm_head.weight.scales, _, _) {group_size=32, tiled=true}
  return %linear_27, %cache.0.k.new, %cache.0.v.new
}
"""

# the decode step adds the layer's RoPE + cache writes as one launch and the GQA decode kernel
CUDA_STEP_AFTER = """
graph @Llama(%input_ids: i64[batch, 1], %positions: i64[1], %starts: i64[batch], %cache.0.k: f32[batch, 2, 32, 16], %cache.0.v: f32[batch, 2, 32, 16]) {
  %gather_0: f32[1, 16] = gather(%cos_cached, %positions)
  %gather_1: f32[1, 16] = gather(%sin_cached, %positions)
  %gather: f32[batch, 1, 64] = gather(%embed_tokens.weight, %input_ids)
  %rms_norm_0: f32[batch, 1, 64] = cuda.rms_norm(%gather, %layers.0.input_layernorm.weight) {eps=1e-05}
  %linear_13_linear_15_linear_17: f32[batch, 1, 128] = cuda.int4_linear(%rms_norm_0, %linear_13.stacked.0, %linear_13.stacked.1, _, _) {group_size=32, tiled=true}
  %linear_13: f32[batch, 1, 64], %linear_15: f32[batch, 1, 32], %linear_17: f32[batch, 1, 32] = split(%linear_13_linear_15_linear_17) {axis=2, sizes=[64, 32, 32]}
  %reshape: f32[batch, 1, 4, 16] = reshape(%linear_13) {shape=[batch, 1, 4, 16]}
  %transpose: f32[batch, 4, 1, 16] = transpose(%reshape) {perm=[0, 2, 1, 3]}
  %reshape_4: f32[batch, 1, 2, 16] = reshape(%linear_15) {shape=[batch, 1, 2, 16]}
  %transpose_5: f32[batch, 2, 1, 16] = transpose(%reshape_4) {perm=[0, 2, 1, 3]}
  %reshape_11: f32[batch, 1, 2, 16] = reshape(%linear_17) {shape=[batch, 1, 2, 16]}
  %transpose_12: f32[batch, 2, 1, 16] = transpose(%reshape_11) {perm=[0, 2, 1, 3]}
  %rotary: f32[batch, 4, 1, 16], %cache.0.k.new: f32[batch, 2, 32, 16], %cache.0.v.new: f32[batch, 2, 32, 16] = cuda.rotary_into_caches(%transpose, %transpose_5, %transpose_12, %gather_0, %gather_1, %cache.0.k, %cache.0.v, %positions) {axis=2}
  %attention_cached: f32[batch, 4, 1, 16] = cuda.gqa_decode_attention(%rotary, %cache.0.k.new, %cache.0.v.new, %positions, %starts)
  %transpose_26: f32[batch, 1, 4, 16] = transpose(%attention_cached) {perm=[0, 2, 1, 3]}
  %reshape_27: f32[batch, 1, 64] = reshape(%transpose_26) {shape=[batch, 1, 64]}
  %linear_19: f32[batch, 1, 64] = cuda.int4_linear(%reshape_27, %layers.0.self_attn.o_proj.weight.q, %layers.0.self_attn.o_proj.weight.scales, _, _, %gather) {group_size=32, tiled=true, epilogue="add(%0,%1)", acc=1}
  %rms_norm_8: f32[batch, 1, 64] = cuda.rms_norm(%linear_19, %layers.0.post_attention_layernorm.weight) {eps=1e-05}
  %linear_21_linear_23: f32[batch, 1, 160] = cuda.int4_linear(%rms_norm_8, %linear_21.stacked.0, %linear_21.stacked.1, _, _) {group_size=32, tiled=true, pair=true, epilogue="mul(silu(%0),%1)"}
  %linear_25: f32[batch, 1, 64] = cuda.int4_linear(%linear_21_linear_23, %layers.0.mlp.down_proj.weight.q, %layers.0.mlp.down_proj.weight.scales, _, _, %linear_19) {group_size=32, tiled=true, epilogue="add(%0,%1)", acc=1}
  %rms_norm_10: f32[batch, 1, 64] = cuda.rms_norm(%linear_25, %norm.weight) {eps=1e-05}
  %linear_27: f32[batch, 1, 256] = cuda.int4_linear(%rms_norm_10, %lm_head.weight.q, %lm_head.weight.scales, _, _) {group_size=32, tiled=true}
  return %linear_27, %cache.0.k.new, %cache.0.v.new
}
"""


def test_cuda_kernel_choice_of_a_decode_step():
    m, ex = llama_layer()
    cm = presso.compile(m, example_inputs=ex, recipe=f"{INT4},concat_linears,fuse,select_kernels{{target=cuda}}",
                        generation=True, max_len=32, verbose=False)
    step = specialize(build_decode_graph(cm.graph, 32)[0], {"seq": 1})
    assert nodes_text(step) == CUDA_STEP_BEFORE.strip()
    before = step.copy()
    get_target("cuda").select_kernels(step)
    assert nodes_text(step) == CUDA_STEP_AFTER.strip()
    ids, pos, starts = torch.tensor([[7], [3]]), torch.tensor([4]), torch.tensor([0, 2])
    caches = [torch.randn(2, 2, 32, 16) for _ in range(2)]
    for want, got in zip(run_graph(before, ids, pos, starts, *caches), run_graph(step, ids, pos, starts, *caches)):
        torch.testing.assert_close(got, want)


def test_print_ir_after_select_kernels_and_the_numeric_check_on_a_lowered_graph():
    m, ex = llama_layer()
    out = io.StringIO()
    import contextlib
    with contextlib.redirect_stdout(out):
        cm = presso.compile(m, example_inputs=ex, recipe=f"{INT4},concat_linears,fuse,select_kernels{{target=cuda}}",
                            print_ir_after="select_kernels", check="numeric", verbose=False)
    text = out.getvalue()
    assert "// ----- IR after select_kernels{target=cuda} -----" in text
    assert text.count("= cuda.int4_linear(") == 5 and "pair=true" in text, text
    assert cm.report()["passes"][-1]["max_rel_err"] == 0.0
    ref = presso.compile(m, example_inputs=ex, recipe=INT4, verbose=False)
    torch.testing.assert_close(cm(*ex), ref(*ex))


LLVM_BEFORE = """
graph @Llama(%input_ids: i64[1, 5]) {
  %gather_dequantize: f32[1, 5, 64] = gather_dequantize(%input_ids, %embed_tokens.weight.q, %embed_tokens.weight.scales, _) {bits=4, group_size=32}
  %rms_norm_0: f32[1, 5, 64] = rms_norm(%gather_dequantize, %layers.0.input_layernorm.weight) {eps=1e-05}
  %dequantize: f32[64, 64] = dequantize(%layers.0.self_attn.q_proj.weight.q, %layers.0.self_attn.q_proj.weight.scales, _) {bits=4, group_size=32}
  %linear_13: f32[1, 5, 64] = linear(%rms_norm_0, %dequantize, _)
  %reshape: f32[1, 5, 4, 16] = reshape(%linear_13) {shape=[1, 5, 4, 16]}
  %transpose: f32[1, 4, 5, 16] = transpose(%reshape) {perm=[0, 2, 1, 3]}
  %dequantize_14: f32[32, 64] = dequantize(%layers.0.self_attn.k_proj.weight.q, %layers.0.self_attn.k_proj.weight.scales, _) {bits=4, group_size=32}
  %linear_15: f32[1, 5, 32] = linear(%rms_norm_0, %dequantize_14, _)
  %reshape_4: f32[1, 5, 2, 16] = reshape(%linear_15) {shape=[1, 5, 2, 16]}
  %transpose_5: f32[1, 2, 5, 16] = transpose(%reshape_4) {perm=[0, 2, 1, 3]}
  %dequantize_16: f32[32, 64] = dequantize(%layers.0.self_attn.v_proj.weight.q, %layers.0.self_attn.v_proj.weight.scales, _) {bits=4, group_size=32}
  %linear_17: f32[1, 5, 32] = linear(%rms_norm_0, %dequantize_16, _)
  %rotary: f32[1, 4, 5, 16] = rotary(%transpose, %cos_cached.slice, %sin_cached.slice)
  %rotary_1: f32[1, 2, 5, 16] = rotary(%transpose_5, %cos_cached.slice, %sin_cached.slice)
  %reshape_11: f32[1, 5, 2, 16] = reshape(%linear_17) {shape=[1, 5, 2, 16]}
  %transpose_12: f32[1, 2, 5, 16] = transpose(%reshape_11) {perm=[0, 2, 1, 3]}
  %attention_6: f32[1, 4, 5, 16] = attention(%rotary, %rotary_1, %transpose_12, _) {causal=true}
  %transpose_26: f32[1, 5, 4, 16] = transpose(%attention_6) {perm=[0, 2, 1, 3]}
  %reshape_27: f32[1, 5, 64] = reshape(%transpose_26) {shape=[1, 5, 64]}
  %dequantize_18: f32[64, 64] = dequantize(%layers.0.self_attn.o_proj.weight.q, %layers.0.self_attn.o_proj.weight.scales, _) {bits=4, group_size=32}
  %linear_19: f32[1, 5, 64] = linear(%reshape_27, %dequantize_18, _)
  %add_29: f32[1, 5, 64] = add(%gather_dequantize, %linear_19)
  %rms_norm_8: f32[1, 5, 64] = rms_norm(%add_29, %layers.0.post_attention_layernorm.weight) {eps=1e-05}
  %dequantize_20: f32[160, 64] = dequantize(%layers.0.mlp.gate_proj.weight.q, %layers.0.mlp.gate_proj.weight.scales, _) {bits=4, group_size=32}
  %linear_21: f32[1, 5, 160] = linear(%rms_norm_8, %dequantize_20, _)
  %silu: f32[1, 5, 160] = silu(%linear_21)
  %dequantize_22: f32[160, 64] = dequantize(%layers.0.mlp.up_proj.weight.q, %layers.0.mlp.up_proj.weight.scales, _) {bits=4, group_size=32}
  %linear_23: f32[1, 5, 160] = linear(%rms_norm_8, %dequantize_22, _)
  %mul_40: f32[1, 5, 160] = mul(%silu, %linear_23)
  %dequantize_24: f32[64, 160] = dequantize(%layers.0.mlp.down_proj.weight.q, %layers.0.mlp.down_proj.weight.scales, _) {bits=4, group_size=32}
  %linear_25: f32[1, 5, 64] = linear(%mul_40, %dequantize_24, _)
  %add_42: f32[1, 5, 64] = add(%add_29, %linear_25)
  %rms_norm_10: f32[1, 5, 64] = rms_norm(%add_42, %norm.weight) {eps=1e-05}
  %dequantize_26: f32[256, 64] = dequantize(%lm_head.weight.q, %lm_head.weight.scales, _) {bits=4, group_size=32}
  %linear_27: f32[1, 5, 256] = linear(%rms_norm_10, %dequantize_26, _)
  return %linear_27
}
"""

# every linear reads its int4 codes prepacked (llvm.quant_linear); the lookup reads its own table
# (Llama's head is not tied); TVM fuses the rest itself
LLVM_AFTER = """
graph @Llama(%input_ids: i64[1, 5]) {
  %gather_dequantize: f32[1, 5, 64] = gather_dequantize(%input_ids, %embed_tokens.weight.q, %embed_tokens.weight.scales, _) {bits=4, group_size=32}
  %rms_norm_0: f32[1, 5, 64] = rms_norm(%gather_dequantize, %layers.0.input_layernorm.weight) {eps=1e-05}
  %linear_13: f32[1, 5, 64] = llvm.quant_linear(%rms_norm_0, %layers.0.self_attn.q_proj.weight.q, %layers.0.self_attn.q_proj.weight.scales, _, _) {bits=4, group_size=32}
  %reshape: f32[1, 5, 4, 16] = reshape(%linear_13) {shape=[1, 5, 4, 16]}
  %transpose: f32[1, 4, 5, 16] = transpose(%reshape) {perm=[0, 2, 1, 3]}
  %linear_15: f32[1, 5, 32] = llvm.quant_linear(%rms_norm_0, %layers.0.self_attn.k_proj.weight.q, %layers.0.self_attn.k_proj.weight.scales, _, _) {bits=4, group_size=32}
  %reshape_4: f32[1, 5, 2, 16] = reshape(%linear_15) {shape=[1, 5, 2, 16]}
  %transpose_5: f32[1, 2, 5, 16] = transpose(%reshape_4) {perm=[0, 2, 1, 3]}
  %linear_17: f32[1, 5, 32] = llvm.quant_linear(%rms_norm_0, %layers.0.self_attn.v_proj.weight.q, %layers.0.self_attn.v_proj.weight.scales, _, _) {bits=4, group_size=32}
  %rotary: f32[1, 4, 5, 16] = rotary(%transpose, %cos_cached.slice, %sin_cached.slice)
  %rotary_1: f32[1, 2, 5, 16] = rotary(%transpose_5, %cos_cached.slice, %sin_cached.slice)
  %reshape_11: f32[1, 5, 2, 16] = reshape(%linear_17) {shape=[1, 5, 2, 16]}
  %transpose_12: f32[1, 2, 5, 16] = transpose(%reshape_11) {perm=[0, 2, 1, 3]}
  %attention_6: f32[1, 4, 5, 16] = attention(%rotary, %rotary_1, %transpose_12, _) {causal=true}
  %transpose_26: f32[1, 5, 4, 16] = transpose(%attention_6) {perm=[0, 2, 1, 3]}
  %reshape_27: f32[1, 5, 64] = reshape(%transpose_26) {shape=[1, 5, 64]}
  %linear_19: f32[1, 5, 64] = llvm.quant_linear(%reshape_27, %layers.0.self_attn.o_proj.weight.q, %layers.0.self_attn.o_proj.weight.scales, _, _) {bits=4, group_size=32}
  %add_29: f32[1, 5, 64] = add(%gather_dequantize, %linear_19)
  %rms_norm_8: f32[1, 5, 64] = rms_norm(%add_29, %layers.0.post_attention_layernorm.weight) {eps=1e-05}
  %linear_21: f32[1, 5, 160] = llvm.quant_linear(%rms_norm_8, %layers.0.mlp.gate_proj.weight.q, %layers.0.mlp.gate_proj.weight.scales, _, _) {bits=4, group_size=32}
  %silu: f32[1, 5, 160] = silu(%linear_21)
  %linear_23: f32[1, 5, 160] = llvm.quant_linear(%rms_norm_8, %layers.0.mlp.up_proj.weight.q, %layers.0.mlp.up_proj.weight.scales, _, _) {bits=4, group_size=32}
  %mul_40: f32[1, 5, 160] = mul(%silu, %linear_23)
  %linear_25: f32[1, 5, 64] = llvm.quant_linear(%mul_40, %layers.0.mlp.down_proj.weight.q, %layers.0.mlp.down_proj.weight.scales, _, _) {bits=4, group_size=32}
  %add_42: f32[1, 5, 64] = add(%add_29, %linear_25)
  %rms_norm_10: f32[1, 5, 64] = rms_norm(%add_42, %norm.weight) {eps=1e-05}
  %linear_27: f32[1, 5, 256] = llvm.quant_linear(%rms_norm_10, %lm_head.weight.q, %lm_head.weight.scales, _, _) {bits=4, group_size=32}
  return %linear_27
}
"""


def test_llvm_kernel_choice_of_a_llama_layer():
    check_selection("llvm", ["canonicalize", INT4_EMBEDDINGS], LLVM_BEFORE, LLVM_AFTER)


def test_tvm_targets_choose_the_tied_lookup_and_the_w8a7_kernel_for_their_machine():
    from presso.codegen.tvm import int8_avx2
    from presso.codegen.tvm.build import host_cpu_target
    m, ex = make_gpt2(batch=1, seq=8)
    g = presso.api.import_model(m, ex, None)
    tied, _ = run_pipeline(g, ["canonicalize", INT4_EMBEDDINGS, "select_kernels{target=llvm}"])
    (lookup,) = [n for n in tied.nodes if n.op == "llvm.tied_gather_dequant"]
    head = tied.outputs[0].node
    assert head.op == "llvm.quant_linear" and head.inputs[1:4] == lookup.inputs[1:4]
    assert not any(n.op in ("linear", "dequantize", "gather_dequantize") for n in tied.nodes)
    m, ex = llama_layer()
    g = presso.api.import_model(m, ex, None)
    w8a7, _ = run_pipeline(g, ["canonicalize", "quantize{weights=int8,activations=int7}"])
    for target in ("llvm", "aarch64"):           # the AVX2 kernel only for an x86 host that has AVX2
        lowered, _ = run_pipeline(w8a7, [f"select_kernels{{target={target}}}"])
        ops = {n.op for n in lowered.nodes if n.op in ("linear_int8", "llvm.int8_linear", "llvm.w8a7_avx2_linear")}
        avx2 = target == "llvm" and int8_avx2.fits(host_cpu_target(), 64, 64)
        assert ops == {"llvm.w8a7_avx2_linear" if avx2 else "llvm.int8_linear"}, (target, ops)
        torch.testing.assert_close(run_graph(lowered, *ex)[0], run_graph(w8a7, *ex)[0], rtol=0, atol=0)


def test_a_target_op_whose_epilogue_does_not_fit_its_operands_is_refused_naming_the_node():
    from presso.errors import VerificationError
    text = """
graph @g(%x: f32[2, 64], %e: f32[2, 8]) {
  param %q: i4[8, 64]
  param %s: f16[8, 2]
  %y: f32[2, 8] = cuda.int4_linear(%x, %q, %s, _, _, %e) {group_size=32ATTRS}
  return %y
}"""
    with pytest.raises(VerificationError, match=r"node %y \(cuda.int4_linear\): operands past the bias are an "
                                                r"epilogue's: set 'epilogue'"):
        presso.parse(text.replace("ATTRS", ""))
    with pytest.raises(VerificationError, match=r"node %y \(cuda.int4_linear\): epilogue 'add\(%0,%2\)' with its "
                                                r"result at %0 reads operands past its 2"):
        presso.parse(text.replace("ATTRS", ', epilogue="add(%0,%2)"'))
    weights = {"q": torch.randint(0, 256, (8, 32), dtype=torch.uint8), "s": torch.rand(8, 2).half()}
    g = presso.parse(text.replace("ATTRS", ', epilogue="add(%0,%1)", acc=1'), weights)
    x, e = torch.randn(2, 64), torch.randn(2, 8)
    y = x @ presso.ir.get_op("dequantize").run([g.params["q"].data, g.params["s"].data, None],
                                               {"bits": 4, "group_size": 32, "dtype": "f32"})[0].T
    torch.testing.assert_close(run_graph(g, x, e)[0], e + y)


OLD_CUDA_ARTIFACT = """
import json, os, sys, torch
os.environ["TRITON_INTERPRET"] = "1"
import presso
from presso.models import LlamaConfig, make_llama
m, ex = make_llama(batch=1, seq=5, config=LlamaConfig(layers=1))
ref = presso.compile(m, example_inputs=ex, recipe="quantize{weights=int4,group_size=32}", verbose=False)
path = ref.save(sys.argv[1] + "/m.presso")
manifest = json.loads((path / "manifest.json").read_text())
manifest["target"] = "cuda"          # a cuda artifact from before kernels were selected in the IR
(path / "manifest.json").write_text(json.dumps(manifest))
loaded = presso.load(path)
assert not any(n.op == "dequantize" for n in loaded.graph.nodes)
assert sum(n.op == "cuda.int4_linear" for n in loaded.graph.nodes) == 8, loaded.graph     # 7 + the head
assert set(loaded._runtime.program.kernels.values()) >= {"triton:int4_linear", "triton:rms_norm", "triton:rotary"}
torch.testing.assert_close(loaded(*ex), ref(*ex), rtol=1e-5, atol=1e-5)
print("loaded ok")
"""


def test_a_cuda_artifact_saved_before_kernel_selection_selects_its_kernels_on_load(tmp_path):
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", OLD_CUDA_ARTIFACT, str(tmp_path)], capture_output=True, text=True,
                       env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert r.returncode == 0 and "loaded ok" in r.stdout, r.stderr[-3000:]
