"""Every environment variable presso reads, in one place, read when asked (never cached at
import): a test or a user that sets one before a call sees it take effect.

``TRITON_INTERPRET``  ``1``: the ``cuda`` target runs its Triton kernels on CPU tensors through
                      Triton's interpreter (how CI checks them). Triton itself decides interpreted
                      or compiled when a kernel is decorated, so kernel modules take one reading
                      of it when they are imported (``INTERPRET``); set it before importing presso.
``PRESSO_CACHE_DIR``  where generated kernels and tuned launch configs are kept
                      (default ``~/.cache/presso``).
``PRESSO_AUTOTUNE``   ``1``: measure launch configs on first use of a shape (else the defaults).
``PRESSO_ARTIFACT_KEY``  the key artifacts are signed and checked with when none is passed.
``TVM_NUM_THREADS``   TVM's thread pool size; presso sets it to every CPU it may run on unless
                      the user set it (``tvm_threads``).
``HF_HUB_OFFLINE``    set to ``1`` by the zoo's Hugging Face models unless the user set it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

ARTIFACT_KEY = "PRESSO_ARTIFACT_KEY"


def triton_interpret() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cache_root() -> Path:
    """presso's on-disk cache folder (``$PRESSO_CACHE_DIR``, default ``~/.cache/presso``)."""
    return Path(os.environ.get("PRESSO_CACHE_DIR", Path.home() / ".cache" / "presso"))


def autotune() -> bool:
    """Whether to measure launch configs on first use (``PRESSO_AUTOTUNE=1``)."""
    return os.environ.get("PRESSO_AUTOTUNE") == "1"


def artifact_key() -> Optional[str]:
    """``$PRESSO_ARTIFACT_KEY``, or None when unset or empty."""
    return os.environ.get(ARTIFACT_KEY) or None


def use_all_cores_for_tvm() -> None:
    """TVM sizes its thread pool at first use to half the hardware threads on x86 (it assumes
    hyper-threading): on a 2-vCPU machine presso's kernels ran on one core. Unless the user set
    ``TVM_NUM_THREADS``, use every CPU this process may run on; must run before TVM's first
    parallel launch."""
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def hf_offline_by_default() -> None:
    """The zoo's Hugging Face models load from the local cache unless the user chose otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
