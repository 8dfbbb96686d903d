"""The per-shape config store of the Triton kernels (codegen/triton/autotune.py), with a fake timer."""
import json

import pytest

from presso.codegen.triton import autotune


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("PRESSO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_STORE", None)
    return tmp_path / "autotune.json"


CANDIDATES = [{"split": s} for s in (2, 4, 8, 16)]
TIMES = {2: 3.0, 4: 1.5, 8: 1.0, 16: 2.0}


def test_tuning_picks_the_fastest_and_stores_it(store, monkeypatch):
    monkeypatch.setenv("PRESSO_AUTOTUNE", "1")
    launched = []

    def launch(cfg):
        if cfg["split"] == 16:
            raise RuntimeError("out of shared memory")        # skipped, never chosen
        launched.append(cfg["split"])
    best = autotune.choose("k", (1, 4096), "cpu", CANDIDATES, launch, {"split": 2},
                           timer=lambda fn: (fn(), TIMES[launched[-1]])[1])
    assert best == {"split": 8}
    saved = json.loads(store.read_text())
    assert saved["k|cpu|1,4096"] == {"config": {"split": 8}, "ms": 1.0, "tried": 3}
    # a later process reads the stored choice and launches nothing to decide
    monkeypatch.setattr(autotune, "_STORE", None)
    assert autotune.choose("k", (1, 4096), "cpu", CANDIDATES, lambda c: 1 / 0, {"split": 2},
                           timer=lambda fn: 0.0) == {"split": 8}


def test_without_opt_in_the_default_is_used_and_nothing_is_written(store, monkeypatch):
    monkeypatch.delenv("PRESSO_AUTOTUNE", raising=False)
    assert autotune.choose("k", (2, 64), "cpu", CANDIDATES, lambda c: 1 / 0, {"split": 4},
                           timer=lambda fn: 0.0) == {"split": 4}
    assert not store.exists()


def test_a_corrupt_store_is_ignored(store, monkeypatch):
    store.write_text("{not json")
    monkeypatch.setenv("PRESSO_AUTOTUNE", "1")
    best = autotune.choose("k", (3,), "cpu", CANDIDATES[:2], lambda c: None, {"split": 2},
                           timer=lambda fn: 1.0)
    assert best == {"split": 2} and "k|cpu|3" in json.loads(store.read_text())


def test_a_choice_stored_for_an_earlier_kernel_version_is_stale(store, monkeypatch):
    """A stored config with other knobs than the kernel's current default (e.g. a GEMV tuned before
    it grew ``block_n``) is not launched: the default, or a fresh tuning, replaces it."""
    store.write_text(json.dumps({"k|cpu|5": {"config": {"split": 8}, "ms": 1.0, "tried": 4}}))
    monkeypatch.delenv("PRESSO_AUTOTUNE", raising=False)
    default = {"split": 2, "block_n": 16}
    assert autotune.choose("k", (5,), "cpu", [default], lambda c: 1 / 0, default, timer=lambda fn: 0.0) == default
    monkeypatch.setenv("PRESSO_AUTOTUNE", "1")
    cands = [{"split": 4, "block_n": 16}, {"split": 2, "block_n": 32}]
    best = autotune.choose("k", (5,), "cpu", cands, lambda c: None, default, timer=lambda fn: 1.0)
    assert best == cands[0] and json.loads(store.read_text())["k|cpu|5"]["config"] == cands[0]


def test_a_choice_is_remembered_and_candidates_are_made_only_to_tune(store, monkeypatch):
    """Launches ask choose() every call: the answer is remembered for the process (the store is
    not searched again), and a candidates function is only called when tuning."""
    monkeypatch.delenv("PRESSO_AUTOTUNE", raising=False)
    never = lambda: 1 / 0                                    # noqa: E731 - must not be called
    assert autotune.choose("k", (6,), "cpu", never, lambda c: 1 / 0, {"split": 2}) == {"split": 2}
    autotune._store()["k|cpu|6"] = {"config": {"split": 4}, "ms": 1.0, "tried": 1}    # not looked up again
    assert autotune.choose("k", (6,), "cpu", never, lambda c: 1 / 0, {"split": 2}) == {"split": 2}
    monkeypatch.setenv("PRESSO_AUTOTUNE", "1")               # tuning on: a fresh decision, candidates made
    made = []

    def candidates():
        made.append(1)
        return CANDIDATES[:2]
    best = autotune.choose("k", (7,), "cpu", candidates, lambda c: None, {"split": 2}, timer=lambda fn: 1.0)
    assert best == {"split": 2} and made == [1]
