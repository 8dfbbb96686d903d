"""presso's compressed-linear Triton kernels vs torch on the GPU, side by side in one run.

    python benchmarks/kernels_gpu.py        (needs a CUDA GPU)

Checks each kernel against a float reference at the benchmark size first, then times (median of
triton.testing.do_bench) a block-size sweep and reports the best, the torch baselines, speedups,
and achieved bandwidth against the copy bandwidth measured in the same run.
"""
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

from presso.codegen.triton import nm_linear
from presso.codegen.triton.int4 import int4_linear_tiled, pack_int4
from presso.codegen.triton.linear import pack_nm_index
from presso.ir.ops import pack_int4 as pack_codes
from presso.passes.quantize import dequant, rtn
from presso.passes.sparsify import nm_prune


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # microseconds


def main():
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev = "cuda"
    torch.manual_seed(0)
    rows = []
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_tbps = 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e6
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy bandwidth {copy_tbps:.3f} TB/s (1 GiB)")
    N, K, G = 14336, 4096, 128
    W = torch.randn(N, K, device=dev) * 0.02
    codes, s, z = rtn(W, 4, G, True)
    q, s16 = pack_codes(codes.to(torch.int16)), s.half()
    Wq16 = dequant(codes, s16.double(), None, G).half()
    int4_bytes = q.numel() + s16.numel() * 2
    w4 = pack_int4(q, s16, None, G)             # the tiled layout the cuda target repacks to at load
    # a plain copy of the same byte count: the ceiling at this size (launch and ramp included)
    buf = torch.empty(int4_bytes, dtype=torch.uint8, device=dev)
    copy_same = 2 * int4_bytes / bench(lambda: buf.clone()) / 1e6
    for M in (1, 16):
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        want = F.linear(x.float(), Wq16.float())
        got = int4_linear_tiled(x, w4)
        err = ((got.float() - want).abs().max() / want.abs().max()).item()
        assert err < 2e-2, f"int4 kernel wrong at M={M}: rel err {err}"
        best = None
        for sp, nw in (itertools.product((None, 4, 8, 16, 32), (4, 8)) if M == 1 else [(None, 4)]):
            t = bench(lambda: int4_linear_tiled(x, w4, split=sp, num_warps=nw))
            if best is None or t < best[0]:
                best = (t, f"split={sp or 'auto'}", f"warps={nw}")
        if M > 2:      # the GEMM's block_n x split x warps x stages, through the autotune store
            from presso.codegen.triton import autotune
            os.environ["PRESSO_AUTOTUNE"] = "1"
            int4_linear_tiled(x, w4)
            os.environ.pop("PRESSO_AUTOTUNE")
            cfg = [v for k, v in autotune._store().items() if k.startswith("int4_gemm|") and f"|{M},{N},{K}," in k]
            t = bench(lambda: int4_linear_tiled(x, w4))
            got = int4_linear_tiled(x, w4)
            err = ((got.float() - want).abs().max() / want.abs().max()).item()
            assert err < 2e-2, f"autotuned int4 GEMM wrong at M={M}: rel err {err}"
            if t < best[0]:
                best = (t, "autotuned", json.dumps(cfg[0]["config"]) if cfg else "?")
        t_fp16 = bench(lambda: F.linear(x, Wq16))
        t = best[0]
        rows.append({"workload": f"int4 g{G} linear {M}x{K}->{N}", "presso_us": round(t, 1), "torch_fp16_us": round(t_fp16, 1),
                     "speedup": round(t_fp16 / t, 2), "presso_TBps": round(int4_bytes / t / 1e6, 3),
                     "fp16_TBps": round(N * K * 2 / t_fp16 / 1e6, 3), "config": best[1:], "rel_err": err})
    Wd = W.half()
    vals, idx, dense = nm_prune(Wd.float(), Wd.float().abs(), 2, 4)
    vals, index4, dense = vals.half(), pack_codes(idx), dense.half()
    index2, _ = pack_nm_index(index4, vals.shape[1], 4)          # 2-bit metadata, as the cuda target runs it
    for (bits, index), M in itertools.product(((2, index2), (4, index4)), (1, 16)):
        if bits == 4 and M == 16:
            continue
        nm_bytes = vals.numel() * 2 + index.numel()
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        want = F.linear(x.float(), dense.float())
        got = nm_linear(x, vals, index, 2, 4, index_bits=bits)
        err = ((got.float() - want).abs().max() / want.abs().max()).item()
        assert err < 2e-2, f"2:4 kernel wrong at M={M}: rel err {err}"
        best = None
        sweep = itertools.product((8, 16, 32), (64, 128, 256), (4, 8)) if M == 1 else [(16, 128, 8)]
        for bn, bj, nw in sweep:
            try:
                t = bench(lambda: nm_linear(x, vals, index, 2, 4, block_n=bn, block_j=bj, num_warps=nw, index_bits=bits))
            except Exception:  # noqa: BLE001
                continue
            if best is None or t < best[0]:
                best = (t, bn, bj, nw)
        if M > 2:      # the dense-tile tl.dot kernel: block_n x block_k x warps through the autotune store
            from presso.codegen.triton import autotune
            os.environ["PRESSO_AUTOTUNE"] = "1"
            nm_linear(x, vals, index, 2, 4, index_bits=bits)
            os.environ.pop("PRESSO_AUTOTUNE")
            cfg = [v for k, v in autotune._store().items() if k.startswith("nm_gemm|") and f"|{M},{N},{K}," in k]
            got = nm_linear(x, vals, index, 2, 4, index_bits=bits)
            err = ((got.float() - want).abs().max() / want.abs().max()).item()
            assert err < 2e-2, f"2:4 GEMM kernel wrong at M={M}: rel err {err}"
            best = (bench(lambda: nm_linear(x, vals, index, 2, 4, index_bits=bits)), "autotuned",
                    json.dumps(cfg[0]["config"]) if cfg else "?", "")
        t_dense = bench(lambda: F.linear(x, dense))
        semi = "n/a"
        try:
            from torch.sparse import to_sparse_semi_structured
            ws = to_sparse_semi_structured(dense)
            xp = torch.zeros(max(M, 32), K, device=dev, dtype=torch.float16)
            xp[:M] = x
            semi = round(bench(lambda: F.linear(xp, ws)), 1)
        except Exception as e:  # noqa: BLE001
            semi = f"ERR {type(e).__name__}: {str(e)[:80]}"
        t = best[0]
        rows.append({"workload": f"2:4 sparse linear {M}x{K}->{N} fp16, {bits}-bit index", "presso_us": round(t, 1),
                     "torch_fp16_us": round(t_dense, 1), "torch_semi_structured_us": semi,
                     "speedup": round(t_dense / t, 2), "presso_TBps": round(nm_bytes / t / 1e6, 3),
                     "fp16_TBps": round(N * K * 2 / t_dense / 1e6, 3), "config": best[1:], "rel_err": err})
    print(f"copy of the int4 weight's {int4_bytes / 1e6:.1f} MB: {copy_same:.3f} TB/s (the ceiling at that size)")
    print("| workload | presso µs | torch fp16 µs | speedup | presso TB/s (of copy) | torch TB/s | other peer | config |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['presso_us']} | {r['torch_fp16_us']} | {r['speedup']}x | {r['presso_TBps']} "
              f"({r['presso_TBps'] / copy_tbps:.0%}) | {r['fp16_TBps']} | {r.get('torch_semi_structured_us', '')} | "
              f"{r['config']} |")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernels_gpu.json"), "w") as f:
            json.dump({"copy_TBps": copy_tbps, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
