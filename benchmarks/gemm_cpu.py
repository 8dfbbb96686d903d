"""One fp32 linear (1024 rows) through presso's TVM kernel vs torch's CPU GEMM, in GFLOP/s.

    python benchmarks/gemm_cpu.py
"""
import torch

from presso.codegen.tvm import build
from presso.ir.graph import Graph
from presso.ir.types import DType, TensorType
from presso.runtime.tvm_vm import TVMRuntime

from cpu_tvm import timeit   # median milliseconds (benchmarks/ is on the path when run as a script)


def gflops(fn, flops):
    return flops / timeit([fn], 15)[0] / 1e6


def main():
    print("| rows | K | N | presso llvm GFLOP/s | torch GFLOP/s |")
    print("|---|---|---|---|---|")
    for shape, K, N in [((1024,), 384, 1536), ((1024,), 1536, 384), ((8, 128), 384, 384)]:
        g = Graph("g")
        x = g.add_input("x", TensorType(shape + (K,), DType.f32))
        w = g.add_param("w", torch.randn(N, K))
        b = g.add_param("b", torch.randn(N))
        g.outputs = [g.op("linear", x, w, b)]
        built = build(g, "llvm")
        rt = TVMRuntime(g, built.executable, built.params)
        xt = torch.randn(*shape, K)
        flops = 2 * 1024 * K * N
        ours = gflops(lambda: rt(xt), flops)
        theirs = gflops(lambda: torch.nn.functional.linear(xt, g.params["w"].data, g.params["b"].data), flops)
        print(f"| {'x'.join(map(str, shape))} | {K} | {N} | {ours:.1f} | {theirs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
