"""int4 g128 decode GEMVs (one row of x) on the GPU: presso's kernel against torch fp16 and the
int4 peers a user would pick (torchao tinygemm, gemlite A16W4), all in one run, next to the
physical limit: the bytes the kernel must read over the copy bandwidth measured in the same run
(and, for the graph column, plus the replay time of a graph holding one empty kernel).

    python benchmarks/int4_gemv_gpu.py [--sweep] [--ncu]      (needs a CUDA GPU)

Every launch is checked against x @ dequant(W)^T in fp32 before it is timed. Timing: both
measures of benchmarks/gpu_timing.py (graph replay after an L2 flush; CUPTI kernel time). Rows:
``presso`` is the kernel's default config (no tuning), ``presso, before`` the config the kernel
used before (16 rows x 4 groups a step, several steps a program; ``+ prefetch``: each step's
weights loaded during the one before), and with ``--sweep`` every
candidate of ``PRESSO_AUTOTUNE`` timed as a graph at the first two shapes, the best one reported. Peers that are not
installed are reported as missing (torchao 0.18.0 is a wheel; gemlite 0.6.0.post2 a pure-Python
package folder on the path). ``--ncu``: one launch of the default and of the "before" config at
1x4096->14336 and nothing else, for ``ncu --kernel-name regex:int4_gemv``.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_timing import graph_us, kernel_us  # noqa: E402

from presso.codegen.triton.int4 import gemv_candidates, int4_linear_tiled, pack_int4  # noqa: E402
from presso.codegen.triton.splitk import split_factor  # noqa: E402
from presso.ir.ops import pack_int4 as pack_codes  # noqa: E402
from presso.passes.quantize import dequant, rtn  # noqa: E402

G = 128
SHAPES = [(14336, 4096), (2048, 2048), (2048, 8192), (4096, 4096), (8192, 2048), (128256, 2048)]
SWEPT = SHAPES[:2]          # --sweep: the two floors (each config is compiled once: ~1 s)


@triton.jit
def _empty(y_ptr):
    tl.store(y_ptr, 0.0)


def copy_tbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / kernel_us(lambda: dst.copy_(src), calls=10) / 1e6


def before_config(N: int, K: int) -> dict:
    """The decode config the kernel used before this change: 16 rows, 4 groups a step, split
    until 6 programs per SM."""
    groups = K // G
    return {"block_n": 16, "gps": 4, "split": split_factor(triton.cdiv(N, 16), groups // 4, 6, "cuda"), "warps": 4,
            "prefetch": 0}


def weights(N, K):
    torch.manual_seed(0)
    W = torch.randn(N, K, device="cuda") * 0.02
    codes, s, _ = rtn(W, 4, G, True)
    s16 = s.half()
    Wq16 = dequant(codes, s16.double(), None, G).half()
    return codes, s16, Wq16, pack_int4(pack_codes(codes.to(torch.int16)), s16, None, G)


def check(got, want, what):
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert err < 2e-3, f"{what}: rel err {err:.2e}"
    return err


def peers(N, K, codes, s16, Wq16, x):
    """torchao tinygemm (bf16, what Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")
    installs) and gemlite A16W4 (fp16): {name: callable} for those installed, else {name: error}."""
    out = {}
    try:
        from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import \
            Int4TilePackedTo4dTensor
        wt = Int4TilePackedTo4dTensor.from_hp(Wq16.bfloat16(), [1, G])
        xb = x.bfloat16()
        out["torchao tinygemm (bf16)"] = lambda: F.linear(xb, wt)
    except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
        out["torchao tinygemm (bf16)"] = f"{type(e).__name__}: {str(e)[:60]}"
    try:
        from gemlite.helper import A16Wn
        sc = s16.view(N, K // G)
        gl = A16Wn(device="cuda", dtype=torch.float16).from_weights((codes + 8).clamp(0, 15).to(torch.uint8), sc,
                                                                    torch.full_like(sc, 8.0), 4, G)
        out["gemlite A16W4 (fp16)"] = lambda: gl(x)
    except Exception as e:  # noqa: BLE001
        out["gemlite A16W4 (fp16)"] = f"{type(e).__name__}: {str(e)[:60]}"
    return out


def main():
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    if "--ncu" in sys.argv:
        N, K = SHAPES[0]
        _, _, Wq16, w4 = weights(N, K)
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        want = x.float() @ Wq16.float().T
        check(int4_linear_tiled(x, w4), want, "default")
        check(int4_linear_tiled(x, w4, config=before_config(N, K)), want, "before")
        check(int4_linear_tiled(x, w4, config=dict(before_config(N, K), prefetch=1)), want, "before + prefetch")
        torch.cuda.synchronize()
        return
    bw = copy_tbps()
    y0 = torch.empty(1, device="cuda")
    launch_us = graph_us(lambda: _empty[(1,)](y0))
    dev = torch.cuda.get_device_name()
    print(f"device {dev}, torch {torch.__version__}, triton {triton.__version__}, copy bandwidth {bw:.3f} TB/s "
          f"(1 GiB, read + write), one empty kernel as a graph {launch_us:.1f} us", flush=True)
    rows = []
    for N, K in SHAPES:
        codes, s16, Wq16, w4 = weights(N, K)
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        want = x.float() @ Wq16.float().T
        limit = w4.nbytes / bw / 1e6
        r = {"shape": f"1x{K}->{N}", "bytes": w4.nbytes, "limit_kernel_us": limit, "limit_graph_us": limit + launch_us}
        runs = {"torch fp16": lambda: F.linear(x, Wq16),
                "presso": lambda: int4_linear_tiled(x, w4),
                "presso, before": lambda: int4_linear_tiled(x, w4, config=before_config(N, K)),
                "presso, before + prefetch": lambda: int4_linear_tiled(x, w4, config=dict(before_config(N, K),
                                                                                          prefetch=1))}
        runs.update(peers(N, K, codes, s16, Wq16, x))
        for name, fn in runs.items():
            if isinstance(fn, str):
                r[name] = fn
                continue
            err = check(fn(), want, f"{name} {r['shape']}") if name.startswith("presso") else None
            r[name] = {"graph_us": graph_us(fn), "kernel_us": kernel_us(fn), "rel_err": err}
        if "--sweep" in sys.argv and (N, K) in SWEPT:
            best = None
            for cfg in gemv_candidates(K // G, G // 8, False):
                fn = lambda: int4_linear_tiled(x, w4, config=cfg)  # noqa: E731
                check(fn(), want, f"{cfg} {r['shape']}")
                t = graph_us(fn)
                if best is None or t < best[0]:
                    best = (t, cfg)
            fn = lambda: int4_linear_tiled(x, w4, config=best[1])  # noqa: E731
            r["presso, best of sweep"] = {"graph_us": best[0], "kernel_us": kernel_us(fn), "config": best[1]}
        print(json.dumps(r), flush=True)
        rows.append(r)
    names = ["presso", "presso, before", "presso, before + prefetch", "presso, best of sweep", "torch fp16", "torchao tinygemm (bf16)",
             "gemlite A16W4 (fp16)"]
    print(f"\n{dev}, copy {bw:.2f} TB/s; graph us (kernel us); physical limit = int4 bytes / copy bandwidth "
          f"(graph: + {launch_us:.1f} us, an empty kernel's graph)")
    print("| shape | physical limit | " + " | ".join(names) + " | presso % of copy (kernel) | vs fp16 graph / kernel |")
    print("|---" * (len(names) + 4) + "|")
    for r in rows:
        cells = []
        for n in names:
            v = r.get(n)
            cells.append("-" if v is None else (f"{v['graph_us']:.1f} ({v['kernel_us']:.1f})" if isinstance(v, dict)
                                                else f"n/a: {v}"))
        p, t = r["presso"], r["torch fp16"]
        print(f"| 1x{r['shape'][2:]} | {r['limit_graph_us']:.1f} ({r['limit_kernel_us']:.1f}) | " + " | ".join(cells)
              + f" | {r['limit_kernel_us'] / p['kernel_us']:.0%} | {t['graph_us'] / p['graph_us']:.2f}x / "
              f"{t['kernel_us'] / p['kernel_us']:.2f}x |")
    for r in rows:
        if "presso, best of sweep" in r:
            print(r["shape"], "best of sweep:", r["presso, best of sweep"]["config"])
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "int4_gemv_gpu.json"), "w") as f:
            json.dump({"device": dev, "copy_TBps": bw, "empty_graph_us": launch_us, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
