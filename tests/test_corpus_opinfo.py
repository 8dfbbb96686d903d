"""PyTorch's OpInfo database as a corpus: the first float32 sample of every op torch.export can
export, compiled by presso and compared with eager torch (see tests/corpora/opinfo.py).

The ops are dealt into ``SHARDS`` tests (every ``SHARDS``-th op, in OpInfo's order) so that no test
runs long; each shard checks that nothing is silently wrong and that every failure is one of presso's
typed errors. The pass-rate test reads the shards' outcomes (computed once per session) and asserts
the floor over the whole corpus."""
import collections
import functools

import pytest

pytest.importorskip("expecttest")  # torch's OpInfo database imports it

import presso.errors  # noqa: E402
from corpora import opinfo  # noqa: E402

FLOOR = 0.95
SHARDS = 12
TYPED = {name for name, cls in vars(presso.errors).items() if isinstance(cls, type) and issubclass(cls, Exception)}


@functools.lru_cache(maxsize=None)
def _shard(i: int) -> tuple:
    return tuple(opinfo.run_all(opinfo.ops()[i::SHARDS]))


@pytest.mark.parametrize("shard", range(SHARDS))
def test_opinfo_shard_imports_and_matches_eager_torch(shard):
    outs = _shard(shard)
    print(f"\nshard {shard}/{SHARDS}: " + opinfo.summary(outs))
    wrong = [(o.op, o.detail) for o in outs if o.status == "mismatch"]
    assert not wrong, f"ops that import but give other numbers than torch: {wrong}"
    untyped = [(o.op, o.detail) for o in outs if o.status == "error" and o.detail.split(":")[0] not in TYPED]
    assert not untyped, f"failures that are not presso's typed errors: {untyped}"


def test_opinfo_corpus_imports_and_matches_eager_torch():
    outs = [o for i in range(SHARDS) for o in _shard(i)]
    print("\n" + opinfo.summary(outs))
    for o in outs:
        if o.status in ("mismatch", "error"):
            print(f"  {o.status:9s} {o.op}: {o.detail}")
    counts = collections.Counter(o.status for o in outs)
    exportable = sum(counts[k] for k in ("pass", "pass (shape)", "mismatch", "error"))
    assert exportable > 500, counts            # the corpus itself is there
    assert counts["pass"] > 500, counts        # most ops are compared by value, not only by shape
    assert (counts["pass"] + counts["pass (shape)"]) / exportable >= FLOOR, opinfo.summary(outs)
