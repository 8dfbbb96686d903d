"""Generation on the ``llvm`` target: the decode program (prefill over a symbolic prompt, then a
one-token step) compiled by TVM gives the reference target's tokens, for plain, quantized and
Palu (latent-cache) models and for ragged batches, and updates its caches in place."""
import functools

import pytest
import torch

import presso
from presso.models import make_gpt2, make_llama
from zoo_util import assert_ragged_batch_decodes_as_alone

pytest.importorskip("tvm")

MAX_LEN = 64
CALIB = [(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)),) for i in range(4)]


@functools.lru_cache(maxsize=None)
def compiled(make, recipe, target):
    m, ins = make(batch=2, seq=16)
    return presso.compile(m, example_inputs=ins, generation=True, max_len=MAX_LEN, recipe=recipe,
                          calibration=CALIB if recipe else None, target=target, verbose=False), ins


@pytest.mark.slow
@pytest.mark.parametrize("make,recipe", [
    (make_llama, None),
    (make_gpt2, None),
    (make_llama, "quantize{weights=int8}"),
    (make_llama, "quantize{weights=int4,group_size=16}"),
    (make_llama, "kv_cache{rank_ratio=0.5},quantize{weights=int8,skip=palu_b}"),
    (make_llama, "quantize{weights=int8,activations=int7,rotate=hadamard}"),
    (make_llama, "kv_cache{rank_ratio=0.5,latent_bits=4,latent_group_size=8},quantize{weights=int8,skip=palu_b}"),
    (make_llama, "kv_quant{bits=8,group_size=16}"),
])
def test_llvm_greedy_tokens_equal_the_reference_target(make, recipe):
    cm, ins = compiled(make, recipe, "llvm")
    ref, _ = compiled(make, recipe, "reference")
    prompt = ins[0][:, :9]
    assert torch.equal(cm.generate(prompt, 12), ref.generate(prompt, 12))
    if recipe and "kv_" in recipe:      # the latent / the quantized rows are what the compiled step caches
        assert cm.kv_cache_bytes_per_token == ref.report()["kv_cache"]["kv_cache_bytes_per_token"]


@pytest.mark.slow
def test_llvm_ragged_batch_equals_each_prompt_alone_and_the_reference():
    cm, _ = compiled(make_llama, None, "llvm")
    ref, _ = compiled(make_llama, None, "reference")
    assert_ragged_batch_decodes_as_alone(cm, ref)


def test_llvm_decode_step_writes_the_caches_in_place():
    """The step returns the very buffers it was given (TVM's in-place call): no cache is copied
    per token."""
    cm, ins = compiled(make_llama, None, "llvm")
    gen = cm.decode_program()
    caches = gen.new_caches({"batch": 1})
    before = [c.clone() for c in caches]
    outs = gen.step_rt.run(ins[0][:1, :1], torch.tensor([5]), torch.zeros(1, dtype=torch.int64), *caches)
    assert [o.data_ptr() for o in outs[1:]] == [c.data_ptr() for c in caches]
    for c, b in zip(caches, before):       # slot 5 written, every other slot as it was
        assert not torch.equal(c[:, :, 5], b[:, :, 5])
        assert torch.equal(torch.cat([c[:, :, :5], c[:, :, 6:]], 2), torch.cat([b[:, :, :5], b[:, :, 6:]], 2))


@pytest.mark.slow
def test_llvm_artifact_generates_from_its_saved_decode_libraries(tmp_path, monkeypatch):
    """save() writes the decode program's prefill and step libraries; a loaded artifact generates
    the same tokens from them without compiling anything (as on a board that cannot compile)."""
    cm, ins = compiled(make_llama, "quantize{weights=int8}", "llvm")
    prompt = ins[0][:1, :5]
    want = cm.generate(prompt, 8)
    path = cm.save(tmp_path / "gen.presso")
    assert {"decode_prefill.so", "decode_step.so", "model.so"} <= {p.name for p in (path / "code").iterdir()}
    import presso.codegen.tvm as tvm_codegen

    def no_compile(*a, **k):
        raise AssertionError("the loaded artifact compiled a graph instead of loading its library")
    monkeypatch.setattr(tvm_codegen, "build", no_compile)
    loaded = presso.load(path, trust_code=True)
    assert torch.equal(loaded.generate(prompt, 8), want)


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_quantize_kernels_are_bit_exact_to_the_ops(bits):
    """TVM's kv_quantize / kv_dequantize give the reference op's bytes and values exactly (round
    half to even, f16 scales as little-endian bytes after the codes)."""
    import tvm
    from tvm import te
    from presso.codegen.tvm.decode_ops import kv_dequantize_te, kv_quantize_te
    from presso.ir.ops import kv_dequantize, kv_quantize
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(bits)) * 3
    x[0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 0.0]) * x[0, 0, 4:32].abs().max() / 7.5   # halfway cases
    want = kv_quantize(x, bits, 32)
    X = te.placeholder(tuple(x.shape), "float32", name="x")
    quant = tvm.compile(te.create_prim_func([X, kv_quantize_te(X, bits, 32)]), target="llvm")
    got = tvm.runtime.tensor(torch.zeros(want.shape, dtype=torch.uint8).numpy())
    quant(tvm.runtime.tensor(x.numpy()), got)
    assert torch.equal(torch.from_numpy(got.numpy()), want)
    P = te.placeholder(tuple(want.shape), "uint8", name="p")
    dequant = tvm.compile(te.create_prim_func([P, kv_dequantize_te(P, bits, 32, 64, "float32")]), target="llvm")
    out = tvm.runtime.tensor(torch.zeros(3, 5, 64).numpy())
    dequant(tvm.runtime.tensor(want.numpy()), out)
    assert torch.equal(torch.from_numpy(out.numpy()), kv_dequantize(want, bits, 32, 64, "f32"))
