"""Decode programs with an explicit KV cache, generate(), and the kv_cache (Palu) pass."""
import functools

import pytest
import torch

import presso
from presso import InputError
from presso.models import make_gpt2, make_llama, make_minilm, make_mlp
from presso.passes.decode import DecodeError

MAX_LEN = 96


def torch_greedy(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1)[:, None]], 1)
    return ids


@functools.lru_cache(maxsize=None)
def llama(recipe=None):
    m, ins = make_llama(batch=2)
    calib = [(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)),) for i in range(8)]
    return m, ins, presso.compile(m, example_inputs=ins, generation=True, max_len=MAX_LEN, recipe=recipe,
                                  calibration=calib if recipe else None)


@pytest.mark.parametrize("make", [make_llama, make_gpt2])
def test_greedy_generation_equals_torch(make):
    m, ins = make(batch=2)
    cm = presso.compile(m, example_inputs=ins, generation=True, max_len=MAX_LEN)
    prompt = ins[0][:, :16]
    assert torch.equal(cm.generate(prompt, 64), torch_greedy(m, prompt, 64))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hugging_face_causal_lms(kind):
    pytest.importorskip("transformers")
    from presso.models.hf import make_hf_causal_lm
    full, ins = make_hf_causal_lm(kind)                      # HF's own forward, mask construction included
    static = presso.compile(full, example_inputs=ins)
    assert torch.allclose(static(*ins), full(*ins), rtol=1e-4, atol=1e-5)
    m, _ = make_hf_causal_lm(kind, decoder_only=True)        # the same modules, driven without a mask
    assert torch.allclose(m(*ins), full(*ins), rtol=1e-5, atol=1e-6)
    cm = presso.compile(m, example_inputs=ins, generation=True, max_len=MAX_LEN)
    assert {"attention", "rotary", "rms_norm"} <= set(cm.graph.op_histogram())
    for op in ("attention", "rotary", "rms_norm", "linear"):  # (RoPE tables stay computed: positions vary)
        assert static.graph.op_histogram()[op] == cm.graph.op_histogram()[op]
    prompt = ins[0][:, :12]
    expected = torch_greedy(full, prompt, 32)
    assert torch.equal(cm.generate(prompt, 32), expected)
    palu = presso.compile(m, example_inputs=ins, generation=True, max_len=MAX_LEN, recipe="kv_cache{rank_ratio=1.0}",
                          calibration=[(torch.randint(0, 256, (2, 16)),) for _ in range(4)])
    assert torch.equal(palu.generate(prompt, 32), expected)


def test_decode_program_has_the_cache_as_explicit_state():
    _, _, cm = llama()
    gen = cm.decode_program()
    names = [v.name for v in gen.step.inputs]
    assert names[:3] == ["input_ids", "positions", "starts"]
    assert names[3:] == ["cache.0.k", "cache.0.v", "cache.1.k", "cache.1.v"]
    assert str(gen.step.inputs[0].type) == "i64[batch, 1]" and str(gen.step.inputs[3].type) == "f32[batch, 2, 96, 16]"
    assert str(gen.step.inputs[2].type) == "i64[batch]"
    assert [v.name for v in gen.step.outputs[1:]] == [n + ".new" for n in names[3:]]
    text = str(gen.step)
    assert "cache_update(%cache.0.k," in text and "attention_cached(" in text and "seq" not in text


def test_sampling_is_seeded_and_bounded():
    m, ins, cm = llama()
    prompt = ins[0][:, :8]
    a = cm.generate(prompt, 10, do_sample=True, temperature=0.7, top_k=5, seed=3)
    b = cm.generate(prompt, 10, do_sample=True, temperature=0.7, top_k=5, seed=3)
    assert torch.equal(a, b) and a.shape == (2, 18) and int(a.max()) < 256
    with pytest.raises(InputError, match="exceeds the cache length 96"):
        cm.generate(prompt, 200)


def test_generate_rejects_bad_arguments_by_name():
    _, ins, cm = llama()
    prompt = ins[0][:, :8]
    bad = [(dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0, got -1"),
           (dict(max_new_tokens=2.5), "max_new_tokens must be an int >= 0, got 2.5"),
           (dict(max_new_tokens=3, eos_token_id=-5), "eos_token_id must be a token id"),
           (dict(max_new_tokens=3, do_sample=True, top_k=-2),
            "top_k must be an int >= 0 (0 keeps every token), got -2"),
           (dict(max_new_tokens=3, do_sample=True, temperature=-0.5), "temperature must be a number >= 0"),
           (dict(max_new_tokens=3, do_sample=True, temperature=float("nan")), "temperature must be a number >= 0")]
    for kw, message in bad:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            cm.generate(prompt, **kw)
    with pytest.raises(InputError, match=r"at least one prompt token"):
        cm.generate(prompt[:, :0], 3)
    assert cm.generate(prompt, 0).shape == prompt.shape      # zero new tokens: the prompt back


def test_generation_stops_at_the_eos_token_of_every_sequence():
    _, ins, cm = llama()
    prompt = ins[0][:, :8]
    full = cm.generate(prompt, 12)
    new = full[:, 8:]
    eos = int(new[0, 3])          # a token the first sequence emits (its first emission ends it)

    def expected():
        out, firsts = new.clone(), []
        for r in range(new.shape[0]):
            hits = (new[r] == eos).nonzero()
            firsts.append(int(hits[0]) if len(hits) else None)
            if firsts[-1] is not None:
                out[r, firsts[-1] + 1:] = eos          # a finished sequence is padded with eos
        stop = max(f for f in firsts) if all(f is not None for f in firsts) else new.shape[1] - 1
        return torch.cat([prompt, out[:, :stop + 1]], 1)
    got = cm.generate(prompt, 12, eos_token_id=eos)
    assert torch.equal(got, expected()), (got, full)
    assert got.shape[1] < full.shape[1] or (new[1] != eos).all()
    one = cm.generate(prompt[:1], 12, eos_token_id=eos)     # a lone sequence stops at its eos
    first = int((new[0] == eos).nonzero()[0])
    assert torch.equal(one, full[:1, :8 + first + 1])


def test_kv_cache_full_rank_is_exact():
    m, ins, base = llama()
    _, _, cm = llama("kv_cache{rank_ratio=1.0}")
    prompt = ins[0][:, :16]
    assert torch.equal(cm.generate(prompt, 64), torch_greedy(m, prompt, 64))
    x = ins[0]
    assert torch.allclose(cm(x), base(x), rtol=1e-4, atol=1e-5)
    assert "palu_a" in str(cm.graph)


def test_kv_cache_half_rank_halves_the_cache():
    m, ins, base = llama()
    _, _, cm = llama("kv_cache{rank_ratio=0.5}")
    rep, rep0 = cm.report(), base.report()
    assert rep["kv_cache"]["kv_cache_bytes_per_token"] <= 0.5 * rep0["kv_cache"]["kv_cache_bytes_per_token"]
    assert rep["kv_cache"]["kv_cache_bytes_per_token_uncompressed"] == rep0["kv_cache"]["kv_cache_bytes_per_token"]
    ranks = {l["layer"]: l["kv_rank"] for l in rep["compression"]["layers"]}
    assert set(ranks.values()) == {16} and all(l["rel_error"] > 0 for l in rep["compression"]["layers"])
    out = cm.generate(ins[0][:, :16], 32)
    assert out.shape == (2, 48)
    assert cm.kv_cache_bytes_per_token == rep["kv_cache"]["kv_cache_bytes_per_token"]


@pytest.mark.parametrize("then", ["quantize{weights=int4,group_size=16,skip=palu_b}", "sparsify{pattern=2:4}",
                                  "quantize{weights=int8,activations=int8}",
                                  "quantize{weights=int4,group_size=16,skip=palu_b},concat_linears"])
def test_kv_cache_stays_latent_when_later_passes_rewrite_the_projections(then, tmp_path):
    """Passes after kv_cache rebuild the latent's linear (packed weights); the decode program must
    still cache the latent (it cached full keys and values once that mark was lost), also after an
    artifact round trip."""
    m, ins, _ = llama()
    _, _, half = llama("kv_cache{rank_ratio=0.5}")
    _, _, cm = llama("kv_cache{rank_ratio=0.5}," + then)
    want = half.report()["kv_cache"]["kv_cache_bytes_per_token"]
    assert cm.report()["kv_cache"]["kv_cache_bytes_per_token"] == want
    if "concat_linears" in then:     # q and both latents are one stacked linear; its split names the latents
        marks = [n.meta.get("kv_cache_points") for n in cm.graph.nodes if n.op == "split"]
        marked = [m for m in marks if m]           # (the unmarked splits: each layer's gate / up pair)
        assert len(marks) == 4 and len(marked) == 2 and all(sorted(m.values()) == ["k", "v"] for m in marked), marks
    assert [tuple(s.type.shape[1:]) for s in cm.decode_program().specs] == [(MAX_LEN, 16)] * 4     # [B, L, G*r]
    loaded = presso.load(cm.save(tmp_path / "m.presso"))
    assert loaded.report()["kv_cache"]["kv_cache_bytes_per_token"] == want
    prompt = ins[0][:, :8]
    assert torch.equal(loaded.generate(prompt, 8), cm.generate(prompt, 8))
    # a graph whose latents lost the mark is refused, not silently decoded with full caches
    g = cm.graph.copy()
    for n in g.nodes:
        n.meta.pop("kv_cache_point", None)
        n.meta.pop("kv_cache_points", None)
    from presso.passes.decode import build_decode_graph
    with pytest.raises(DecodeError, match=r"compressed 4 K/V projections but only 0 of their latents are still "
                                          r"marked as cache points"):
        build_decode_graph(g, MAX_LEN)


def test_kv_cache_on_the_real_minilm():
    from presso.models.minilm import Tokenizer
    from presso.models.sentences import CALIBRATION, EVALUATION
    tok = Tokenizer()
    m, ex = make_minilm(EVALUATION[:4], pad_to=24)
    calib = [tok(CALIBRATION[i:i + 4], pad_to=24) for i in range(0, 156, 4)]
    evals = [tok(EVALUATION[i:i + 4], pad_to=24) for i in range(0, 32, 4)]
    cos = {}
    for r in (1.0, 0.5):
        cm = presso.compile(m, example_inputs=ex, recipe=f"kv_cache{{rank_ratio={r}}}", calibration=calib)
        cos[r] = torch.cat([torch.nn.functional.cosine_similarity(cm(*e), m(*e)) for e in evals]).mean().item()
    assert cos[1.0] > 0.99999 and cos[0.5] >= 0.95


class OddAttention(torch.nn.Module):
    """K goes through a ReLU: not a projection the pass can prove standard."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(32, 32) for _ in range(3))

    def forward(self, x):
        B, T, _ = x.shape
        h = lambda t: t.view(B, T, 2, 16).transpose(1, 2)  # noqa: E731
        o = torch.nn.functional.scaled_dot_product_attention(h(self.q(x)), h(torch.relu(self.k(x))), h(self.v(x)),
                                                             is_causal=True)
        return o.transpose(1, 2).reshape(B, T, 32)


def test_nonstandard_or_absent_attention_is_left_unchanged_with_a_warning():
    x = torch.randn(1, 8, 32)
    odd = OddAttention().eval()
    base = presso.compile(odd, example_inputs=(x,))
    with pytest.warns(UserWarning, match=r"attention %attention does not read K/V projections"):
        cm = presso.compile(odd, example_inputs=(x,), recipe="kv_cache", calibration=[(x,)])
    assert str(cm.graph) == str(base.graph)
    m, ins = make_mlp()
    with pytest.warns(UserWarning, match="no attention"):
        cm = presso.compile(m, example_inputs=ins, recipe="kv_cache", calibration=[ins])
    with pytest.raises(DecodeError, match="has no attention"):
        cm.generate(torch.zeros(1, 4, dtype=torch.int64), 2)


def test_generation_needs_a_symbolic_sequence_and_causal_attention():
    m, ins = make_llama()
    with pytest.raises(DecodeError, match="no symbolic 'seq' dim"):
        presso.compile(m, example_inputs=ins).decode_program(64)
    from torch.export import Dim
    mm, ex = make_minilm()
    seq = ({0: Dim("batch"), 1: Dim("seq", min=2, max=64)},) * 2
    with pytest.raises(DecodeError, match="is not plain causal attention"):
        presso.compile(mm, example_inputs=ex, dynamic_shapes=seq).decode_program(64)


def test_decode_program_keeps_weights_compressed():
    """Constant folding in the decode program must not densify dequantize/densify_nm weights."""
    m, ins = make_llama(batch=2, seq=6)
    cm = presso.compile(m, example_inputs=ins, generation=True, max_len=16,
                        recipe="quantize{weights=int4,group_size=16}")
    gen = cm.decode_program()
    for g in (gen.graph, gen.step):
        ops = g.op_histogram()
        assert ops["dequantize"] == ops["linear"] > 0
        assert g.param_bytes() < cm.graph.meta["uncompressed_bytes"] / 2


def test_max_len_beyond_the_position_table_names_the_limit():
    from presso.errors import MaxLenError
    m, ins = make_llama(batch=2, seq=6)                         # cos/sin tables of 128 positions
    with pytest.raises(MaxLenError, match=r"max_len=256 .* at most 128 tokens .* max_len <= 128") as e:
        presso.compile(m, example_inputs=ins, generation=True, max_len=256)
    assert (e.value.max_len, e.value.limit) == (256, 128)
    cm = presso.compile(m, example_inputs=ins, generation=True, max_len=16)
    with pytest.raises(MaxLenError, match=r"max_len=32 is beyond the max_len=16 this model was compiled with") as e:
        cm.generate(ins[0], 4, max_len=32)
    assert (e.value.max_len, e.value.limit) == (32, 16)
    assert cm.generate(ins[0], 4, max_len=12).shape == (2, 10)   # a shorter cache is fine
