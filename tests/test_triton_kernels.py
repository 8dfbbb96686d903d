"""Every Triton kernel, under TRITON_INTERPRET=1 on CPU tensors (a subprocess, so the interpreter
flag is set before Triton loads), against the reference runtime's ops on odd shapes."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from presso.codegen.triton import int4_linear, nm_linear
    from presso.codegen.triton.linear import pack_nm_index
    from presso.ir.registry import get_op
    from presso.passes.quantize import rtn
    from presso.passes.sparsify import nm_prune
    from presso.ir.ops import pack_int4
    torch.manual_seed(0)
    deq, dens = get_op("dequantize"), get_op("densify_nm")
    def ref_int4(x, w, group, symmetric, bias):
        codes, s, z = rtn(w, 4, group, symmetric)
        q = pack_int4(codes.to(torch.int16))
        s16 = s.half()
        z8 = None if z is None else z.to(torch.uint8)
        wd = deq.run([q, s16, z8], {"bits": 4, "group_size": group, "dtype": "f32"})[0]
        return q, s16, z8, torch.nn.functional.linear(x, wd, bias)
    cases = 0
    for M, N, K, G, sym, bias in [(1, 37, 64, 32, True, False), (3, 70, 96, 32, False, True),
                                  (5, 130, 128, 64, True, True), (20, 33, 64, 16, False, False),
                                  (1, 45, 256, 32, False, True), (2, 19, 128, 128, True, False)]:
        x, w = torch.randn(M, K), torch.randn(N, K)
        b = torch.randn(N) if bias else None
        q, s, z, want = ref_int4(x, w, G, sym, b)
        got = int4_linear(x, q, s, z, b, G)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (M, N, K, G, (got - want).abs().max())
        cases += 1
    for M, N, K, n, m, bias in [(1, 45, 64, 2, 4, False), (3, 70, 96, 2, 4, True), (2, 33, 64, 4, 8, True),
                                (1, 19, 48, 1, 4, False), (2, 17, 40, 3, 5, False)]:
        x, w = torch.randn(M, K), torch.randn(N, K)
        b = torch.randn(N) if bias else None
        vals, idx, dense = nm_prune(w, w.abs(), n, m)
        index = pack_int4(idx) if vals.shape[1] % 2 == 0 else idx.to(torch.uint8)
        wd = dens.run([vals, index], {"n": n, "m": m})[0]
        assert torch.equal(wd, dense)
        want = torch.nn.functional.linear(x, wd, b)
        got = nm_linear(x, vals, index, n, m, b)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (M, N, K, n, m, (got - want).abs().max())
        cases += 1
        packed, bits = pack_nm_index(index, vals.shape[1], m)
        if bits == 2:   # the 2-bit metadata form the cuda target repacks 2:4 / 1:4 indices into
            got = nm_linear(x, vals, packed, n, m, b, index_bits=2)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), ("2-bit", M, N, K, n, m)
            cases += 1
    from presso.codegen.triton.latent_attention import latent_decode_attention, reference_latent_attention
    for rope in (False, True):
        for B, H, HPG, D, R, RV, L, pos, Gv, split in [(1, 8, 4, 16, 16, 16, 40, 33, None, None),
                                                       (2, 8, 4, 16, 32, 16, 50, 49, 1, 16),
                                                       (1, 4, 2, 16, 16, 32, 64, 20, None, 16)]:
            G = H // HPG
            q = torch.randn(B, H, D if rope else R)
            hk, hv = torch.randn(B, L, G * R), torch.randn(B, L, (Gv or G) * RV)
            upk = torch.randn(G, R, HPG * D) * 0.2 if rope else None
            ang = torch.randn(L, D // 2)
            cos, sin = (torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)) if rope else (None, None)
            p = torch.tensor([pos])
            got = latent_decode_attention(q, hk, hv, p, HPG, 0.3, upk, cos, sin, value_groups=Gv, split_len=split)
            want = reference_latent_attention(q, hk, hv, p, HPG, 0.3, upk, cos, sin, value_groups=Gv)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (rope, B, L, (got - want).abs().max())
            cases += 1
    print("kernel cases", cases)
""")


def test_compressed_linear_kernels_match_the_reference_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kernel cases 20" in r.stdout
