"""generate() as Hugging Face's generate does it: sampling controls (repetition penalty, top-p,
eos lists, stop sequences, max_time), streaming, and ragged batches (left padding), against
transformers' own generate on a small random Llama and against each prompt decoded alone."""
import functools
import os

import pytest
import torch

import presso
from presso import InputError
from presso.models import make_gpt2, make_llama

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.lru_cache(maxsize=None)
def hf_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 8))
    return model, ids, presso.compile(model, example_inputs=(ids,), generation=True, max_len=48)


def hf_generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=kw.pop("max_new_tokens"), pad_token_id=kw.pop("pad_token_id", 0),
                              **kw)


def test_greedy_with_repetition_penalty_equals_transformers():
    model, ids, cm = hf_llama()
    want = hf_generate(model, ids, do_sample=False, max_new_tokens=16, repetition_penalty=1.3)
    assert torch.equal(cm.generate(ids, 16, repetition_penalty=1.3), want)
    assert not torch.equal(cm.generate(ids, 16), want)            # the penalty changes these tokens
    assert torch.equal(cm.generate(ids, 16, repetition_penalty=1.0), cm.generate(ids, 16))


@pytest.mark.parametrize("seed", [0, 1])
def test_seeded_sampling_equals_transformers_with_the_same_seed(seed):
    """temperature, top-k, top-p and a repetition penalty, in Hugging Face's order: the same
    seed draws the same tokens; and the same seed twice gives the same tokens."""
    model, ids, cm = hf_llama()
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1)
    torch.manual_seed(seed)
    want = hf_generate(model, ids, max_new_tokens=12, **kw)
    got = cm.generate(ids, 12, seed=seed, **kw)
    assert torch.equal(got, want)
    assert torch.equal(cm.generate(ids, 12, seed=seed, **kw), got)


def test_top_p_keeps_the_smallest_set_past_p():
    _, ids, cm = hf_llama()
    greedy = cm.generate(ids, 10)
    # a tiny top_p keeps only the most likely token: sampling is greedy, whatever the seed
    for seed in (0, 1, 2):
        assert torch.equal(cm.generate(ids, 10, do_sample=True, top_p=1e-6, seed=seed), greedy)
    wide = [cm.generate(ids, 10, do_sample=True, top_p=1.0, seed=s) for s in range(3)]
    assert any(not torch.equal(w, greedy) for w in wide)


def test_eos_lists_equal_transformers():
    model, ids, cm = hf_llama()
    full = cm.generate(ids, 16)
    eos = [int(full[0, 8 + 4]), int(full[1, 8 + 2])]      # tokens each sequence emits
    want = hf_generate(model, ids, do_sample=False, max_new_tokens=16, eos_token_id=eos, pad_token_id=5)
    got = cm.generate(ids, 16, eos_token_id=eos, pad_token_id=5)
    assert torch.equal(got, want) and got.shape[1] < full.shape[1]
    assert torch.equal(cm.generate(ids, 16, eos_token_id=eos[1:]), cm.generate(ids, 16, eos_token_id=eos[1]))
    # a list of prompts gives each its tokens up to and including its eos
    rows = cm.generate([ids[0], ids[1]], 16, eos_token_id=eos)
    for r, row in enumerate(rows):
        new = full[r, 8:]
        first = min(int((new == e).nonzero()[0]) for e in eos if (new == e).any())
        assert torch.equal(row, full[r, :8 + first + 1])


def test_stop_sequences_end_a_sequence_where_they_complete():
    _, ids, cm = hf_llama()
    full = cm.generate(ids, 16)
    stop = full[0, 8 + 3:8 + 6].tolist()             # three tokens the first sequence emits
    rows = cm.generate([ids[0], ids[1]], 16, stop_sequences=[stop, [127, 126, 125, 124]])
    assert torch.equal(rows[0], full[0, :8 + 6])
    assert torch.equal(rows[1], full[1]) or rows[1][-3:].tolist() == stop
    # the batch tensor: the finished sequence is filled with the pad id until the other ends
    got = cm.generate(ids, 16, stop_sequences=[stop], pad_token_id=3)
    assert torch.equal(got[0, :8 + 6], full[0, :8 + 6]) and (got[0, 8 + 6:] == 3).all()
    assert torch.equal(got[1], full[1])


def test_max_time_stops_after_the_token_that_runs_past_it():
    _, ids, cm = hf_llama()
    assert cm.generate(ids, 16, max_time=1e-9).shape == (2, 9)      # checked after each token: one
    assert cm.generate(ids, 16, max_time=1e6).shape == (2, 24)
    import time

    def slow(tokens):
        time.sleep(0.2)
    got = cm.generate(ids, 40, max_time=0.5, streamer=slow)
    assert 9 <= got.shape[1] <= 8 + 4


def test_streaming_gives_each_steps_tokens_as_they_come():
    _, ids, cm = hf_llama()
    full = cm.generate(ids, 10)
    seen = []
    assert torch.equal(cm.generate(ids, 10, streamer=seen.append), full)
    assert torch.equal(torch.stack(seen, 1), full[:, 8:])
    it = cm.generate_stream(ids, 10)
    assert torch.equal(torch.stack(list(it), 1), full[:, 8:])

    class Recorder:        # transformers' streamer protocol: the prompt, each step's tokens, end
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, t):
            self.puts.append(t)

        def end(self):
            self.ended = True
    rec = Recorder()
    cm.generate(ids, 10, streamer=rec)
    assert rec.ended and torch.equal(rec.puts[0], ids) and torch.equal(torch.stack(rec.puts[1:], 1), full[:, 8:])
    # sampled tokens stream too, reproducibly
    a = list(cm.generate_stream(ids, 6, do_sample=True, seed=4))
    assert torch.equal(torch.stack(a, 1), cm.generate(ids, 6, do_sample=True, seed=4)[:, 8:])


def left_padded(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


def test_ragged_batch_equals_transformers_and_each_prompt_alone():
    model, _, cm = hf_llama()
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 7, 12, 20)]
    ids, mask = left_padded(prompts)
    want = hf_generate(model, ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    assert torch.equal(cm.generate(ids, 10, attention_mask=mask), want)
    assert not torch.equal(cm.generate(ids, 10), want)              # without the mask the pads are tokens
    rows = cm.generate(prompts, 10)
    assert all(torch.equal(r, cm.generate(p[None], 10)[0]) for r, p in zip(rows, prompts))
    assert all(torch.equal(r, w[20 - len(p):]) for r, w, p in zip(rows, want, prompts))


@pytest.mark.parametrize("make", [make_llama, make_gpt2])
def test_ragged_batch_on_the_zoo_equals_each_prompt_alone(make):
    """Llama (RoPE: slots give the distances) and GPT-2 (an absolute position table, looked up at
    each sequence's own positions)."""
    m, ins = make(batch=2, seq=24)
    cm = presso.compile(m, example_inputs=ins, generation=True, max_len=40)
    prompts = [ins[0][0, :3], ins[0][1, :7], ins[0][0, 4:16], ins[0][1, 2:22]]
    rows = cm.generate(prompts, 12)
    for r, p in zip(rows, prompts):
        assert torch.equal(r, cm.generate(p[None], 12)[0])
    ids, mask = left_padded(prompts, pad=9)
    assert torch.equal(cm.generate(ids, 12, attention_mask=mask)[:, 20:], torch.stack([r[len(p):] for r, p in
                                                                                         zip(rows, prompts)]))
    # a repetition penalty counts each prompt's own tokens (token 0 too), never the pads (0 here)
    prompts[0] = torch.tensor([0, 5, 0])
    rows = cm.generate(prompts, 12, repetition_penalty=3.0)
    for r, p in zip(rows, prompts):
        assert torch.equal(r, cm.generate(p[None], 12, repetition_penalty=3.0)[0])


def test_bad_batches_are_refused_by_name():
    _, ids, cm = hf_llama()
    ones = torch.ones_like(ids)
    right = ones.clone()
    right[1, -2:] = 0
    bad = [((ids,), dict(attention_mask=right), r"attention_mask row 1 is not left-padded"),
           ((ids,), dict(attention_mask=ones[:, :4]), r"attention_mask must be a tensor of input_ids' shape \[2, 8\]"),
           ((ids,), dict(attention_mask=ones * 2), r"attention_mask must hold 0 \(pad\) and 1 \(token\)"),
           ((ids,), dict(attention_mask=ones * 0), r"attention_mask row 0 has no token"),
           (([ids[0]],), dict(attention_mask=ones), r"attention_mask goes with an input_ids tensor"),
           (([],), {}, r"input_ids is an empty list"),
           (([ids[0], []],), {}, r"input_ids\[1\] is an empty prompt"),
           (([ids[0], "hello"],), {}, r"input_ids\[1\] must be a 1-D tensor or list of token ids, got str"),
           ((ids.float(),), {}, r"input_ids must be i64\[batch, seq\] or a list of prompts, got torch.float32"),
           (([[1, 2, 300]],), {}, r"input_ids\[0, 2\] = 300 is not a token id \(0 <= id < 128")]
    for args, kw, message in bad:
        with pytest.raises(InputError, match=message):
            cm.generate(*args, 4, **kw)


def test_every_option_rejects_bad_values_by_name():
    _, ids, cm = hf_llama()
    bad = [(dict(top_p=0), r"top_p must be a number in \(0, 1\] \(1 keeps every token\), got 0"),
           (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
           (dict(top_p="0.9"), r"top_p must be a number in \(0, 1\] .*, got '0.9'"),
           (dict(repetition_penalty=0), r"repetition_penalty must be a number > 0 \(1 is none"),
           (dict(repetition_penalty=-1.2), r"repetition_penalty must be a number > 0"),
           (dict(repetition_penalty=float("inf")), r"repetition_penalty must be a number > 0"),
           (dict(eos_token_id=[]), r"eos_token_id must be a token id \(0 <= id < 128, the vocabulary size\), "
                                   r"a non-empty list of them or None, got \[\]"),
           (dict(eos_token_id=[3, 128]), r"eos_token_id must be a token id \(0 <= id < 128.*got 128"),
           (dict(eos_token_id="2"), r"eos_token_id must be a token id"),
           (dict(pad_token_id=-1), r"pad_token_id must be a token id \(0 <= id < 128, the vocabulary size\) or None"),
           (dict(stop_sequences=[3, 4]), r"stop_sequences must be a list of non-empty token-id lists"),
           (dict(stop_sequences=[[]]), r"stop_sequences must be a list of non-empty token-id lists"),
           (dict(stop_sequences=[[1, -4]]), r"each token of stop_sequences must be a token id"),
           (dict(max_time=0), r"max_time must be a number of seconds > 0, or None, got 0"),
           (dict(max_time="1s"), r"max_time must be a number of seconds > 0"),
           (dict(seed=1.5), r"seed must be an int or None, got 1.5"),
           (dict(do_sample="yes"), r"do_sample must be True or False"),
           (dict(streamer=42), r"streamer must be a callable taking each step's tokens, or an object with put\(\)"),
           (dict(top_q=0.5), r"unknown generate option\(s\) top_q; allowed: attention_mask, streamer, do_sample")]
    for kw, message in bad:
        with pytest.raises(InputError, match=message):
            cm.generate(ids, 4, **kw)
        if "streamer" not in kw:           # the iterator checks before it returns
            with pytest.raises(InputError, match=message):
                cm.generate_stream(ids, 4, **kw)


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_ragged_batch_with_absolute_positions_equals_transformers(name):
    """GPT-2's and OPT's learned position tables (OPT's with its offset of 2) are looked up at each
    sequence's own positions, as transformers does from the attention mask."""
    from tests.corpora import hf as corpus
    model, inputs = corpus.build(name)
    model.generation_config.eos_token_id = None        # always the tokens asked for, on both sides
    vocab = model.config.vocab_size
    prompts = [torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 7, 12)]
    ids, mask = left_padded(prompts)
    # (transformers first: its first generate after presso traced GPT-2 measured one token off on
    # the unpadded row, against its own later calls and that row alone)
    want = hf_generate(model, ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
    cm = presso.compile(model, example_inputs=(inputs["input_ids"],), generation=True, max_len=32)
    assert torch.equal(cm.generate(ids, 6, attention_mask=mask), want)
    assert all(torch.equal(r, cm.generate(p[None], 6)[0]) for r, p in zip(cm.generate(prompts, 6), prompts))


class PositionScaled(torch.nn.Module):
    """A causal decoder whose hidden states are scaled by their position: neither RoPE nor a
    position table, so a sequence's pads would shift what its tokens compute."""

    def __init__(self):
        super().__init__()
        self.emb, self.qkv, self.head = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 48), torch.nn.Linear(16, 32)

    def forward(self, ids):
        T = ids.shape[1]
        h = self.emb(ids) * (1 + torch.arange(T, device=ids.device)[None, :, None].float() * 0.1)
        q, k, v = (t.view(ids.shape[0], T, 2, 8).transpose(1, 2) for t in self.qkv(h).split(16, -1))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(o.transpose(1, 2).reshape(ids.shape[0], T, 16))


def test_ragged_batches_are_refused_where_positions_feed_anything_else():
    torch.manual_seed(0)
    m = PositionScaled().eval()
    ids = torch.randint(0, 32, (2, 8))
    cm = presso.compile(m, example_inputs=(ids,), generation=True, max_len=24)
    with torch.no_grad():
        want = ids
        for _ in range(4):
            want = torch.cat([want, m(want)[:, -1].argmax(-1)[:, None]], 1)
    assert torch.equal(cm.generate(ids, 4), want)                  # an even batch decodes
    with pytest.raises(InputError, match=r"cannot decode prompts of different lengths in one batch: its positions "
                                         r"feed %\S+ \(\w+\), neither a RoPE table nor a position embedding"):
        cm.generate([ids[0, :3], ids[1]], 4)
