"""PyTorch's OpInfo database as a corpus: the first float32 sample of every op torch.export can
export, compiled by presso and compared with eager torch (see tests/corpora/opinfo.py). The corpus
runs as interleaved shards (tests/corpora/shards.py); the last test holds the floor over all of them."""
import collections
import functools

import pytest

pytest.importorskip("expecttest")  # torch's OpInfo database imports it

import presso.errors  # noqa: E402
from corpora import opinfo  # noqa: E402
from corpora.shards import Shards  # noqa: E402

FLOOR = 0.95
TYPED = {name for name, cls in vars(presso.errors).items() if isinstance(cls, type) and issubclass(cls, Exception)}
SHARDS = Shards(12)


@functools.cache
def corpus():
    return opinfo.ops()


def rate(outs) -> float:
    counts = collections.Counter(o.status for o in outs)
    exportable = sum(counts[k] for k in ("pass", "pass (shape)", "mismatch", "error"))
    return (counts["pass"] + counts["pass (shape)"]) / max(exportable, 1)


@pytest.mark.parametrize("shard", range(SHARDS.count), ids=SHARDS.ids)
def test_opinfo_corpus_imports_and_matches_eager_torch(shard):
    outs = opinfo.run_all(SHARDS.slice(corpus(), shard))
    SHARDS.record(shard, outs)
    print(f"\n{SHARDS.ids[shard]}: " + opinfo.summary(outs))
    for o in outs:
        if o.status in ("mismatch", "error"):
            print(f"  {o.status:9s} {o.op}: {o.detail}")
    wrong = [(o.op, o.detail) for o in outs if o.status == "mismatch"]
    assert not wrong, f"ops that import but give other numbers than torch: {wrong}"
    untyped = [(o.op, o.detail) for o in outs if o.status == "error" and o.detail.split(":")[0] not in TYPED]
    assert not untyped, f"failures that are not presso's typed errors: {untyped}"
    # a slice holds ~1/12 of the ops: a loose floor of its own names a shard where failures gather
    assert rate(outs) >= FLOOR - 0.1, opinfo.summary(outs)


def test_opinfo_corpus_floor_over_all_shards():
    outs = SHARDS.all()
    print("\n" + opinfo.summary(outs))
    counts = collections.Counter(o.status for o in outs)
    exportable = sum(counts[k] for k in ("pass", "pass (shape)", "mismatch", "error"))
    assert exportable > 500, counts            # the corpus itself is there
    assert counts["pass"] > 500, counts        # most ops are compared by value, not only by shape
    assert rate(outs) >= FLOOR, opinfo.summary(outs)
