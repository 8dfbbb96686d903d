"""Progress bars for the long loops of a compile (calibration batches, GPTQ / SVD per layer, the
pass pipeline). Shown by default (``presso.compile(verbose=False)`` or ``presso compile -q``
silences them), on stderr, only once a loop has run ``DELAY_S`` seconds -- so quick compiles
print nothing -- and erased when it ends."""
from __future__ import annotations

from typing import Iterable, Optional

DELAY_S = 2.0


def progress(items: Optional[Iterable] = None, enabled: bool = True, desc: str = "", unit: str = "it",
             total: Optional[int] = None):
    """``items`` in a tqdm bar when ``enabled`` (else ``items`` as they are, or None for a manual bar)."""
    if not enabled:
        return items
    from tqdm import tqdm           # imported by the first long loop, not by import presso
    return tqdm(items, desc=desc, unit=unit, total=total, leave=False, delay=DELAY_S)
