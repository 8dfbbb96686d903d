"""PyTorch's OpInfo database as a corpus: the first float32 sample of every op torch.export can
export, compiled by presso and compared with eager torch (see tests/corpora/opinfo.py)."""
import collections

import pytest

pytest.importorskip("expecttest")  # torch's OpInfo database imports it

from corpora import opinfo  # noqa: E402

FLOOR = 0.95


def test_opinfo_corpus_imports_and_matches_eager_torch():
    outs = opinfo.run_all()
    print("\n" + opinfo.summary(outs))
    for o in outs:
        if o.status in ("mismatch", "error"):
            print(f"  {o.status:9s} {o.op}: {o.detail}")
    counts = collections.Counter(o.status for o in outs)
    exportable = sum(counts[k] for k in ("pass", "pass (shape)", "mismatch", "error"))
    assert exportable > 500, counts            # the corpus itself is there
    assert counts["pass"] > 500, counts        # most ops are compared by value, not only by shape
    assert (counts["pass"] + counts["pass (shape)"]) / exportable >= FLOOR, opinfo.summary(outs)
