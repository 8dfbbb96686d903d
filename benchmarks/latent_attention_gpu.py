"""Palu latent-KV decode attention (presso's Triton kernel) vs torch SDPA over the full fp16 cache.

32 heads x 128, rank ratio 0.5 with 4-head groups (latent rank 256 per group for K and for V),
one decode token, L = 4k / 16k / 64k, batch 1 and 16. presso's time includes the small per-head
matmuls around the attention (absorbing q into the key latent, the value up-projection), run by
its absorb and merge kernels, so both sides produce the same [B, H, 128] attention output.
Checks against a torch reference first.
Times: CUDA-graph replays and kernel device time (benchmarks/gpu_timing.py), L2 flushed by a read.
presso's kernel device time is taken without programmatic dependent launches: with them a
kernel's span starts while the one before it still runs, and the spans' sum double-counts.

    python benchmarks/latent_attention_gpu.py            # the table below
    python benchmarks/latent_attention_gpu.py --llama    # Llama-1B's GQA + RoPE attention, RoPE form
"""
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_timing import graph_us, kernel_us  # noqa: E402

from presso.codegen.triton.latent_attention import latent_decode_attention, reference_latent_attention

H, D, HPG, RATIO = 32, 128, 4, 0.5


def bench(fn):
    """CUDA-graph replay after a read-only L2 flush (benchmarks/gpu_timing.py), the same for SDPA
    and presso: no launch overhead, as inside a captured decode step."""
    return graph_us(fn)


def sweep():
    """Block size / pipeline depth / split for batch 1, L = 16k and 64k (absorbed): kernel device
    time of the best configs (graph replay to rank them)."""
    dev = "cuda"
    G, R, B = H // HPG, int(RATIO * HPG * D), 1
    for L in (16384, 65536):
        qa = torch.randn(B, H, R, device=dev, dtype=torch.float16)
        hk = torch.randn(B, L, G * R, device=dev, dtype=torch.float16)
        hv = torch.randn(B, L, G * R, device=dev, dtype=torch.float16)
        pos = torch.tensor([L - 1], device=dev)
        rows = []
        for bt, ns, split, nw in itertools.product((16, 32, 64), (2, 3, 4), (128, 256, 512, 1024, 2048), (4, 8)):
            def run(bt=bt, ns=ns, split=split, nw=nw):
                return latent_decode_attention(qa, hk, hv, pos, HPG, 0.1, split_len=split, block_t=bt,
                                               num_stages=ns, num_warps=nw, dependent_launch=False)
            try:
                rows.append((bench(run), bt, ns, split, nw, run))
            except Exception:  # noqa: BLE001 - configs that do not fit are skipped
                continue
        for r in sorted(rows, key=lambda r: r[0])[:5]:
            k = kernel_us(r[5])
            print(f"L={L}: graph {r[0]:.1f} us, kernels {k:.1f} us ({(hk.numel() + hv.numel()) * 2 / k / 1e6:.2f} TB/s): "
                  f"block_t={r[1]} num_stages={r[2]} split={r[3]} num_warps={r[4]}", flush=True)


def main():
    dev = "cuda"
    torch.manual_seed(0)
    G = H // HPG
    R = int(RATIO * HPG * D)
    print(f"device {torch.cuda.get_device_name()}; {H} heads x {D}, groups of {HPG}, latent rank {R} (K and V)")
    print("| batch | L | SDPA fp16 µs (graph) | presso absorbed µs (graph) | speedup | same without dependent launches µs | "
          "kernel device time: SDPA / presso µs | speedup | best split's graph µs (split) | presso RoPE-rebuilt µs | "
          "speedup | latent bytes / full bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for B, L in itertools.product((1, 16), (4096, 16384, 65536)):
        q = torch.randn(B, H, D, device=dev, dtype=torch.float16)
        hk = torch.randn(B, L, G * R, device=dev, dtype=torch.float16) * 0.3
        hv = torch.randn(B, L, G * R, device=dev, dtype=torch.float16) * 0.3
        up_k = (torch.randn(G, R, HPG * D, device=dev) / R ** 0.5).half()
        up_v = (torch.randn(H, R, D, device=dev) / R ** 0.5).half()            # per head: value latent -> D
        ang = torch.randn(L, D // 2, device=dev)
        cos = torch.cat([ang.cos()] * 2, -1).half()
        sin = torch.cat([ang.sin()] * 2, -1).half()
        pos = torch.tensor([L - 1], device=dev)
        scale = D ** -0.5
        wq = up_k.reshape(G, R, HPG, D).permute(0, 2, 3, 1).reshape(H, D, R).contiguous()   # per head [D, R]

        def absorbed(split=None, dependent=None):
            return latent_decode_attention(q, hk, hv, pos, HPG, scale, split_len=split, absorb=wq, up_v=up_v,
                                           dependent_launch=dependent)

        def rebuilt(split=None):
            return latent_decode_attention(q, hk, hv, pos, HPG, scale, up_k, cos, sin, split_len=split, up_v=up_v)

        if L <= 16384 and B == 1:   # correctness at benchmark size
            for mode in ("absorbed", "rope"):
                try:
                    if mode == "absorbed":
                        got = absorbed()
                        want = reference_latent_attention(q, hk, hv, pos, HPG, scale, absorb=wq, up_v=up_v)
                    else:
                        got = rebuilt()
                        want = reference_latent_attention(q, hk, hv, pos, HPG, scale, up_k, cos, sin, up_v=up_v)
                except Exception as e:  # noqa: BLE001
                    print(f"{mode} kernel failed: {type(e).__name__}: {str(e)[:120]}")
                    continue
                err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                print(f"check {mode} B={B} L={L}: rel err {err:.1e}")
                assert err < 2e-2, f"latent attention ({mode}) wrong: {err}"
        k = torch.randn(B, H, L, D, device=dev, dtype=torch.float16)
        v = torch.randn(B, H, L, D, device=dev, dtype=torch.float16)
        qq = q[:, :, None, :]
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(qq, k, v))
        t_default = bench(absorbed)                 # the split the kernel picks by itself
        t_serial = bench(lambda: absorbed(dependent=False))     # no programmatic dependent launches
        best_a = min((bench(lambda: absorbed(s)), s) for s in (256, 512, 1024, 2048, 4096, 8192) if L // s >= 1)
        g_sdpa = kernel_us(lambda: F.scaled_dot_product_attention(qq, k, v))
        g_abs = kernel_us(lambda: absorbed(dependent=False))     # (dependent launches' spans overlap)
        try:
            best_r = min((bench(lambda: rebuilt(s)), s) for s in (None,))
        except Exception as e:  # noqa: BLE001 - report and keep the absorbed numbers
            print(f"rope kernel failed: {type(e).__name__}: {str(e)[:120]}")
            best_r = (float("nan"), None)
        ratio = (hk.numel() + hv.numel()) / (2 * B * H * L * D)
        print(f"| {B} | {L} | {t_sdpa:.1f} | {t_default:.1f} | {t_sdpa / t_default:.2f}x | {t_serial:.1f} | "
              f"{g_sdpa:.1f} / {g_abs:.1f} | "
              f"{g_sdpa / g_abs:.2f}x | {best_a[0]:.1f} ({best_a[1]}) | {best_r[0]:.1f} | "
              f"{t_sdpa / best_r[0]:.2f}x | {ratio:.2f} |", flush=True)
        torch.cuda.empty_cache()


def llama():
    """Llama-3.2-1B's attention (32 query heads, 8 KV heads of 64 dims, RoPE) under kv_cache 0.5 with
    4-head groups (2 latent groups of rank 128 for K and for V): presso's RoPE form (keys rebuilt per
    KV head and rotated inside the kernel, each serving 4 query heads; value up-projection in the
    merge) vs SDPA with GQA over the full fp16 caches, as the model runs without Palu."""
    dev, (H, HKV, D, G) = "cuda", (32, 8, 64, 2)
    R = int(RATIO * HKV // G * D)
    torch.manual_seed(0)
    print(f"\nLlama-1B attention: {H} query heads, {HKV} KV heads x {D}, {G} latent groups of rank {R}; "
          f"{torch.cuda.get_device_name()}")
    print("| batch | L | SDPA GQA fp16 µs (graph) | presso RoPE latent µs (graph) | speedup | kernel µs SDPA / presso | "
          "speedup |")
    print("|---|---|---|---|---|---|---|")
    for B, L in itertools.product((1, 16), (4096, 16384, 65536)):
        q = torch.randn(B, H, D, device=dev, dtype=torch.float16)
        hk = torch.randn(B, L, G * R, device=dev, dtype=torch.float16)
        hv = torch.randn(B, L, G * R, device=dev, dtype=torch.float16)
        up_k = (torch.randn(G, R, HKV // G * D, device=dev) / R ** 0.5).half()
        up_v = (torch.randn(H, R, D, device=dev) / R ** 0.5).half()
        ang = torch.arange(L, device=dev)[:, None] * 0.9 ** torch.arange(D // 2, device=dev)
        cos, sin = torch.cat([ang.cos()] * 2, -1).half(), torch.cat([ang.sin()] * 2, -1).half()
        pos = torch.tensor([L - 1], device=dev)

        def rebuilt(dependent=None):
            return latent_decode_attention(q, hk, hv, pos, H // G, D ** -0.5, up_k, cos, sin, up_v=up_v,
                                           dependent_launch=dependent)

        if B == 1 and L <= 16384:
            want = reference_latent_attention(q, hk, hv, pos, H // G, D ** -0.5, up_k, cos, sin, up_v=up_v)
            err = ((rebuilt().float() - want.float()).abs().max() / want.float().abs().max()).item()
            print(f"check rope gqa B={B} L={L}: rel err {err:.1e}")
            assert err < 2e-2, err
        k = torch.randn(B, HKV, L, D, device=dev, dtype=torch.float16)
        v = torch.randn(B, HKV, L, D, device=dev, dtype=torch.float16)
        qq = q[:, :, None, :]

        def sdpa():
            return F.scaled_dot_product_attention(qq, k, v, enable_gqa=True)
        t_sdpa, t_presso = bench(sdpa), bench(rebuilt)
        k_sdpa, k_presso = kernel_us(sdpa), kernel_us(lambda: rebuilt(False))
        print(f"| {B} | {L} | {t_sdpa:.1f} | {t_presso:.1f} | {t_sdpa / t_presso:.2f}x | {k_sdpa:.1f} / {k_presso:.1f} | "
              f"{k_sdpa / k_presso:.2f}x |", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    import sys
    sweep() if "--sweep" in sys.argv else llama() if "--llama" in sys.argv else main()
