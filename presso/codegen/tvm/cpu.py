"""What this CPU has: its feature flags, and which x86 extensions compiled code may need, so an
artifact can record them and a CPU without one refuses the code (instead of an illegal instruction)."""
from __future__ import annotations

import functools

# x86 instruction-set extensions LLVM may use under -mcpu=<host>: an artifact records the ones this
# host has, and loading it on a CPU that lacks one is refused (instead of an illegal instruction)
X86_ISA = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512dq", "avx512cd",
           "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_int8", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo, read once; empty where unknown)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def missing_cpu_features(requires: dict) -> list[str]:
    """The recorded features this CPU lacks (none when the host's flags cannot be read)."""
    flags = cpu_flags()
    return [f for f in requires.get("features", []) if flags and f not in flags]
