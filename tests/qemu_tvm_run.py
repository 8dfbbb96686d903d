"""Runs a presso artifact's TVM library on another architecture's Python (under qemu-user): only
TVM's runtime and numpy, no presso and no torch. Reads the inputs and the prepacked params from an
.npz written on the host (``arrays`` in argument order), writes the outputs as out<i>.npy.

    qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.11 qemu_tvm_run.py model.so args.npz outdir
"""
import os
import platform
import sys

os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")     # the runtime library only, no compiler

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm.runtime.vm import VirtualMachine  # noqa: E402


def main(lib_path: str, args_path: str, out_dir: str) -> None:
    with np.load(args_path, allow_pickle=False) as f:
        arrays = [f[f"a{i}"] for i in range(len(f.files))]
    vm = VirtualMachine(tvm.runtime.load_module(lib_path), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    outs = [out] if hasattr(out, "numpy") else list(out)
    for i, o in enumerate(outs):
        np.save(os.path.join(out_dir, f"out{i}.npy"), o.numpy())
    print(f"ran on {platform.machine()}: {len(outs)} output(s)")


if __name__ == "__main__":
    main(*sys.argv[1:4])
