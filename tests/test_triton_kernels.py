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
    from presso.codegen.triton.int4 import int4_linear_tiled, pack_int4 as pack_tiled
    from presso.codegen.triton.linear import pack_nm_index
    from presso.ir.registry import get_op
    from presso.passes.quantize import rtn
    from presso.passes.sparsify import nm_prune
    from presso.ir.ops import pack_int4, rotary as rotary_ref
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
                                  (1, 45, 256, 32, False, True), (2, 19, 128, 128, True, False),
                                  (1, 40, 96, 32, True, True),      # 3 groups: split 2 takes the loop path
                                  (2, 41, 96, 64, False, True), (1, 50, 80, 32, True, False)]:  # a shorter last group
        x, w = torch.randn(M, K), torch.randn(N, K)
        b = torch.randn(N) if bias else None
        q, s, z, want = ref_int4(x, w, G, sym, b)
        got = int4_linear(x, q, s, z, b, G)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (M, N, K, G, (got - want).abs().max())
        if M == 1 and K // G >= 4:      # several groups per program, unrolled (PER > 1)
            tiled = int4_linear_tiled(x, pack_tiled(q, s, z, G), b, split=2)
            assert torch.allclose(tiled, want, rtol=1e-4, atol=1e-4), (N, K, G, (tiled - want).abs().max())
        cases += 1
    # fp16 activations take the fp16x2 paths (decode dot; M > 2 dequantized tiles), under the
    # interpreter their plain-Triton twins (same layout, same fp16 rounding points); checked against
    # the fp32 product of the same fp16 x
    for M, N, K, G, sym in [(1, 37, 256, 32, True), (2, 70, 256, 64, False), (1, 130, 512, 128, True),
                            (5, 37, 256, 32, False), (20, 70, 128, 64, True)]:
        x, w = torch.randn(M, K).half(), torch.randn(N, K)
        q, s, z, want = ref_int4(x.float(), w, G, sym, None)
        got = int4_linear_tiled(x, pack_tiled(q, s, z, G)).float()
        assert (got - want).abs().max() <= 4e-3 * want.abs().max(), (
            "fp16", M, N, K, G, (got - want).abs().max() / want.abs().max())
        cases += 1
    # decode launch configs the autotuner may pick: one step per program at K splits 1 / 4, 8 rows,
    # and multi-step walks with and without the prefetch; fp32 and fp16 x; rows end mid-block
    for dt in (torch.float32, torch.float16):
        x, w = torch.randn(1, 512).to(dt), torch.randn(41, 512)
        q, s, z, want = ref_int4(x.float(), w, 32, False, None)
        for cfg in ({"block_n": 8, "gps": 0, "split": 1, "warps": 4}, {"block_n": 16, "gps": 0, "split": 4, "warps": 4},
                    {"block_n": 32, "gps": 4, "split": 2, "warps": 4, "prefetch": 0},
                    {"block_n": 16, "gps": 2, "split": 1, "warps": 4, "prefetch": 1}):
            got = int4_linear_tiled(x, pack_tiled(q, s, z, 32), config=cfg).float()
            assert (got - want).abs().max() <= 4e-3 * want.abs().max(), ("config", dt, cfg)
            cases += 1
    for M, N, K, n, m, bias in [(1, 45, 64, 2, 4, False), (3, 70, 96, 2, 4, True), (2, 33, 64, 4, 8, True),
                                (1, 19, 48, 1, 4, False), (2, 17, 40, 3, 5, False),
                                (5, 33, 64, 4, 8, False), (4, 19, 48, 1, 4, True)]:   # M > 2: dense tiles + tl.dot
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
    # N:M with int4-quantized kept values (decode rows dequantize in registers; M > 2 once per call)
    from presso.passes.quantize import rtn as rtn_
    for M, N, K, G, sym in [(1, 37, 128, 16, True), (2, 20, 64, 32, False), (5, 19, 64, 16, True)]:
        x, w = torch.randn(M, K), torch.randn(N, K)
        vals, idx, _ = nm_prune(w, w.abs(), 2, 4)
        codes, s, z = rtn_(vals, 4, G, sym)
        z8 = None if z is None else z.to(torch.uint8)
        vq = deq.run([pack_int4(codes.to(torch.int16)), s.half(), z8], {"bits": 4, "group_size": G, "dtype": "f32"})[0]
        want = torch.nn.functional.linear(x, dens.run([vq, pack_int4(idx)], {"n": 2, "m": 4})[0])
        got = nm_linear(x, pack_int4(codes.to(torch.int16)), pack_int4(idx), 2, 4, value_scales=s.half(),
                        value_zeros=z8, value_group=G)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), ("nm int4", M, N, K, (got - want).abs().max())
        cases += 1
    # 2:4 and 4:8 in the select kernel's layout: fp16 kept values, or int4 ones (symmetric or with
    # zero points); up to 16 rows in one block of the generated kernel, more through the dense workspace
    from presso.codegen.triton.nm_select import nm_select_linear, pack_nm_select, pack_nm_select_int4
    h, bf = torch.half, torch.bfloat16
    for M, N, K, G, sym, bias, dt, (nn, mm) in [
            (1, 37, 128, 0, True, False, h, (2, 4)), (3, 70, 96, 0, True, True, h, (2, 4)),
            (17, 33, 64, 0, True, True, h, (2, 4)), (1, 37, 128, 16, True, False, h, (2, 4)),
            (2, 200, 256, 32, False, True, h, (2, 4)), (5, 130, 512, 64, True, True, h, (2, 4)),
            (18, 20, 64, 16, False, False, h, (2, 4)),
            (4, 45, 96, 0, True, True, bf, (2, 4)), (3, 20, 64, 32, False, False, bf, (2, 4)),
            (1, 37, 128, 0, True, False, h, (4, 8)), (3, 70, 96, 16, True, True, h, (4, 8)),
            (2, 45, 64, 32, False, True, h, (4, 8)), (17, 33, 64, 0, True, True, h, (4, 8)),
            (4, 45, 96, 0, True, False, bf, (4, 8))]:
        x, w = torch.randn(M, K).to(dt), torch.randn(N, K)
        b = torch.randn(N).to(dt) if bias else None
        vals, idx, _ = nm_prune(w, w.abs(), nn, mm)
        if G == 0:
            v16 = vals.to(dt)
            packed = pack_nm_select(v16, pack_int4(idx), mm)
            wd = dens.run([v16, pack_int4(idx)], {"n": nn, "m": mm})[0]
        else:
            codes, s, z = rtn_(vals, 4, G, sym)
            z8 = None if z is None else z.to(torch.uint8)
            q = pack_int4(codes.to(torch.int16))
            vq = deq.run([q, s.half(), z8], {"bits": 4, "group_size": G, "dtype": "f32"})[0]
            packed = pack_nm_select_int4(q, s.half(), z8, G, pack_int4(idx), mm)
            wd = dens.run([vq, pack_int4(idx)], {"n": nn, "m": mm})[0]
        wd = wd.to(packed.dense().dtype)               # (int4 values rebuild in fp16)
        assert torch.equal(packed.dense(), wd), ("select layout densify", M, N, K, G, mm)
        want = torch.nn.functional.linear(x.float(), wd.float(), None if b is None else b.float())
        got = nm_select_linear(x, packed, b).float()
        tol = 2e-3 if dt == torch.half else 1e-2        # (bf16 output rounding: 2^-8)
        assert (got - want).abs().max() <= tol * want.abs().max(), ("nm select", M, N, K, G, mm,
                                                                    (got - want).abs().max())
        cases += 1
    # epilogues folded into the linears: full-shaped and row-vector operands around the accumulator
    from presso.codegen.triton import int8_linear
    from presso.codegen.triton.epilogue import Epilogue
    epi = Epilogue("add(mul(silu(%1),%0),%2)", 1, (0, 2), torch.float32)
    def folded(lin, M):
        res, row = torch.randn(M, lin.shape[-1]), torch.randn(lin.shape[-1])
        return (res, row), res * torch.nn.functional.silu(lin) + row
    for M in (1, 3):     # tiled GEMV and tl.dot GEMM
        x, w = torch.randn(M, 64), torch.randn(40, 64)
        q, s, z, lin = ref_int4(x, w, 32, True, None)
        extras, want = folded(lin, M)
        got = int4_linear(x, q, s, z, None, 32, epilogue=epi, extras=extras)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), ("int4 epilogue", M, (got - want).abs().max())
        cases += 1
    # paired halves (gate and up stacked, SwiGLU as the epilogue): one GEMV for both halves at
    # M <= 2 (split-K and not; fp32 and fp16 x; with a bias), the stacked product + the
    # epilogue's kernel at M > 2; rows per half a multiple of 16 but not of the default block
    glu = Epilogue("mul(silu(%0),%1)", 0, (1,), torch.float32)
    for M, H2, K, G, split, bias, dt in [(1, 48, 128, 32, 2, True, torch.float32), (2, 80, 256, 64, 1, False, torch.float32),
                                         (1, 64, 512, 128, None, False, torch.float16), (5, 48, 128, 32, None, True, torch.float32)]:
        x, w = torch.randn(M, K), torch.randn(2 * H2, K)
        b = torch.randn(2 * H2) if bias else None
        q, s, z, lin = ref_int4(x.to(dt).float(), w, G, True, b)
        want = torch.nn.functional.silu(lin[:, :H2]) * lin[:, H2:]
        g = glu if dt == torch.float32 else Epilogue("mul(silu(%0),%1)", 0, (1,), dt)
        got = int4_linear_tiled(x.to(dt), pack_tiled(q, s, z, G), b, split=split, epilogue=g, pair=True).float()
        assert got.shape == (M, H2) and (got - want).abs().max() <= (1e-4 if dt == torch.float32 else 4e-3) * (
            1 + want.abs().max()), ("int4 pair", M, H2, (got - want).abs().max())
        cases += 1
    x, w = torch.randn(2, 64), torch.randn(40, 64)
    vals, idx, dense = nm_prune(w, w.abs(), 2, 4)
    extras, want = folded(x @ dense.T, 2)
    got = nm_linear(x, vals, pack_int4(idx), 2, 4, epilogue=epi, extras=extras)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), ("nm epilogue", (got - want).abs().max())
    sel = pack_nm_select(vals.half(), pack_int4(idx))
    wd16 = dens.run([vals.half(), pack_int4(idx)], {"n": 2, "m": 4})[0].float()
    for M in (2, 17):      # select kernel; dense workspace + the epilogue as its own kernel
        xs = torch.randn(M, 64).half()
        extras, want = folded(xs.float() @ wd16.T, M)
        got = nm_select_linear(xs, sel, epilogue=epi, extras=extras)
        assert torch.allclose(got, want, rtol=2e-3, atol=2e-3), ("select epilogue", M, (got - want).abs().max())
        cases += 1
    # split-K select: four programs per row block, the last to arrive adds the partial sums, then
    # bias and epilogue once; a repeated call finds its arrival counters reset
    x3, w3 = torch.randn(3, 256).half(), torch.randn(40, 256)
    v3, i3, _ = nm_prune(w3, w3.abs(), 2, 4)
    b3, sel3 = torch.randn(40).half(), pack_nm_select(v3.half(), pack_int4(i3))
    wd3 = dens.run([v3.half(), pack_int4(i3)], {"n": 2, "m": 4})[0].float()
    extras, want = folded(x3.float() @ wd3.T + b3.float(), 3)
    for split in (1, 4, 4):
        got = nm_select_linear(x3, sel3, b3, epilogue=epi, extras=extras, cps=2, split=split)
        assert torch.allclose(got, want, rtol=2e-3, atol=2e-3), ("select split-K", split, (got - want).abs().max())
        cases += 1
    codes, s8, _ = rtn(w, 8, 32, True)
    wd = deq.run([codes.to(torch.int8), s8.half(), None], {"bits": 8, "group_size": 32, "dtype": "f32"})[0]
    extras, want = folded(x @ wd.T, 2)
    got = int8_linear(x, codes.to(torch.int8), s8.half(), None, None, 32, epilogue=epi, extras=extras)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), ("int8 epilogue", (got - want).abs().max())
    cases += 2
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
            want = reference_latent_attention(q, hk, hv, p, HPG, 0.3, upk, cos, sin, value_groups=Gv)
            # splits of consecutive tokens, or (the default) tiles dealt round-robin to the splits
            for interleave in (True, False) if split else (True,):
                got = latent_decode_attention(q, hk, hv, p, HPG, 0.3, upk, cos, sin, value_groups=Gv, split_len=split,
                                              interleave=interleave)
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (rope, B, L, interleave, (got - want).abs().max())
                cases += 1
    # RoPE under GQA: each group's key up-projection rebuilds KPG key heads, each read by HPG / KPG
    # query heads; up_k is a strided view of the kv_cache pass's block-diagonal [Hkv*D, G*R] weight
    # (the last case rebuilds its 8 key heads in two chunks of 4)
    for B, H, HKV, G, D, R, L, pos, split in [(1, 8, 4, 2, 16, 16, 40, 33, None), (2, 8, 2, 1, 32, 16, 50, 49, 16),
                                              (1, 4, 2, 2, 16, 16, 24, 5, 16), (1, 16, 8, 1, 64, 16, 20, 19, None)]:
        kd = HKV // G * D
        bk = torch.block_diag(*[torch.randn(kd, R) * 0.2 for _ in range(G)])                     # [HKV*D, G*R]
        upk = bk.as_strided((G, R, kd), (kd * bk.stride(0) + R, 1, bk.stride(0)))
        q, hk, hv = torch.randn(B, H, D), torch.randn(B, L, G * R), torch.randn(B, L, G * 16)
        # standard tables repeat their first half (the kernel may then read half); others need not
        equal = split is None
        ang = torch.randn(L, D // 2 if equal else D)
        cos, sin, p = ang.cos().repeat(1, 1 + equal), ang.sin().repeat(1, 1 + equal), torch.tensor([pos])
        got = latent_decode_attention(q, hk, hv, p, H // G, 0.3, upk, cos, sin, split_len=split, rope_halves_equal=equal)
        # the oracle: full keys per KV head (block-diagonal linear), rotated, repeated per query head
        k = (hk[:, :pos + 1] @ bk.T).reshape(B, pos + 1, HKV, D).transpose(1, 2)
        k = rotary_ref(k, cos[:pos + 1], sin[:pos + 1]).repeat_interleave(H // HKV, 1)
        v = hv[:, :pos + 1].reshape(B, pos + 1, G, 16).transpose(1, 2).repeat_interleave(H // G, 1)
        want = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=0.3)[:, :, 0]
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), ("rope gqa", B, H, HKV, G, (got - want).abs().max())
        assert torch.allclose(reference_latent_attention(q, hk, hv, p, H // G, 0.3, upk, cos, sin), want,
                              rtol=1e-4, atol=1e-4)
        cases += 1
    # the absorbed form with the query's absorption and the value up-projection in its kernels
    # (head dim 24 and output dim 40: not powers of two, masked)
    for B, H, HPG, D, R, RV, DV, L, pos, Gv, split in [(1, 8, 4, 24, 16, 16, 40, 40, 33, None, None),
                                                       (3, 8, 2, 16, 32, 16, 16, 50, 49, 2, 16)]:
        q, wq = torch.randn(B, H, D), torch.randn(H, D, R) * 0.3
        hk, hv = torch.randn(B, L, H // HPG * R), torch.randn(B, L, (Gv or H // HPG) * RV)
        upv, p = torch.randn(H, RV, DV), torch.tensor([pos])
        got = latent_decode_attention(q, hk, hv, p, HPG, 0.3, value_groups=Gv, split_len=split, absorb=wq, up_v=upv)
        want = reference_latent_attention(q, hk, hv, p, HPG, 0.3, value_groups=Gv, absorb=wq, up_v=upv)
        assert got.shape == (B, H, DV) and torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
        cases += 1
    # plain decode attention over standard head-major caches [B, Hkv, L, D] (GQA), against SDPA
    # over the slots up to the position
    from presso.codegen.triton.latent_attention import gqa_decode_attention
    for B, H, HKV, D, L, pos, dt in [(2, 8, 2, 16, 40, 33, torch.float32), (1, 4, 4, 32, 64, 0, torch.float32),
                                     (3, 6, 2, 16, 24, 23, torch.float16)]:
        q, k, v = torch.randn(B, H, 1, D).to(dt), torch.randn(B, HKV, L, D).to(dt), torch.randn(B, HKV, L, D).to(dt)
        got = gqa_decode_attention(q, k, v, torch.tensor([pos]), 0.25).float()
        kk = k[:, :, :pos + 1].float().repeat_interleave(H // HKV, 1)
        vv = v[:, :, :pos + 1].float().repeat_interleave(H // HKV, 1)
        want = torch.nn.functional.scaled_dot_product_attention(q.float(), kk, vv, scale=0.25)
        tol = 1e-4 if dt == torch.float32 else 2e-3
        assert got.shape == (B, H, 1, D) and torch.allclose(got, want, rtol=tol, atol=tol), (got - want).abs().max()
        cases += 1
    # RoPE: cos / sin broadcast (never expanded), strided heads, fp16 rounded once
    from presso.codegen.triton.rotary import rotary
    for xs, cs, dt, strided in [((2, 4, 5, 16), (1, 1, 5, 16), torch.float32, False), ((3, 7, 12), (7, 12), torch.float32,
                                 False), ((2, 5, 4, 16), (1, 1, 5, 16), torch.float32, True),
                                ((1, 8, 1, 64), (1, 1, 1, 64), torch.float16, False)]:
        x = torch.randn(*xs).to(dt)
        x = x.transpose(1, 2) if strided else x
        c, sn = torch.randn(*cs).to(dt), torch.randn(*cs).to(dt)
        want = rotary_ref(x, c, sn)
        got = rotary(x, c, sn, want.dtype)
        assert got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-2), xs
        cases += 1
    # a decode layer's q / k RoPE and both cache writes in one launch: strided q / k / v (views of one
    # projection), slots written at arbitrary positions, the rest of each cache untouched
    from presso.codegen.triton.rotary import rotary_into_caches
    for B, H, HKV, S, D, L, dt in [(2, 4, 2, 1, 16, 10, torch.float32), (1, 6, 3, 3, 32, 8, torch.float16)]:
        qkv = torch.randn(B, S, H + 2 * HKV, D).to(dt).transpose(1, 2)
        q, k, v = qkv[:, :H], qkv[:, H:H + HKV], qkv[:, H + HKV:]
        c, sn = torch.randn(S, D).to(dt), torch.randn(S, D).to(dt)
        kc, vc = torch.randn(B, HKV, L, D).to(dt), torch.randn(B, HKV, L, D).to(dt)
        pos = torch.randperm(L)[:S]
        want_k, want_v = kc.clone(), vc.clone()
        want_k[:, :, pos] = rotary_ref(k.float(), c.float(), sn.float()).to(dt)
        want_v[:, :, pos] = v
        got = rotary_into_caches(q, k, v, c, sn, kc, vc, pos, dt)
        tol = 1e-5 if dt == torch.float32 else 2e-3
        assert torch.allclose(got.float(), rotary_ref(q.float(), c.float(), sn.float()), rtol=tol, atol=tol), (B, H)
        assert torch.allclose(kc.float(), want_k.float(), rtol=tol, atol=tol) and torch.equal(vc, want_v), (B, H)
        cases += 1
    # Palu latents (keys rotate after their rebuild): k / v latents of different widths copied into
    # token-major caches [B, L, W] at the positions, slices of one stacked projection (strided)
    for B, H, S, D, WK, WV, L, dt in [(2, 4, 1, 16, 24, 40, 10, torch.float32), (1, 8, 2, 32, 64, 32, 6, torch.float16)]:
        x = torch.randn(B, S, H * D + WK + WV).to(dt)
        q = x[..., :H * D].reshape(B, S, H, D).transpose(1, 2)
        k, v = x[..., H * D:H * D + WK], x[..., H * D + WK:]
        c, sn = torch.randn(S, D).to(dt), torch.randn(S, D).to(dt)
        kc, vc = torch.randn(B, L, WK).to(dt), torch.randn(B, L, WV).to(dt)
        pos = torch.randperm(L)[:S]
        want_k, want_v = kc.clone(), vc.clone()
        want_k[:, pos], want_v[:, pos] = k, v
        got = rotary_into_caches(q, k, v, c, sn, kc, vc, pos, dt, rotate_k=False)
        tol = 1e-5 if dt == torch.float32 else 2e-3
        assert torch.allclose(got.float(), rotary_ref(q.float(), c.float(), sn.float()), rtol=tol, atol=tol), (B, H)
        assert torch.equal(kc, want_k) and torch.equal(vc, want_v), (B, H)
        cases += 1
    print("kernel cases", cases)
""")


def test_compressed_linear_kernels_match_the_reference_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kernel cases 90" in r.stdout


def test_kernel_entry_points_reject_operands_that_do_not_fit():
    """Shape mismatches are typed errors naming the operands, raised before any launch."""
    import pytest
    import torch
    from presso.codegen.triton import nm_linear
    from presso.codegen.triton.int4 import int4_linear_tiled, pack_int4
    from presso.codegen.triton.nm_select import nm_select_linear, pack_nm_select, pack_nm_select_int4
    codes = torch.zeros(8, 32, dtype=torch.uint8)                   # 8 rows x 64 int4 codes
    w = pack_int4(codes, torch.ones(8, 2, dtype=torch.float16), None, 32)
    with pytest.raises(ValueError, match=r"x \[\.\.\., 48\] does not fit a weight of K=64"):
        int4_linear_tiled(torch.zeros(1, 48), w)
    with pytest.raises(ValueError, match=r"int4_linear\(pair=True\): needs an epilogue of the two halves"):
        int4_linear_tiled(torch.zeros(1, 64), w, pair=True)
    with pytest.raises(ValueError, match="group size 48 with K=64 has no tiled layout"):
        pack_int4(codes, torch.ones(8, 1, dtype=torch.float16), None, 48)
    index = torch.zeros(8, 16, dtype=torch.uint8)                   # 32 kept positions, 4 bits each
    with pytest.raises(ValueError, match=r"int4 values \(8, 16\) with scales \(8, 3\) do not fit groups of 16"):
        nm_linear(torch.zeros(1, 64), codes[:, :16], index, 2, 4, value_scales=torch.ones(8, 3), value_group=16)
    with pytest.raises(ValueError, match=r"24 int4 kept values per row with scales \(8, 2\) in groups of 16 have no "
                                         r"select layout \(needs K % 32 == 0"):
        pack_nm_select_int4(codes[:, :12], torch.ones(8, 2), None, 16, index[:, :12])
    with pytest.raises(ValueError, match=r"values \(8, 32\) torch.float32 have no select layout \(needs fp16 or bf16"):
        pack_nm_select(torch.zeros(8, 32), index)
    nm4 = pack_nm_select_int4(codes[:, :16], torch.ones(8, 2, dtype=torch.float16), None, 16, index)
    with pytest.raises(ValueError, match=r"x \(1, 32\) must be \[\.\.\., 64\]"):
        nm_select_linear(torch.zeros(1, 32), nm4)
    from presso.codegen.triton.latent_attention import latent_decode_attention
    q, hk, pos = torch.zeros(1, 8, 16), torch.zeros(1, 8, 2 * 32), torch.tensor([3])     # 2 groups, rank 32
    with pytest.raises(ValueError, match=r"absorb \(8, 32, 16\) must be \[H, D, R\] = \[8, 16, 32\]"):
        latent_decode_attention(q, hk, hk, pos, 4, 1.0, absorb=torch.zeros(8, 32, 16))
    with pytest.raises(ValueError, match=r"up_v \(8, 16, 16\) must be \[H, Rv, Dv\] = \[8, 32, \.\.\.\]"):
        latent_decode_attention(q, hk, hk, pos, 4, 1.0, absorb=torch.zeros(8, 16, 32), up_v=torch.zeros(8, 16, 16))
    for bad in ((2, 32, 40), (2, 32, 48)):    # 40: not a multiple of D = 16; 48: 3 key heads for 4 query heads
        with pytest.raises(ValueError, match=r"up_k \(2, 32, %d\) must be \[G, R, KPG\*D\] = \[2, 32, KPG\*16\], "
                                             r"KPG \(key heads per group\) dividing the 4 query heads" % bad[2]):
            latent_decode_attention(q, hk, hk, pos, 4, 1.0, torch.zeros(bad), torch.zeros(8, 16), torch.zeros(8, 16))
    with pytest.raises(ValueError, match=r"cos / sin \(8, 32\) / \(4, 32\) must both be \[>= L, D\] = \[>= 8, 32\]"):
        latent_decode_attention(torch.zeros(1, 8, 32), hk, hk, pos, 4, 1.0, torch.zeros(2, 32, 128), torch.zeros(8, 32),
                                torch.zeros(4, 32))
    with pytest.raises(ValueError, match="q and the caches need unit stride in their last dim"):
        latent_decode_attention(q, torch.zeros(1, 64, 8).transpose(1, 2), hk, pos, 4, 1.0)
    from presso.codegen.triton.rotary import rotary, rotary_into_caches
    with pytest.raises(ValueError, match=r"rotary_into_caches: q \(1, 4, 1, 16\), k \(1, 2, 1, 16\), v \(1, 2, 1, 16\), "
                                         r"caches \(1, 4, 8, 16\)"):
        z = torch.zeros(1, 2, 1, 16)
        rotary_into_caches(torch.zeros(1, 4, 1, 16), z, z, torch.zeros(1, 16), torch.zeros(1, 16),
                           torch.zeros(1, 4, 8, 16), torch.zeros(1, 4, 8, 16), torch.tensor([0]), torch.float32)
    with pytest.raises(ValueError, match=r"rotary_into_caches: q \(4, 16\), k \(1, 2, 1, 16\)"):
        rotary_into_caches(torch.zeros(4, 16), z, z, torch.zeros(1, 16), torch.zeros(1, 16),
                           torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16), torch.tensor([0]), torch.float32)
    with pytest.raises(ValueError, match=r"rotary: x \(2, 3, 5\) must have rank <= 4 and an even last dim"):
        rotary(torch.zeros(2, 3, 5), torch.zeros(3, 5), torch.zeros(3, 5), torch.float32)


PADDED_ROWS = textwrap.dedent("""
    import torch
    from presso.codegen.triton.latent_attention import (gqa_decode_attention, latent_decode_attention,
                                                        reference_latent_attention)
    from presso.ir.ops import rotary as rotary_ref
    torch.manual_seed(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    starts = torch.tensor([0, 5, 17])            # each row's first slot (left padding), one past a tile
    B, pos, L = 3, 30, 40
    cases = 0
    # standard GQA caches: SDPA over each row's slots start..pos
    q, k, v = torch.randn(B, 8, 1, 16), torch.randn(B, 2, L, 16), torch.randn(B, 2, L, 16)
    got = gqa_decode_attention(q, k, v, torch.tensor([pos]), 0.25, starts=starts)
    for b in range(B):
        s = int(starts[b])
        kk, vv = (t[b:b + 1, :, s:pos + 1].repeat_interleave(4, 1) for t in (k, v))
        want = sdpa(q[b:b + 1], kk, vv, scale=0.25)
        assert torch.allclose(got[b:b + 1], want, rtol=1e-4, atol=1e-4), ("gqa", b, (got[b:b + 1] - want).abs().max())
        cases += 1
    assert not torch.allclose(got, gqa_decode_attention(q, k, v, torch.tensor([pos]), 0.25), atol=1e-3)
    # latent caches, absorbed (the query's absorption and the value up-projection in the kernels)
    H, HPG, D, R, RV = 8, 4, 16, 16, 16
    qd, wq, upv = torch.randn(B, H, D), torch.randn(H, D, R) * 0.3, torch.randn(H, RV, 16)
    hk, hv = torch.randn(B, L, H // HPG * R), torch.randn(B, L, H // HPG * RV)
    for split, interleave in ((None, True), (16, False)):
        got = latent_decode_attention(qd, hk, hv, torch.tensor([pos]), HPG, 0.3, absorb=wq, up_v=upv, starts=starts,
                                      split_len=split, interleave=interleave)
        want = torch.cat([reference_latent_attention(qd[b:b + 1], hk[b:b + 1, s:], hv[b:b + 1, s:],
                                                     torch.tensor([pos - s]), HPG, 0.3, absorb=wq, up_v=upv)
                          for b, s in enumerate(starts.tolist())])
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), ("absorbed", split, (got - want).abs().max())
        assert torch.allclose(reference_latent_attention(qd, hk, hv, torch.tensor([pos]), HPG, 0.3, absorb=wq,
                                                         up_v=upv, starts=starts), want, rtol=1e-4, atol=1e-4)
        cases += 1
    # latent caches with RoPE keys rebuilt in the kernel, GQA (4 key heads, 2 groups): keys keep
    # their slot's rotation, the query its own (scores depend on the distance only)
    HKV, G = 4, 2
    kd = HKV // G * D
    bk = torch.block_diag(*[torch.randn(kd, R) * 0.2 for _ in range(G)])
    upk = bk.as_strided((G, R, kd), (kd * bk.stride(0) + R, 1, bk.stride(0)))
    ang = torch.randn(L, D // 2)
    cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)
    hk, hv = torch.randn(B, L, G * R), torch.randn(B, L, G * 16)
    got = latent_decode_attention(qd, hk, hv, torch.tensor([pos]), H // G, 0.3, upk, cos, sin, starts=starts,
                                  rope_halves_equal=True)
    for b, s in enumerate(starts.tolist()):
        kk = (hk[b:b + 1, s:pos + 1] @ bk.T).reshape(1, pos + 1 - s, HKV, D).transpose(1, 2)
        kk = rotary_ref(kk, cos[s:pos + 1], sin[s:pos + 1]).repeat_interleave(H // HKV, 1)
        vv = hv[b:b + 1, s:pos + 1].reshape(1, pos + 1 - s, G, 16).transpose(1, 2).repeat_interleave(H // G, 1)
        want = sdpa(qd[b:b + 1, :, None], kk, vv, scale=0.3)[:, :, 0]
        assert torch.allclose(got[b:b + 1], want, rtol=1e-4, atol=1e-4), ("rope", b, (got[b:b + 1] - want).abs().max())
        cases += 1
    print("padded rows", cases)
""")


def test_decode_attention_kernels_skip_the_padding_of_each_row_under_the_interpreter():
    """Left-padded batches: the latent and GQA decode attention kernels read row b's slots from
    starts[b] on only."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", PADDED_ROWS], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "padded rows 8" in r.stdout, r.stdout
