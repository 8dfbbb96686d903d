"""Per-shape launch configs for the compressed-linear kernels.

A kernel asks ``choose(kernel, key, candidates, launch, default)`` for its config (block sizes,
split, warps) at a shape. The answer is, in order: the choice stored for (kernel, key, GPU) in
``$PRESSO_CACHE_DIR/autotune.json``; with ``PRESSO_AUTOTUNE=1`` on a GPU, the fastest candidate
measured now (median of ``triton.testing.do_bench``), which is then stored for later calls and
processes; otherwise the kernel's default (the best of the benchmark sweeps in
benchmarks/RESULTS.md). Tuning is opt-in because it runs every candidate once per new shape.
Under the Triton interpreter nothing is timed.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

_STORE: dict | None = None


def store_path() -> Path:
    root = Path(os.environ.get("PRESSO_CACHE_DIR", Path.home() / ".cache" / "presso"))
    return root / "autotune.json"


def _store() -> dict:
    global _STORE
    if _STORE is None:
        try:
            _STORE = json.loads(store_path().read_text())
        except (OSError, ValueError):
            _STORE = {}
    return _STORE


def _save(store: dict) -> None:
    """Atomic: a crash never leaves a half-written store."""
    path = store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(store, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def device_name(device) -> str:
    import torch
    if getattr(device, "type", str(device)) != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device)


def choose(kernel: str, key: tuple, device, candidates: list[dict], launch: Callable[[dict], None],
           default: dict, timer: Callable[[Callable[[], None]], float] | None = None) -> dict:
    """The config to launch ``kernel`` with at ``key`` on ``device`` (see the module docstring).
    ``launch(config)`` runs the kernel once; ``timer(fn)`` measures it (do_bench by default)."""
    entry = f"{kernel}|{device_name(device)}|{','.join(map(str, key))}"
    store = _store()
    if entry in store:
        return store[entry]["config"]
    tune = os.environ.get("PRESSO_AUTOTUNE") == "1" and (timer is not None or device_name(device) != "cpu")
    if not tune:
        return default
    if timer is None:
        import triton

        def timer(fn):
            return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
    timed = []
    for cfg in candidates:
        try:
            launch(cfg)
            timed.append((timer(lambda: launch(cfg)), cfg))
        except Exception:  # noqa: BLE001 - a config that does not compile or fit is skipped
            continue
    if not timed:
        return default
    best_t, best = min(timed, key=lambda tc: tc[0])
    store[entry] = {"config": best, "ms": best_t, "tried": len(timed)}
    _save(store)
    return best
