"""The target interface: a target defined outside presso, registered by one registry entry, is
compiled for, run, saved and loaded through ``presso.compile`` / ``save`` / ``presso.load`` with no
other change; unknown and unavailable targets raise typed errors naming them."""
import json
from collections import Counter

import pytest
import torch

import presso
from presso import targets
from presso.errors import ArtifactError, TargetUnavailableError
from presso.ir.interpret import ReferenceRuntime, run_graph
from presso.models import make_mlp
from presso.targets import Target


class CountingTarget(Target):
    """Runs the reference semantics; its 'code' is the op histogram, exported as JSON."""
    name = "counting"
    default_passes = ("dce",)
    available = True

    def check_available(self):
        if not self.available:
            raise self.unavailable("needs a counting machine, and this one has none")

    def build(self, graph):
        ops = {}
        for n in graph.nodes:
            ops[n.op] = ops.get(n.op, 0) + 1
        return ops

    def runtime(self, graph, code, device="cpu"):
        return ReferenceRuntime(graph, device)

    def export(self, code, code_dir):
        code_dir.mkdir(parents=True, exist_ok=True)
        (code_dir / "ops.json").write_text(json.dumps(code))
        return ["code/ops.json"], {"op_count": sum(code.values())}

    def load(self, graph, path, manifest):
        return json.loads((path / "code" / "ops.json").read_text())


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setitem(targets.REGISTRY, "counting", CountingTarget)
    monkeypatch.setattr(targets, "_LOADED", {})
    monkeypatch.setattr(CountingTarget, "available", True)
    return CountingTarget


def test_a_registered_target_compiles_runs_saves_and_loads(counting, tmp_path):
    model, inputs = make_mlp()
    cm = presso.compile(model, target="counting", example_inputs=inputs, verbose=False)
    assert [p["pass"] for p in cm.report()["passes"]] == ["canonicalize", "dce"]    # its default pass added
    assert cm.code == dict(Counter(n.op for n in cm.graph.nodes)) and cm.code["linear"] == 3
    assert torch.allclose(cm(*inputs), run_graph(cm.graph, *inputs)[0])
    path = cm.save(tmp_path / "m.presso")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["target"] == "counting" and manifest["op_count"] == len(cm.graph.nodes)
    loaded = presso.load(path)
    assert loaded.target == "counting" and loaded.code == cm.code
    assert torch.equal(loaded(*inputs), cm(*inputs))
    with pytest.raises(TargetUnavailableError, match="'counting' does not run generation"):
        cm.generate(torch.zeros(1, 2, dtype=torch.long), 2)


def test_an_unavailable_target_is_named_at_compile_and_at_load(counting, tmp_path):
    model, inputs = make_mlp()
    path = presso.compile(model, target="counting", example_inputs=inputs, verbose=False).save(tmp_path / "m")
    counting.available = False
    with pytest.raises(TargetUnavailableError, match="target 'counting' needs a counting machine") as e:
        presso.compile(model, target="counting", example_inputs=inputs, verbose=False)
    assert e.value.target == "counting"
    with pytest.raises(ArtifactError, match="target 'counting' cannot run on this machine: .*counting machine"):
        presso.load(path)


def test_unknown_targets_list_the_registered_ones():
    with pytest.raises(ValueError, match="unknown target 'tpu'; valid targets: reference, cuda, llvm, aarch64"):
        targets.get_target("tpu")
    assert targets.target_names()[:4] == ("reference", "cuda", "llvm", "aarch64")
    assert set(targets.generation_targets()) == {"reference", "cuda", "llvm", "aarch64"}
