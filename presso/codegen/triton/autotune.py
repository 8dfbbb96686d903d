"""Per-shape launch configs for the compressed-linear kernels.

A kernel asks ``choose(kernel, key, candidates, launch, default)`` for its config (block sizes,
split, warps) at a shape. The answer is, in order: the choice stored for (kernel, key, GPU) in
``$PRESSO_CACHE_DIR/autotune.json``; with ``PRESSO_AUTOTUNE=1`` on a GPU, the fastest candidate
measured now (``graph_time``: the launch replayed as a CUDA graph, L2 flushed before each
replay), which is then stored for later calls and processes; otherwise the kernel's default
(the best of the benchmark sweeps in benchmarks/RESULTS.md). Tuning is opt-in because it runs
every candidate once per new shape. Under the Triton interpreter nothing is timed.

The store is shared by processes: a write takes a lock (``autotune.json.lock``), re-reads the
file and adds its entry, so concurrent tuners keep each other's entries. What is read is checked:
a file that is not a JSON object of entries is ignored with a warning, a malformed entry is
dropped, and a stored config is launched only when it has the kernel's knobs with values of their
types (and is one of the candidates, when they are given as a list).
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ...config import autotune, cache_root
from ...errors import CacheError

_STORE: dict | None = None


def store_path() -> Path:
    return cache_root() / "autotune.json"


_MEMO: dict = {}      # (kernel, key, device, tuning on?) -> the config choose() returned: no re-lookup per call


def _store() -> dict:
    global _STORE
    if _STORE is None:
        _MEMO.clear()
        _STORE = _read(store_path())
    return _STORE


def _read(path: Path) -> dict:
    """The valid entries of the store at ``path`` ({} when there is none or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:
        warnings.warn(f"ignoring the autotune store {path}: it cannot be read as JSON ({e})", RuntimeWarning)
        return {}
    if not isinstance(data, dict):
        warnings.warn(f"ignoring the autotune store {path}: expected a JSON object of entries, "
                      f"got {type(data).__name__}", RuntimeWarning)
        return {}
    good = {k: v for k, v in data.items() if _valid_entry(v)}
    if len(good) != len(data):
        warnings.warn(f"ignoring {len(data) - len(good)} malformed entr(y/ies) of the autotune store {path}",
                      RuntimeWarning)
    return good


def _valid_entry(v) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("config"), dict) and v["config"]
            and all(isinstance(k, str) for k in v["config"]))


def _fits(config: dict, default: dict, candidates) -> bool:
    """A stored config may be launched: the default's knobs (other knobs: an earlier kernel
    version's), each of the default's type, ints in a launch's range; one of the candidates when
    they are a list (a candidates function is not called just to check)."""
    if set(config) != set(default):
        return False
    for k, v in config.items():
        if type(v) is not type(default[k]) or (isinstance(v, int) and not isinstance(v, bool)
                                                and not 0 <= v <= 1 << 16):
            return False
    return callable(candidates) or config in candidates


@contextmanager
def _locked(path: Path):
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _save(entry: str, value: dict) -> None:
    """Add one entry under the store's lock, merged into what other processes stored since this
    one read it; written atomically (a crash never leaves a half-written store)."""
    path = store_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            store = _read(path)
            store[entry] = value
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(store, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
    except OSError as e:
        raise CacheError(f"cannot store a tuned config in {path} ($PRESSO_CACHE_DIR): {e.strerror or e}; point "
                         "PRESSO_CACHE_DIR at a writable folder, or unset PRESSO_AUTOTUNE") from None
    _store().update(store)


def device_name(device) -> str:
    import torch
    if getattr(device, "type", str(device)) != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device)


_SMS: dict = {}


def sm_count(device) -> int:
    """The GPU's multiprocessor count (launch grids are sized by it), asked of the driver once per
    device: a plain decode step sizes ~100 launches by it, and each query costs ~15 us of host time."""
    import torch
    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[index]


_FLUSH: dict = {}


def flush_l2() -> None:
    """Evict the GPU's L2 by *reading* 256 MB: it is left holding clean lines, as in a decode step
    where it holds the previous layers' weights. (Zeroing a buffer, as do_bench does, leaves it
    full of dirty lines whose write-back the timed kernel would then pay for.)"""
    import torch
    buf = _FLUSH.get("buf")
    if buf is None:
        buf = _FLUSH["buf"] = torch.ones(64 << 20, dtype=torch.int32, device="cuda")
        _FLUSH["out"] = torch.empty(1024, dtype=torch.int32, device="cuda")
    torch.sum(buf.view(1024, -1), dim=1, out=_FLUSH["out"])


def graph_time(fn: Callable[[], None], rep: int = 100) -> float:
    """Milliseconds per call of ``fn`` (median of ``rep``), recorded once as a CUDA graph and
    replayed after an L2 flush (``flush_l2``). This is how a compiled decode step runs: no Python
    or launch overhead (a plain timed call of a ~20 us kernel measured 25-48 us, mostly launch
    cost), weights streamed from HBM, not from a warm L2 (a 30 MB int4 weight fits the H100's
    50 MB L2). The graph's own launch (~3 us) is included."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for start, end in zip(starts, ends):
        flush_l2()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[rep // 2]


def choose(kernel: str, key: tuple, device, candidates: list[dict] | Callable[[], list[dict]],
           launch: Callable[[dict], None], default: dict,
           timer: Callable[[Callable[[], None]], float] | None = None) -> dict:
    """The config to launch ``kernel`` with at ``key`` on ``device`` (see the module docstring).
    ``candidates``: the configs to try, or a function making them (called only when tuning);
    ``launch(config)`` runs the kernel once; ``timer(fn)`` measures it (``graph_time`` by default).
    A stored choice whose keys differ from ``default``'s is stale (an earlier kernel's knobs) and
    is ignored. The answer is remembered for the process (a launch costs no store lookup)."""
    tuning = autotune()
    store = _store()
    memo = (kernel, key, device, tuning)
    if memo in _MEMO:
        return _MEMO[memo]
    entry = f"{kernel}|{device_name(device)}|{','.join(map(str, key))}"
    if entry in store and _fits(store[entry]["config"], default, candidates):
        _MEMO[memo] = store[entry]["config"]
        return _MEMO[memo]
    if not (tuning and (timer is not None or device_name(device) != "cpu")):
        _MEMO[memo] = default
        return default
    if timer is None:
        timer = graph_time
    timed = []
    for cfg in (candidates() if callable(candidates) else candidates):
        try:
            launch(cfg)
            timed.append((timer(lambda: launch(cfg)), cfg))
        except Exception:  # noqa: BLE001 - a config that does not compile or fit is skipped
            continue
    if not timed:
        return default
    best_t, best = min(timed, key=lambda tc: tc[0])
    _save(entry, {"config": best, "ms": best_t, "tried": len(timed)})
    _MEMO[memo] = best
    return best
