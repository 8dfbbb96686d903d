"""Ahead-of-time export: save -> load in a fresh process gives identical outputs; tampered,
truncated or wrong-version artifacts are refused with a typed error before anything runs."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import presso
from presso.models import make_gpt2, make_mlp
from presso.runtime.artifact import ArtifactError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, inputs = make_gpt2()
    calib = [(torch.randint(0, 256, inputs[0].shape),) for _ in range(2)]
    cm = presso.compile(model, example_inputs=inputs, calibration=calib,
                        recipe="quantize{weights=int4,group_size=32},sparsify{pattern=2:4,skip=wte}")
    path = tmp_path_factory.mktemp("art") / "gpt2.presso"
    cm.save(path)
    return cm, inputs, path


def test_save_load_in_a_fresh_process_is_identical(saved, tmp_path):
    cm, inputs, path = saved
    save_file({"x": inputs[0]}, str(tmp_path / "in.safetensors"))
    script = textwrap.dedent(f"""
        import sys, presso
        from safetensors.torch import load_file, save_file
        m = presso.load({str(path)!r})
        y = m(load_file({str(tmp_path / 'in.safetensors')!r})["x"])
        save_file({{"y": y}}, {str(tmp_path / 'out.safetensors')!r})
        assert "presso.models" not in sys.modules, "the model's code was imported"
        print("types", sorted({{str(p.value.type.dtype) for p in m.graph.params.values()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "'i4'" in out.stdout and "'u4'" in out.stdout  # packed storage survives as is
    y = load_file(str(tmp_path / "out.safetensors"))["y"]
    assert torch.equal(y, cm(*inputs))


def test_manifest_describes_the_artifact(saved):
    cm, _, path = saved
    m = json.loads((path / "manifest.json").read_text())
    assert m["target"] == "reference" and m["inputs"] == [{"name": "input_ids", "type": "i64[2, 16]"}]
    assert set(m["files"]) == {"graph.pir", "weights.safetensors"} and len(m["graph_hash"]) == 64
    loaded = presso.load(path)
    assert loaded.report()["compression"]["compression_ratio"] == cm.report()["compression"]["compression_ratio"]


def _copy(path, tmp_path):
    import shutil
    dst = tmp_path / "copy.presso"
    shutil.copytree(path, dst)
    return dst


@pytest.mark.parametrize("damage, msg", [
    (lambda p: (p / "weights.safetensors").write_bytes((p / "weights.safetensors").read_bytes()[:-100]),
     "weights.safetensors does not match its SHA-256"),
    (lambda p: (p / "graph.pir").write_text((p / "graph.pir").read_text().replace("bits=4", "bits=8")),
     "graph.pir does not match its SHA-256"),
    (lambda p: (p / "manifest.json").write_text((p / "manifest.json").read_text().replace('"format_version": 1', '"format_version": 99')),
     "format version 99 is not supported"),
    (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json is corrupt"),
    (lambda p: (p / "graph.pir").unlink(), "graph.pir is missing"),
    (lambda p: (p / "manifest.json").write_text((p / "manifest.json").read_text().replace('"target": "reference"', '"target": "cuda"')),
     "target 'cuda' cannot run on this machine"),
])
def test_damaged_artifacts_are_refused(saved, tmp_path, damage, msg):
    path = _copy(saved[2], tmp_path)
    damage(path)
    with pytest.raises(ArtifactError, match=msg):
        presso.load(path)


def test_save_is_atomic_and_does_not_clobber(tmp_path, monkeypatch):
    model, inputs = make_mlp()
    cm = presso.compile(model, example_inputs=inputs)
    path = cm.save(tmp_path / "mlp.presso")
    with pytest.raises(ArtifactError, match="exists"):
        cm.save(path)
    import presso.runtime.artifact as art

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(art, "_jsonable", boom)
    with pytest.raises(ArtifactError, match="cannot save .*crash.presso: disk full"):
        cm.save(tmp_path / "crash.presso")
    assert not (tmp_path / "crash.presso").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mlp.presso"]  # no temporary left behind
    with pytest.raises(ArtifactError, match="not a presso artifact"):
        presso.load(tmp_path / "nothing-here")
