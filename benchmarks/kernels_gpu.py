"""presso's compressed-linear Triton kernels vs torch on the GPU, side by side in one run.

    python benchmarks/kernels_gpu.py        (needs a CUDA GPU)

Each kernel is checked against a float reference at the benchmark size, tuned through the
autotune store (PRESSO_AUTOTUNE=1 into a fresh cache dir: every candidate config timed as a
CUDA-graph replay), then timed both ways of benchmarks/gpu_timing.py (graph replay and kernel
device time, L2 flushed by a read before each call) next to torch fp16 ``F.linear`` (and
``to_sparse_semi_structured`` for 2:4). Bandwidth is reported against a copy of 1 GiB measured
in the same run.
"""
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_timing import graph_us, kernel_us  # noqa: E402

from presso.codegen.triton import autotune, nm_linear  # noqa: E402
from presso.codegen.triton.int4 import int4_linear_tiled, pack_int4  # noqa: E402
from presso.codegen.triton.linear import pack_nm_index  # noqa: E402
from presso.codegen.triton.nm_select import nm_select_linear, pack_nm_select, pack_nm_select_int4  # noqa: E402
from presso.ir.ops import pack_int4 as pack_codes  # noqa: E402
from presso.passes.quantize import dequant, rtn  # noqa: E402
from presso.passes.sparsify import nm_prune  # noqa: E402


def rel_err(got, want):
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def tuned_config(fn, kernel: str, M: int, N: int) -> str:
    """Run ``fn`` once with tuning on (the store then holds this shape's fastest config); that config."""
    before = set(autotune._store())
    os.environ["PRESSO_AUTOTUNE"] = "1"
    fn()
    os.environ.pop("PRESSO_AUTOTUNE")
    store = autotune._store()
    hits = [store[k]["config"] for k in store if k not in before and k.startswith(kernel + "|") and f"|{M},{N}," in k]
    return json.dumps(hits[0]) if hits else "default"


def measure(workload, fn, torch_fn, nbytes, dense_bytes, config, err, peer=""):
    r = {"workload": workload, "config": config, "rel_err": f"{err:.1e}", "peer": peer}
    for how, timer in (("graph", graph_us), ("kernel", kernel_us)):
        t, t0 = timer(fn), timer(torch_fn)
        r[f"presso_{how}_us"], r[f"torch_{how}_us"] = round(t, 1), round(t0, 1)
        r[f"speedup_{how}"] = round(t0 / t, 2)
    r["presso_TBps"] = round(nbytes / r["presso_kernel_us"] / 1e6, 3)
    r["torch_TBps"] = round(dense_bytes / r["torch_kernel_us"] / 1e6, 3)
    print(json.dumps(r), flush=True)
    return r


def select_rows(label, w, wdense, K, N, peer=lambda M, x: ""):
    """Rows for the N:M select kernel (the cuda target's) at 1, 4 and 16 rows of x, checked against
    x @ wdense^T, timed beside F.linear(x, wdense); ``label`` has a ``{shape}`` field."""
    rows = []
    for M in (1, 4, 16):
        x = torch.randn(M, K, device=wdense.device, dtype=torch.float16)
        want = F.linear(x.float(), wdense.float())

        def run():
            return nm_select_linear(x, w)
        cfg = tuned_config(run, "nm_select", M, N)
        err = rel_err(run(), want)
        assert err < 2e-2, f"{label}: select kernel wrong at M={M}: rel err {err}"
        name = label.format(shape=f"{M}x{K}->{N}") + ", select kernel (the cuda target's)"
        rows.append(measure(name, run, lambda: F.linear(x, wdense), w.nbytes, N * K * 2, cfg, err,
                            peer(M, x)))
    return rows


def main():
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    os.environ["PRESSO_CACHE_DIR"] = tempfile.mkdtemp(prefix="presso-tune-")
    dev = "cuda"
    torch.manual_seed(0)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_tbps = 2 * src.numel() / kernel_us(lambda: dst.copy_(src), calls=10) / 1e6
    src = dst = None                # free the 2 GiB before the workloads
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy bandwidth {copy_tbps:.3f} TB/s (1 GiB, read + write)")
    rows = []
    N, K, G = 14336, 4096, 128
    W = torch.randn(N, K, device=dev) * 0.02
    codes, s, _ = rtn(W, 4, G, True)
    q, s16 = pack_codes(codes.to(torch.int16)), s.half()
    Wq16 = dequant(codes, s16.double(), None, G).half()
    w4 = pack_int4(q, s16, None, G)             # the tiled layout the cuda target repacks to at load
    for M in (1, 16):
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        want = F.linear(x.float(), Wq16.float())
        cfg = tuned_config(lambda: int4_linear_tiled(x, w4), "int4_gemv" if M <= 2 else "int4_gemm", M, N)
        err = rel_err(int4_linear_tiled(x, w4), want)
        assert err < 2e-2, f"int4 kernel wrong at M={M}: rel err {err}"
        rows.append(measure(f"int4 g{G} linear {M}x{K}->{N}", lambda: int4_linear_tiled(x, w4),
                            lambda: F.linear(x, Wq16), w4.nbytes, N * K * 2, cfg, err))
    Wd = W.half()
    vals, idx, dense = nm_prune(Wd.float(), Wd.float().abs(), 2, 4)
    vals, index4, dense = vals.half(), pack_codes(idx), dense.half()
    index2, _ = pack_nm_index(index4, vals.shape[1], 4)          # 2-bit metadata, the gather kernel's form
    def semi_structured(M, x):
        try:
            from torch.sparse import to_sparse_semi_structured
            ws = to_sparse_semi_structured(dense)
            xp = torch.zeros(max(M, 32), K, device=dev, dtype=torch.float16)
            xp[:M] = x
            return f"semi-structured {graph_us(lambda: F.linear(xp, ws)):.1f} us (graph)"
        except Exception as e:  # noqa: BLE001 - reported, not fatal: the peer may not run on this GPU
            return f"semi-structured ERR {type(e).__name__}: {str(e)[:80]}"
    # the layout the cuda target repacks to at load
    rows += select_rows("2:4 sparse linear {shape} fp16", pack_nm_select(vals, index4), dense, K, N, semi_structured)
    x = torch.randn(1, K, device=dev, dtype=torch.float16)

    def run_gather():
        return nm_linear(x, vals, index2, 2, 4, index_bits=2)
    cfg = tuned_config(run_gather, "nm_linear", 1, N)
    err = rel_err(run_gather(), F.linear(x.float(), dense.float()))
    rows.append(measure(f"2:4 sparse linear 1x{K}->{N} fp16, gather kernel (other N:M, bf16)", run_gather,
                        lambda: F.linear(x, dense), vals.numel() * 2 + index2.numel(), N * K * 2, cfg, err))
    # 2:4 whose kept values are int4 (g128): codes + scales + 2-bit index, the int4 + 2:4 recipe's linears
    vcodes, vs, _ = rtn(vals.float(), 4, G, True)
    vq = pack_codes(vcodes.to(torch.int16))
    from presso.ir.registry import get_op
    vdq = get_op("dequantize").run([vq, vs.half(), None], {"bits": 4, "group_size": G, "dtype": "f16"})[0]
    vdense = get_op("densify_nm").run([vdq, index4], {"n": 2, "m": 4})[0]
    want = F.linear(x.float(), vdense.float())

    def run_q():
        return nm_linear(x, vq, index2, 2, 4, index_bits=2, value_scales=vs.half(), value_group=G)
    cfg = tuned_config(run_q, "nm_linear", 1, N)
    err = rel_err(run_q(), want)
    assert err < 2e-2, f"2:4 int4-values kernel wrong: rel err {err}"
    rows.append(measure(f"2:4 + int4 g{G} values linear 1x{K}->{N}, gather kernel (other N:M)", run_q,
                        lambda: F.linear(x, vdense), vq.numel() + vs.numel() * 2 + index2.numel(), N * K * 2, cfg, err))
    rows += select_rows(f"2:4 + int4 g{G} values linear {{shape}}", pack_nm_select_int4(vq, vs.half(), None, G, index4),
                        vdense, K, N)
    # 4:8: the same select kernel (three prmt per pair of kept values), and the kernels 4:8 ran before
    vals8, idx8, dense8 = nm_prune(Wd.float(), Wd.float().abs(), 4, 8)
    vals8, index8, dense8 = vals8.half(), pack_codes(idx8), dense8.half()
    rows += select_rows("4:8 sparse linear {shape} fp16", pack_nm_select(vals8, index8, 8), dense8, K, N)
    for M in (1, 4):
        x = torch.randn(M, K, device=dev, dtype=torch.float16)

        def run_old():
            return nm_linear(x, vals8, index8, 4, 8)
        err = rel_err(run_old(), F.linear(x.float(), dense8.float()))
        kind = "gather" if M <= 2 else "dense-tile tl.dot"
        rows.append(measure(f"4:8 sparse linear {M}x{K}->{N} fp16, {kind} kernel (before)", run_old,
                            lambda: F.linear(x, dense8), vals8.numel() * 2 + index8.numel(), N * K * 2, None, err))
    vcodes8, vs8, _ = rtn(vals8.float(), 4, G, True)
    vq8 = pack_codes(vcodes8.to(torch.int16))
    vdq8 = get_op("dequantize").run([vq8, vs8.half(), None], {"bits": 4, "group_size": G, "dtype": "f16"})[0]
    rows += select_rows(f"4:8 + int4 g{G} values linear {{shape}}", pack_nm_select_int4(vq8, vs8.half(), None, G,
                                                                                       index8, 8),
                        get_op("densify_nm").run([vdq8, index8], {"n": 4, "m": 8})[0], K, N)
    print("| workload | presso µs kernel / graph | torch fp16 µs kernel / graph | speedup kernel / graph | "
          "presso TB/s (of copy) | torch TB/s | other peer | config |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['presso_kernel_us']} / {r['presso_graph_us']} | {r['torch_kernel_us']} / "
              f"{r['torch_graph_us']} | {r['speedup_kernel']}x / {r['speedup_graph']}x | {r['presso_TBps']} "
              f"({r['presso_TBps'] / copy_tbps:.0%}) | {r['torch_TBps']} | {r['peer']} | {r['config']} |")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernels_gpu.json"), "w") as f:
            json.dump({"copy_TBps": copy_tbps, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
