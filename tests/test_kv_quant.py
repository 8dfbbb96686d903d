"""KV-cache compression beyond plain low rank: the kv_cache pass's attention-weighted loss, rank
allocation and quantized latent (Palu's low-rank-aware quantization), and the kv_quant pass
(plain per-token KV quantization); checked against the reference runtime and torch."""
import functools

import pytest
import torch

import presso
from presso import PipelineError
from presso.errors import IRError
from presso.ir.ops import kv_dequantize, kv_packed_width, kv_quantize
from presso.models import make_llama
from presso.passes.kv_cache import _rotate, weighted_factorize
from presso.passes.lowrank import factorize

MAX_LEN = 64


@functools.lru_cache(maxsize=None)
def llama(recipe=None):
    m, ins = make_llama(batch=2)
    calib = [(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    return m, ins, presso.compile(m, example_inputs=ins, generation=True, max_len=MAX_LEN, recipe=recipe,
                                  calibration=calib if recipe else None, verbose=False)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def greedy_by_full_forward(cm, prompt, n):
    ids = prompt
    for _ in range(n):
        ids = torch.cat([ids, cm(ids)[:, -1].argmax(-1)[:, None]], 1)
    return ids


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_quantize_rows_hold_codes_then_f16_scales_and_round_trip(bits):
    x = torch.randn(2, 3, 32) * torch.linspace(0.1, 4, 32)
    p = kv_quantize(x, bits, 8)
    assert p.dtype == torch.uint8 and p.shape == (2, 3, kv_packed_width(32, bits, 8)) == (2, 3, 32 * bits // 8 + 8)
    qmax = 2 ** (bits - 1) - 1
    g = x.reshape(2, 3, 4, 8)
    s = (g.abs().amax(-1, keepdim=True) / (qmax + 0.5)).half().float()
    want = (torch.clamp(torch.round(g / s), -qmax - 1, qmax) * s).reshape(x.shape)      # plain torch
    assert torch.equal(kv_dequantize(p, bits, 8, 32, "f32"), want)
    assert torch.equal(p[..., -8:].contiguous().view(torch.float16).float(), s.reshape(2, 3, 4))


def test_weighted_factorization_is_optimal_for_its_metric():
    torch.manual_seed(0)
    w, x = torch.randn(24, 40), torch.randn(40, 200) * torch.rand(40, 1)
    gram, a = x @ x.T, torch.randn(24, 24)
    metric = a @ a.T
    plain, weighted = factorize(w, gram, whitened=True), weighted_factorize(w, gram, metric)

    def err(f, r):
        d = (w.double() - f.B[:, :r] @ f.A[:r]) @ x.double()
        return float(torch.trace(d.T @ metric.double() @ d) / torch.trace(w.double().T @ metric.double() @ w.double() @ gram.double()))
    for r in (4, 12):
        assert err(weighted, r) == pytest.approx(float(weighted.err[r]), rel=1e-4)
        assert err(weighted, r) < err(plain, r)


def test_folded_hadamard_keeps_the_product_and_spreads_the_latent():
    torch.manual_seed(0)
    w, x = torch.randn(32, 48) * torch.logspace(0, -2, 32)[:, None], torch.randn(48, 300)
    f = factorize(w, x @ x.T, whitened=True)
    h = _rotate(f, 16)
    assert torch.allclose(h.B[:, :16] @ h.A[:16], f.B[:, :16] @ f.A[:16], atol=1e-9)
    spread = lambda A: float(((A[:16] @ x.double()) ** 2).mean(1).max() / ((A[:16] @ x.double()) ** 2).mean(1).min())
    assert spread(h.A) < 1.05 and spread(f.A) > 10     # SVD latents are ordered by energy; rotated ones are not


def test_sensitivity_allocation_meets_the_budget_in_rank_multiples():
    _, _, cm = llama("kv_cache{rank_ratio=0.5,loss=attention,allocation=sensitivity,rank_multiple=4}")
    layers = cm.graph.meta["compression"].values()
    ranks = [(r["kv_rank"], r["kv_rank_full"]) for r in layers]
    assert len(ranks) == 4 and all(r % 4 == 0 for r, _ in ranks)
    assert sum(r for r, _ in ranks) <= 0.5 * sum(n for _, n in ranks)
    assert cm.report()["kv_cache"]["kv_cache_bytes_per_token"] == sum(r for r, _ in ranks) * 4    # f32 latents


def test_int4_latent_cache_bytes_are_the_real_buffers():
    _, _, cm = llama("kv_cache{rank_ratio=0.5,latent_bits=4,latent_group_size=8}")
    rep = cm.report()["kv_cache"]
    per = kv_packed_width(16, 4, 8)                                   # 16-wide latent: 8 code bytes + 2 scales
    assert per == 12
    assert rep["caches"] == {f"cache.{i}.{w}": f"u8[batch, {MAX_LEN}, {per}]" for i in (0, 1) for w in "kv"}
    assert rep["kv_cache_bytes_per_token"] == 4 * per
    assert rep["kv_cache_bytes_per_token"] <= 0.25 * rep["kv_cache_bytes_per_token_uncompressed"] / 2   # of f16
    assert {r["kv_latent_bits"] for r in cm.graph.meta["compression"].values()} == {4}


def test_quantized_latent_is_an_op_of_the_pass_output():
    _, _, cm = llama("kv_cache{rank_ratio=0.5,latent_bits=4,latent_group_size=8}")
    lines = [line.strip().split(" = ", 1)[1] for line in str(cm.graph).splitlines()
             if "kv_quantize(" in line or "kv_dequantize(" in line]
    assert lines[:2] == ["kv_quantize(%linear_25) {group_size=8}",
                         "kv_dequantize(%kv_quantize) {group_size=8, width=16}"]
    assert len(lines) == 8
    marked = [n.op for n in cm.graph.nodes if n.meta.get("kv_cache_point")]
    assert marked == ["kv_quantize"] * 4
    step = str(cm.decode_program().step)
    assert "cache_update(%cache.0.k, %kv_quantize" in step and "kv_dequantize(%cache.0.k.new)" in step


@pytest.mark.parametrize("recipe", ["kv_cache{rank_ratio=1.0,latent_bits=8,latent_group_size=16}",
                                    "kv_cache{rank_ratio=0.5,loss=attention,latent_bits=4,latent_group_size=8}",
                                    "kv_quant{bits=8,group_size=16}", "kv_quant{bits=4,group_size=8}",
                                    "kv_cache{rank_ratio=0.5},kv_quant{bits=8,group_size=8}"])
def test_quantized_caches_decode_as_the_full_forward_runs(recipe):
    m, ins, base = llama()
    _, _, cm = llama(recipe)
    x = ins[0]
    bound = {"kv_cache{rank_ratio=1.0,latent_bits=8,latent_group_size=16}": 0.01,
             "kv_quant{bits=8,group_size=16}": 0.01, "kv_quant{bits=4,group_size=8}": 0.1}.get(recipe, 0.5)
    assert rel(cm(x), base(x)) < bound
    prompt = x[:, :8]
    assert torch.equal(cm.generate(prompt, 12), greedy_by_full_forward(cm, prompt, 12))
    assert all(t.startswith("u8[") for t in cm.report()["kv_cache"]["caches"].values())


def test_plain_kv_quant_against_torch():
    """kv_quant{bits=8} = the torch model with K (before RoPE) and V rounded per token and group."""
    m, ins, _ = llama()
    _, _, cm = llama("kv_quant{bits=8,group_size=16}")
    projections = [mod for name, mod in m.named_modules() if name.endswith(("k_proj", "v_proj"))]
    assert len(projections) == 4
    hooks = [p.register_forward_hook(lambda mod, i, out: kv_dequantize(kv_quantize(out, 8, 16), 8, 16, out.shape[-1], "f32"))
             for p in projections]
    try:
        want = m(ins[0])
    finally:
        for h in hooks:
            h.remove()
    assert rel(cm(ins[0]), want) < 1e-5


def test_bad_options_and_shapes_are_typed_errors():
    m, ins = make_llama(batch=2)
    calib = [(ins[0],)]
    with pytest.raises(PipelineError, match=r"option 'latent_bits' must be one of \[4, 8, 16\], got 3"):
        presso.compile(m, example_inputs=ins, recipe="kv_cache{latent_bits=3}", calibration=calib)
    with pytest.raises(PipelineError, match=r"option 'loss' must be one of \['input', 'attention'\]"):
        presso.compile(m, example_inputs=ins, recipe="kv_cache{loss=fisher}", calibration=calib)
    with pytest.raises(PipelineError, match=r"option 'latent_group_size' must be even and >= 2, got 3"):
        presso.compile(m, example_inputs=ins, recipe="kv_cache{latent_group_size=3}", calibration=calib)
    with pytest.raises(PipelineError, match=r"option 'bits' must be one of \[4, 8\], got 2"):
        presso.compile(m, example_inputs=ins, recipe="kv_quant{bits=2}")
    with pytest.raises(PipelineError, match=r"pass 'kv_quant': group_size=48 does not divide the k cache width 32"):
        presso.compile(m, example_inputs=ins, recipe="kv_quant{group_size=48}", verbose=False)
    with pytest.raises(IRError, match="kv_dequantize: input u8\\[2, 12\\] is not the u8 rows kv_quantize makes"):
        from presso.ir.registry import get_op
        from presso.ir.types import DType, TensorType
        get_op("kv_dequantize").infer([TensorType((2, 12), DType.u8)], {"bits": 4, "group_size": 8, "width": 32,
                                                                         "dtype": "f32"})


def test_key_share_splits_each_layers_budget_between_keys_and_values():
    _, _, cm = llama("kv_cache{rank_ratio=0.5,key_share=0.25,rank_multiple=4}")
    ranks = {name.split(".")[-2]: r["kv_rank"] for name, r in cm.graph.meta["compression"].items()}
    assert ranks == {"k_proj": 8, "v_proj": 24}            # of 32 each: 0.5 * 64 = 32, a quarter to keys
    with pytest.raises(PipelineError, match=r"option 'key_share' must be in \(0, 1\), got 1.0"):
        m, ins = make_llama(batch=2)
        presso.compile(m, example_inputs=ins, recipe="kv_cache{key_share=1}")


def test_quantized_latent_survives_save_and_load(tmp_path):
    _, ins, cm = llama("kv_cache{rank_ratio=0.5,latent_bits=4,latent_group_size=8}")
    loaded = presso.load(cm.save(tmp_path / "palu4.presso"))
    assert torch.equal(loaded(ins[0]), cm(ins[0]))
    assert loaded.report()["kv_cache"]["caches"] == cm.report()["kv_cache"]["caches"]
    prompt = ins[0][:, :8]
    assert torch.equal(loaded.generate(prompt, 8), cm.generate(prompt, 8))
