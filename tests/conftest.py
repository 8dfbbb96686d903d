import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

# The heavy tests, left out of the fast subset (`python -m pytest -q -m "not slow"`), which keeps
# at least one test of every module. A test may also carry @pytest.mark.slow itself. An entry is
# test id (with or without its parameters), or the start of parametrized ids ("test_x.py::test_y[a-").
SLOW = [
    # corpora: hundreds of ops or models per test
    "test_corpus_opinfo.py::test_opinfo_corpus_imports_and_matches_eager_torch",
    "test_corpus_opinfo.py::test_opinfo_corpus_floor_over_all_shards",
    "test_corpus_llvm.py::test_opinfo_corpus_compiles_for_llvm_and_matches_torch",
    "test_corpus_llvm.py::test_opinfo_corpus_on_llvm_floor_over_all_shards",
    "test_corpus_onnx.py::test_backend_data_pass_rate",
    "test_corpus_onnx.py::test_light_zoo_matches_onnxruntime",
    "test_corpus_hf.py::test_hf_corpus_pass_rate",
    "test_corpus_hf.py::test_real_minilm_through_transformers_automodel",
    "test_corpus_hf.py::test_readme_hf_example_runs_and_matches_hf_generate",
    *(f"test_corpus_hf.py::test_hf_model_matches_eager[{m}-" for m in
      ("mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "opt", "roberta", "distilbert",
       "t5_encoder", "clip_vision", "whisper_encoder")),
    # through ONNX: llama, gpt2, bert and vit stay in the fast subset (each case < 10 s)
    "test_corpus_hf.py::test_hf_corpus_through_onnx_pass_rate",
    *(f"test_corpus_hf.py::test_hf_model_through_onnx_matches_eager[{m}-" for m in
      ("mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "opt", "roberta", "distilbert",
       "t5_encoder", "clip_vision", "whisper_encoder")),
    # whole programs: the quickstart, Triton's interpreter, TVM builds of larger models
    "test_examples.py::test_quickstart_runs_end_to_end_and_checks_itself",
    "test_triton_kernels.py::test_compressed_linear_kernels_match_the_reference_under_the_interpreter",
    "test_cuda_target.py::test_whole_models_run_through_the_kernels_under_the_interpreter",
    "test_cuda_target.py::test_ragged_batches_decode_through_the_kernels_under_the_interpreter",
    *(f"test_tvm.py::test_every_zoo_model_matches_the_reference_on_llvm[{m}]"
      for m in ("cnn", "gpt2", "llama", "minilm", "vit")),
    "test_tvm.py::test_compressed_llama_matches_the_reference_on_llvm[quantize{weights=int8}]",
    "test_tvm.py::test_compressed_llama_matches_the_reference_on_llvm[quantize{weights=int4,group_size=16,symmetric",
    "test_tvm.py::test_compressed_llama_matches_the_reference_on_llvm[sparsify{pattern=4:8}]",
    "test_tvm.py::test_compressed_llama_matches_the_reference_on_llvm[lowrank",
    "test_tvm.py::test_compressed_llama_matches_the_reference_on_llvm[quantize{weights=int8,activations",
    "test_tvm.py::test_compressed_llama_matches_the_reference_on_llvm[sparsify{pattern=2:4},",
    "test_tvm.py::test_fp16_llama_matches_the_reference_on_llvm",
    "test_tvm.py::test_aarch64_library_runs_under_qemu_and_matches_the_reference[",
    "test_tvm.py::test_llvm_artifact_loads_in_a_fresh_process_without_recompiling",
    "test_tvm.py::test_hf_style_aten_ops_match_torch_on_llvm",
    # the real MiniLM (calibration over real sentences) and ONNX exports of the larger zoo models
    *(f"test_zoo.py::{t}[{m}]" for t in ("test_onnx_import_matches_onnxruntime_and_torch",
                                         "test_torch_and_onnx_canonicalize_to_the_same_ops")
      for m in ("cnn", "vit", "gpt2", "llama", "minilm")),
    "test_zoo.py::test_real_minilm_matches_sentence_transformers",
    "test_decode.py::test_kv_cache_on_the_real_minilm",
    *(f"test_compression.py::{t}" for t in (
        "test_w8a8", "test_w8a7_codes_stay_in_seven_bits_and_projections_share_them",
        "test_w8a7_with_hadamard_rotation_meets_the_int8_bar", "test_wanda_beats_magnitude_at_2_4",
        "test_whitened_svd_beats_plain_svd_at_the_same_ratio",
        "test_auto_nm_spends_the_density_budget_where_error_is_lowest", "test_passes_compose_in_any_order",
        "test_a_pass_that_skips_every_layer_leaves_quantized_codes_untouched",
        "test_the_issue_pipeline_text_runs_end_to_end", "test_report_bytes_are_the_bytes_of_the_packed_tensors")),
    # the accuracy table through transformers.AutoModel: each a calibrated compile of the real MiniLM
    # (its round-to-nearest int8 row stays in the fast subset)
    *(f"test_compression.py::test_real_minilm_through_transformers_automodel_keeps_the_accuracy_table[{r}]" for r in (
        "quantize{weights=int8,activations=int7,rotate=hadamard}",
        "quantize{weights=int4,group_size=128,method=gptq,symmetric=false,rotate=hadamard,act_order=true,damp=0.1}",
        "sparsify{pattern=2:4,method=wanda,sequential=false}", "lowrank{method=whitened,ratio=0.9,sequential=false}")),
    # the real SmolLM2 compressed with calibration
    *(f"test_llm_eval.py::{t}" for t in (
        "test_calibrated_quantization_beats_round_to_nearest_on_real_weights",
        "test_sparsegpt_beats_wanda_beats_magnitude_at_2_4", "test_sequential_calibration_sees_the_quantized_earlier_layers",
        "test_cli_eval_scores_a_saved_artifact",
        "test_a_pass_that_requantizes_calibrated_codes_says_so")),   # on the zoo Llama in test_compression.py
    # the command line: each call is a fresh interpreter
    "test_cli.py::test_inspect_factory_table_ir_and_json",
    "test_cli.py::test_html_renders_in_headless_chromium",
    "test_cli.py::test_diff_and_bench",
]


def _is_slow(nodeid: str) -> bool:
    for s in SLOW:
        if "[" in s and not s.endswith("]"):
            if nodeid.startswith(s):
                return True
        elif nodeid == s or nodeid.startswith(s + "["):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_slow(item.nodeid.split("tests/", 1)[-1]):
            item.add_marker(pytest.mark.slow)
