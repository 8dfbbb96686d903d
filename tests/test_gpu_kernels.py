"""The compressed-linear and attention kernels at real sizes on a GPU, against the reference
runtime's ops (fp16 activations: the inline-PTX fp16x2 paths, which the interpreter replaces by
their plain-Triton twins). Skipped without a CUDA GPU; CI runs the interpreter tests instead.

    pytest tests/test_gpu_kernels.py        (on a GPU machine)
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET"),
                                reason="needs a CUDA GPU (without TRITON_INTERPRET)")


def rel(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def ops():
    from presso.ir.registry import get_op
    return get_op("dequantize"), get_op("densify_nm")


@pytest.mark.parametrize("M", [1, 2, 16, 64])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("N,K,G", [(14336, 4096, 128), (4096, 14336, 128), (1000, 4096, 64), (4096, 4096, 32)])
def test_int4_linear_at_llama_sizes(M, symmetric, N, K, G):
    from presso.codegen.triton.int4 import int4_linear_tiled, pack_int4
    from presso.ir.ops import pack_int4 as pack_codes
    from presso.passes.quantize import rtn
    deq, _ = ops()
    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda") * 0.02
    codes, s, z = rtn(w, 4, G, symmetric)
    q, s16 = pack_codes(codes.to(torch.int16)), s.half()
    z8 = None if z is None else z.to(torch.uint8)
    wd = deq.run([q, s16, z8], {"bits": 4, "group_size": G, "dtype": "f16"})[0]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    got = int4_linear_tiled(x, pack_int4(q, s16, z8, G))
    assert rel(got, x.float() @ wd.float().T) < 2e-3


@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_gated_pair_at_llama_1b_sizes(M, symmetric):
    """Llama-3.2-1B's gate and up projections stacked (2048 -> 2 x 8192), SwiGLU in the kernel."""
    from presso.codegen.triton.epilogue import Epilogue
    from presso.codegen.triton.int4 import int4_linear_tiled, pack_int4
    from presso.ir.ops import pack_int4 as pack_codes
    from presso.passes.quantize import rtn
    deq, _ = ops()
    torch.manual_seed(0)
    N, K, G = 8192, 2048, 128
    w = torch.randn(2 * N, K, device="cuda") * 0.02
    codes, s, z = rtn(w, 4, G, symmetric)
    q, s16 = pack_codes(codes.to(torch.int16)), s.half()
    z8 = None if z is None else z.to(torch.uint8)
    wd = deq.run([q, s16, z8], {"bits": 4, "group_size": G, "dtype": "f16"})[0].float()
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    glu = Epilogue("mul(silu(%0),%1)", 0, (1,), torch.float16)
    got = int4_linear_tiled(x, pack_int4(q, s16, z8, G), epilogue=glu, pair=True)
    lin = x.float() @ wd.T
    assert rel(got, torch.nn.functional.silu(lin[:, :N]) * lin[:, N:]) < 3e-3


@pytest.mark.parametrize("M", [1, 2, 3, 8, 16, 40])
def test_nm_linears_at_llama_sizes(M):
    from presso.codegen.triton import nm_linear
    from presso.codegen.triton.linear import pack_nm_index
    from presso.codegen.triton.nm_select import nm_select_linear, pack_nm_select, pack_nm_select_int4
    from presso.ir.ops import pack_int4 as pack_codes
    from presso.passes.quantize import rtn
    from presso.passes.sparsify import nm_prune
    deq, dens = ops()
    torch.manual_seed(0)
    N, K, G = 14336, 4096, 128
    w = torch.randn(N, K, device="cuda") * 0.02
    vals, idx, dense = nm_prune(w, w.abs(), 2, 4)
    index4 = pack_codes(idx)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    want = x.float() @ dense.half().float().T
    if M <= 16:
        index2, _ = pack_nm_index(index4, vals.shape[1], 4)
        assert rel(nm_linear(x, vals.half(), index2, 2, 4, index_bits=2), want) < 2e-3
    sel = pack_nm_select(vals.half(), index4)
    assert torch.equal(sel.dense(), dense.half())
    assert rel(nm_select_linear(x, sel), want) < 2e-3
    xb, selb = x.bfloat16(), pack_nm_select(vals.bfloat16(), index4)        # bf16: fp32 FMAs after prmt
    assert rel(nm_select_linear(xb, selb), xb.float() @ dense.bfloat16().float().T) < 1e-2
    for sym in (True, False):                       # zero points: the kernel's (8 - z) sum x term
        codes, s, z = rtn(vals, 4, G, sym)
        vq, z8 = pack_codes(codes.to(torch.int16)), None if z is None else z.to(torch.uint8)
        wd = dens.run([deq.run([vq, s.half(), z8], {"bits": 4, "group_size": G, "dtype": "f32"})[0], index4],
                      {"n": 2, "m": 4})[0]
        w4 = pack_nm_select_int4(vq, s.half(), z8, G, index4)
        assert rel(nm_select_linear(x, w4), x.float() @ wd.T) < 2e-3
        assert rel(nm_select_linear(xb, w4), xb.float() @ wd.T) < 1e-2
    vals8, idx8, dense8 = nm_prune(w, w.abs(), 4, 8)            # 4:8: three prmt per pair of kept values
    sel8 = pack_nm_select(vals8.half(), pack_codes(idx8), 8)
    assert torch.equal(sel8.dense(), dense8.half())
    assert rel(nm_select_linear(x, sel8), x.float() @ dense8.half().float().T) < 2e-3
    sel8b = pack_nm_select(vals8.bfloat16(), pack_codes(idx8), 8)
    assert rel(nm_select_linear(xb, sel8b), xb.float() @ dense8.bfloat16().float().T) < 1e-2
    codes, s, z = rtn(vals8, 4, G, False)
    vq, z8 = pack_codes(codes.to(torch.int16)), z.to(torch.uint8)
    wd = dens.run([deq.run([vq, s.half(), z8], {"bits": 4, "group_size": G, "dtype": "f32"})[0], pack_codes(idx8)],
                  {"n": 4, "m": 8})[0]
    w48 = pack_nm_select_int4(vq, s.half(), z8, G, pack_codes(idx8), 8)
    assert rel(nm_select_linear(x, w48), x.float() @ wd.T) < 2e-3


@pytest.mark.parametrize("B,L", [(1, 4096), (1, 16384), (4, 2048)])
def test_latent_attention_at_real_sizes(B, L):
    from presso.codegen.triton.latent_attention import latent_decode_attention, reference_latent_attention
    torch.manual_seed(0)
    H, HPG, R = 32, 4, 256
    G = H // HPG
    q = torch.randn(B, H, R, device="cuda", dtype=torch.float16)
    hk = torch.randn(B, L, G * R, device="cuda", dtype=torch.float16) * 0.3
    hv = torch.randn(B, L, G * R, device="cuda", dtype=torch.float16) * 0.3
    pos = torch.tensor([L - 7], device="cuda")
    got = latent_decode_attention(q, hk, hv, pos, HPG, 0.05)
    assert rel(got, reference_latent_attention(q, hk, hv, pos, HPG, 0.05)) < 1e-2
    # with the query's absorption and the value up-projection in the kernels (head dim 128)
    qh = torch.randn(B, H, 128, device="cuda", dtype=torch.float16)
    wq = (torch.randn(H, 128, R, device="cuda") / 128 ** 0.5).half()
    upv = (torch.randn(H, R, 128, device="cuda") / R ** 0.5).half()
    got = latent_decode_attention(qh, hk, hv, pos, HPG, 0.05, absorb=wq, up_v=upv)
    assert rel(got, reference_latent_attention(qh, hk, hv, pos, HPG, 0.05, absorb=wq, up_v=upv)) < 1e-2
    # dependent launches (Hopper): replayed in a CUDA graph with a new query each time, the
    # attention must read this replay's absorbed query and the merge this replay's partials (a
    # stale read is off by O(1); the two compilations' roundings differ by ~1e-4)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = latent_decode_attention(qh, hk, hv, pos, HPG, 0.05, absorb=wq, up_v=upv)
    for _ in range(3):
        qh.copy_(torch.randn_like(qh))
        graph.replay()
        want = latent_decode_attention(qh, hk, hv, pos, HPG, 0.05, absorb=wq, up_v=upv, dependent_launch=False)
        assert rel(out, want) < 1e-3


@pytest.mark.parametrize("B,L,pos", [(1, 1024, 512), (4, 4096, 4095)])
def test_rope_latent_attention_at_llama_sizes(B, L, pos):
    """Llama-3.2-1B's attention under kv_cache 0.5 (32 query heads, 8 KV heads of 64 dims, 2 latent
    groups of rank 128): keys rebuilt per KV head and rotated inside the kernel, each serving 4
    query heads; the value up-projection in the merge."""
    from presso.codegen.triton.latent_attention import latent_decode_attention, reference_latent_attention
    torch.manual_seed(0)
    H, HKV, G, D, R = 32, 8, 2, 64, 128
    q = torch.randn(B, H, D, device="cuda", dtype=torch.float16)
    hk = torch.randn(B, L, G * R, device="cuda", dtype=torch.float16)
    hv = torch.randn(B, L, G * R, device="cuda", dtype=torch.float16)
    upk = (torch.randn(G, R, HKV // G * D, device="cuda") / R ** 0.5).half()
    upv = (torch.randn(H, R, D, device="cuda") / R ** 0.5).half()
    ang = torch.arange(L, device="cuda")[:, None] * 0.9 ** torch.arange(D // 2, device="cuda")
    cos, sin = torch.cat([ang.cos()] * 2, -1).half(), torch.cat([ang.sin()] * 2, -1).half()
    p = torch.tensor([pos], device="cuda")
    got = latent_decode_attention(q, hk, hv, p, H // G, D ** -0.5, upk, cos, sin, up_v=upv)
    assert rel(got, reference_latent_attention(q, hk, hv, p, H // G, D ** -0.5, upk, cos, sin, up_v=upv)) < 1e-2


def test_plain_calls_are_captured_once_a_shape_repeats():
    """From the third call at one input shape the cuda runtime replays a CUDA graph: each call still
    equals the reference on its own inputs, an earlier result is not overwritten by a later call,
    and a new shape runs (and is captured) on its own."""
    import presso
    from torch.export import Dim
    from presso.models import make_llama
    torch.manual_seed(0)
    m, ex = make_llama()
    kw = dict(example_inputs=ex, recipe="quantize{weights=int4,group_size=16}",
              dynamic_shapes=({0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=64)},))
    ref = presso.compile(m, **kw)
    cm = presso.compile(m, target="cuda", **kw)
    calls = [(torch.randint(0, 256, ex[0].shape),) for _ in range(5)]
    outs = [cm(*c) for c in calls]
    assert len(cm._runtime._auto) == 1
    for c, o in zip(calls, outs):
        assert rel(o.cpu(), ref(*c)) < 1e-4
    short = (torch.randint(0, 256, (1, 7)),)
    for _ in range(4):
        assert rel(cm(*short).cpu(), ref(*short)) < 1e-4
    assert len(cm._runtime._auto) == 2


@pytest.mark.parametrize("B,L,pos", [(1, 1024, 512), (4, 4096, 4095), (8, 2048, 7)])
def test_gqa_decode_attention_at_llama_sizes(B, L, pos):
    from presso.codegen.triton.latent_attention import gqa_decode_attention
    torch.manual_seed(0)
    H, HKV, D = 32, 8, 64
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(B, HKV, L, D, device="cuda", dtype=torch.float16) for _ in range(2))
    got = gqa_decode_attention(q, k, v, torch.tensor([pos], device="cuda"), D ** -0.5)
    kk, vv = (t[:, :, :pos + 1].float().repeat_interleave(H // HKV, 1) for t in (k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), kk, vv)
    assert rel(got, want) < 2e-3


def test_generation_captures_the_step_once_and_matches_the_reference():
    """Each generate() call starts from fresh caches; the step's CUDA graph recorded by the first
    call is replayed by the next ones (its static caches refilled from the new prefill)."""
    import presso
    from presso.models import make_llama
    m, ins = make_llama(batch=2)
    kw = dict(example_inputs=ins, generation=True, max_len=64, recipe="quantize{weights=int4,group_size=32}",
              calibration=[ins])
    cm, ref = presso.compile(m, target="cuda", **kw), presso.compile(m, **kw)
    p1, p2 = ins[0][:, :8], ins[0][:, 8:16]
    a = cm.generate(p1, 12)
    step_rt = cm.decode_program().step_rt
    graph = step_rt._graph_exec
    b = cm.generate(p2, 12)
    assert graph is not None and step_rt._graph_exec is graph
    assert torch.equal(a, ref.generate(p1, 12)) and torch.equal(b, ref.generate(p2, 12))
    assert torch.equal(cm.generate(p1, 12), a)


@pytest.mark.parametrize("recipe", ["quantize{weights=int4,group_size=32}",
                                    "kv_cache{rank_ratio=0.5},quantize{weights=int4,group_size=16,skip=palu_b}"])
def test_ragged_batch_on_the_gpu_equals_each_prompt_alone_and_the_reference(recipe):
    """Four prompts of lengths 3, 7, 12 and 20, left-padded into one batch: the cuda decode kernels'
    per-sequence starts give each prompt the tokens it gets alone, and the reference target's."""
    import presso
    from presso.models import make_llama
    from zoo_util import assert_ragged_batch_decodes_as_alone
    m, ins = make_llama(batch=2)
    kw = dict(example_inputs=ins, generation=True, max_len=64, recipe=recipe, calibration=[ins])
    cm, ref = presso.compile(m, target="cuda", **kw), presso.compile(m, **kw)
    assert_ragged_batch_decodes_as_alone(cm, ref, new=8)
