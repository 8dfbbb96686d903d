"""How the GPU benchmarks time things: two measures, the same for presso and for every peer.

* ``graph_us``: the call recorded once as a CUDA graph and replayed, the L2 flushed (by a read)
  before each replay (presso.codegen.triton.autotune.graph_time): what a captured decode step
  pays, the graph's own launch (~3 us on the H100) included.
* ``kernel_us``: the summed device time of the call's kernels (CUPTI, through torch.profiler),
  L2 flushed the same way before each call: kernel durations as Nsight reports them, launch gaps
  excluded.

A plain timed call (triton.testing.do_bench on the Python function) is not used for kernels:
for a ~20 us kernel it measured 25-48 us on the H100, mostly Python and launch overhead.
"""
import torch
from torch.profiler import ProfilerActivity, profile

from presso.codegen.triton.autotune import flush_l2, graph_time


def graph_us(fn) -> float:
    return graph_time(fn) * 1e3


def kernel_us(fn, calls: int = 30) -> float:
    """Mean device time per call of the kernels ``fn`` launches (the flush's own kernels left out)."""
    for _ in range(3):
        fn()
    flush_l2()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as ref:
        flush_l2()
        torch.cuda.synchronize()
    flush_names = {e.name for e in ref.events() if e.device_type.name == "CUDA"}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush_l2()
            fn()
        torch.cuda.synchronize()
    total = sum(e.device_time for e in prof.events() if e.device_type.name == "CUDA" and e.name not in flush_names)
    return total / calls
