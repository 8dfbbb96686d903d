"""Greedy generation from a presso artifact's decode libraries on another architecture's Python
(under qemu-user): only TVM's runtime and numpy, no presso and no torch. The prefill library runs
over the prompt, then the step library once per new token, the caches passed back in (the step
updates them in place). Reads from an .npz written on the host: ``ids`` (i64[1, P]), the zeroed
caches ``cache<i>``, and each library's prepacked params ``prefill<i>`` / ``step<i>``; writes the
new tokens as tokens.npy.

    qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.11 qemu_tvm_generate.py CODE_DIR args.npz N outdir
"""
import os
import platform
import sys

os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")     # the runtime library only, no compiler

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm.runtime.vm import VirtualMachine  # noqa: E402


def listed(f, prefix):
    return [f[f"{prefix}{i}"] for i in range(sum(k.startswith(prefix) for k in f.files))]


def main(code_dir: str, args_path: str, new: str, out_dir: str) -> None:
    with np.load(args_path, allow_pickle=False) as f:
        ids, caches = f["ids"], listed(f, "cache")
        params = {k: [tvm.runtime.tensor(a) for a in listed(f, k)] for k in ("prefill", "step")}
    vm = {k: VirtualMachine(tvm.runtime.load_module(os.path.join(code_dir, f"decode_{k}.so")), tvm.cpu())["main"]
          for k in ("prefill", "step")}
    t = tvm.runtime.tensor
    prompt = ids.shape[1]
    starts = t(np.zeros(1, dtype=np.int64))
    outs = list(vm["prefill"](t(ids), t(np.arange(prompt, dtype=np.int64)), starts, *[t(c) for c in caches],
                              *params["prefill"]))
    tokens = []
    for step in range(int(new)):
        nxt = outs[0].numpy()[:, -1].argmax(-1).astype(np.int64)
        tokens.append(nxt)
        if step == int(new) - 1:
            break
        outs = list(vm["step"](t(nxt[:, None]), t(np.array([prompt + step], dtype=np.int64)), starts, *outs[1:],
                               *params["step"]))
    np.save(os.path.join(out_dir, "tokens.npy"), np.stack(tokens, 1))
    print(f"generated on {platform.machine()}: {len(tokens)} token(s)")


if __name__ == "__main__":
    main(*sys.argv[1:5])
