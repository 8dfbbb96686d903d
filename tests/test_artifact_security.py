"""Artifacts against hostile files and faults: keyed authenticity over the manifest and every
file, native code only from authenticated artifacts or on explicit trust, manifest paths confined
to the folder, overwrite that replaces only presso artifacts, saves that survive being killed at
every step, and two savers that cannot both win."""
import hashlib
import json
import os
import shutil
import time

import pytest
import torch

import presso
import presso.runtime.artifact as art
from presso.errors import ArtifactAuthError, ArtifactError, ArtifactPathError, UntrustedCodeError
from presso.models import make_mlp

KEY = b"correct horse battery staple"


@pytest.fixture(scope="module")
def mlp():
    model, inputs = make_mlp()
    return presso.compile(model, example_inputs=inputs), inputs


@pytest.fixture(scope="module")
def keyed(mlp, tmp_path_factory):
    return mlp[0].save(tmp_path_factory.mktemp("keyed") / "m.presso", key=KEY)


@pytest.fixture(scope="module")
def unkeyed(mlp, tmp_path_factory):
    return mlp[0].save(tmp_path_factory.mktemp("unkeyed") / "m.presso")


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.delenv(art.ENV_KEY, raising=False)


def _copy(src, tmp_path, name="copy.presso"):
    dst = tmp_path / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True))


def _rehash(path):
    """What an attacker does after editing files: recompute every SHA-256 in the manifest."""
    def fix(m):
        for name in m["files"]:
            m["files"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
        m["graph_hash"] = hashlib.sha256((path / "graph.pir").read_bytes()).hexdigest()
    _edit_manifest(path, fix)


def _tamper_weights(path):
    from safetensors.torch import load_file, save_file
    w = load_file(str(path / "weights.safetensors"))
    name = next(iter(w))
    w[name] = torch.full_like(w[name], float("nan"))
    save_file(w, str(path / "weights.safetensors"))
    _rehash(path)


# ---- authenticity --------------------------------------------------------------------------

def test_keyed_artifact_round_trips_with_its_key(mlp, keyed):
    cm, inputs = mlp
    sig = json.loads((keyed / "signature.json").read_text())
    assert sig["algorithm"] == "hmac-sha256" and len(sig["mac"]) == 64
    assert torch.equal(presso.load(keyed, key=KEY)(*inputs), cm(*inputs))
    assert torch.equal(presso.load(keyed, key=KEY.decode())(*inputs), cm(*inputs))   # str keys are UTF-8


def test_rehashed_weights_are_refused_when_keyed_but_pass_unkeyed(keyed, unkeyed, tmp_path):
    """The SHA-256s alone detect corruption, not tampering: an unkeyed artifact whose weights were
    replaced and re-hashed loads (the documented limit); under a key it is refused."""
    bad = _copy(keyed, tmp_path)
    _tamper_weights(bad)
    with pytest.raises(ArtifactAuthError, match="manifest.json does not match its MAC: the artifact was changed"):
        presso.load(bad, key=KEY)
    plain = _copy(unkeyed, tmp_path, "plain.presso")
    _tamper_weights(plain)
    assert presso.load(plain) is not None


def test_edited_graph_meta_is_refused_when_keyed(keyed, tmp_path):
    bad = _copy(keyed, tmp_path)
    _edit_manifest(bad, lambda m: m["graph_meta"].update(uncompressed_bytes=10 ** 9))
    with pytest.raises(ArtifactAuthError, match="does not match its MAC"):
        presso.load(bad, key=KEY)


def test_edited_graph_is_refused_when_keyed(keyed, tmp_path):
    bad = _copy(keyed, tmp_path)
    text = (bad / "graph.pir").read_text()
    assert "relu(" in text
    (bad / "graph.pir").write_text(text.replace("relu(", "gelu("))
    _rehash(bad)
    with pytest.raises(ArtifactAuthError, match="does not match its MAC"):
        presso.load(bad, key=KEY)


def test_wrong_key_and_missing_key_are_refused(keyed):
    with pytest.raises(ArtifactAuthError, match="signed with another key"):
        presso.load(keyed, key=b"another key")
    with pytest.raises(ArtifactAuthError, match=r"is signed \(key id [0-9a-f]{16}\) and no key was given; "
                                                r"pass load\(path, key=...\) or set \$PRESSO_ARTIFACT_KEY"):
        presso.load(keyed)


def test_a_key_refuses_an_unsigned_or_stripped_artifact(keyed, unkeyed, tmp_path):
    with pytest.raises(ArtifactAuthError, match="is not signed, but a key was given"):
        presso.load(unkeyed, key=KEY)
    stripped = _copy(keyed, tmp_path)
    (stripped / "signature.json").unlink()
    with pytest.raises(ArtifactAuthError, match="is not signed, but a key was given"):
        presso.load(stripped, key=KEY)
    (stripped / "signature.json").write_text("{}")
    with pytest.raises(ArtifactAuthError, match="signature.json is malformed"):
        presso.load(stripped, key=KEY)


def test_env_key_signs_and_verifies(mlp, tmp_path, monkeypatch):
    monkeypatch.setenv(art.ENV_KEY, "from the environment")
    path = mlp[0].save(tmp_path / "env.presso")
    assert (path / "signature.json").exists()
    presso.load(path)
    monkeypatch.setenv(art.ENV_KEY, "another one")
    with pytest.raises(ArtifactAuthError, match="signed with another key"):
        presso.load(path)
    monkeypatch.delenv(art.ENV_KEY)
    with pytest.raises(ArtifactAuthError, match="no key was given"):
        presso.load(path)
    with pytest.raises(ArtifactAuthError, match="must not be empty"):
        presso.load(path, key=b"")


# ---- paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["../outside.txt", "../absent.txt", "/etc/passwd", "code/../../outside.txt",
                                   "./graph.pir", "", "code//model.so", "..\\outside.txt"])
def test_manifest_paths_must_stay_inside(unkeyed, tmp_path, entry):
    """The message is the same whether or not the outside file exists: it is never opened."""
    (tmp_path / "outside.txt").write_text("secret")
    bad = _copy(unkeyed, tmp_path)
    _edit_manifest(bad, lambda m: m["files"].__setitem__(entry, "0" * 64))
    with pytest.raises(ArtifactPathError, match="which is not allowed; allowed: relative paths of regular files"
                       ) as e:
        presso.load(bad)
    assert "missing" not in str(e.value) and "exist" not in str(e.value) and "SHA-256" not in str(e.value)


def test_symlinked_files_are_refused_without_being_followed(unkeyed, tmp_path):
    bad = _copy(unkeyed, tmp_path)
    outside = tmp_path / "weights-elsewhere.safetensors"
    shutil.move(bad / "weights.safetensors", outside)
    os.symlink(outside, bad / "weights.safetensors")
    with pytest.raises(ArtifactPathError, match="weights.safetensors is a symlink; an artifact holds regular files"):
        presso.load(bad)
    os.unlink(bad / "weights.safetensors")
    os.symlink(tmp_path / "no-such-file", bad / "weights.safetensors")
    with pytest.raises(ArtifactPathError, match="weights.safetensors is a symlink"):
        presso.load(bad)


# ---- native code ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llvm_saved(tmp_path_factory):
    model, inputs = make_mlp()
    cm = presso.compile(model, example_inputs=inputs, target="llvm")
    d = tmp_path_factory.mktemp("llvm")
    return cm, inputs, cm.save(d / "plain.presso"), cm.save(d / "keyed.presso", key=KEY)


def test_unkeyed_native_code_is_not_opened_without_trust(llvm_saved, tmp_path, monkeypatch):
    """A library replaced by garbage and re-hashed: without trust the typed refusal comes before
    any dlopen (which would run a hostile library's constructors); with trust_code=True the same
    file reaches the loader, which is what fails then."""
    _, _, plain, _ = llvm_saved
    bad = _copy(plain, tmp_path)
    (bad / "code" / "model.so").write_bytes(b"\x7fELF not really a library" * 64)
    _rehash(bad)
    import tvm
    opened = []
    real = tvm.runtime.load_module
    monkeypatch.setattr(tvm.runtime, "load_module", lambda *a, **k: opened.append(a) or real(*a, **k))
    with pytest.raises(UntrustedCodeError, match=r"refusing to load code/model.so: opening it runs its code.*"
                                                 r"load\(path, key=\.\.\.\).*trust_code=True"):
        presso.load(bad)
    assert opened == []
    with pytest.raises(Exception) as e:
        presso.load(bad, trust_code=True)
    assert not isinstance(e.value, UntrustedCodeError) and len(opened) == 1


def test_native_code_loads_when_authenticated_or_trusted(llvm_saved):
    cm, inputs, plain, keyed = llvm_saved
    want = cm(*inputs)
    assert torch.equal(presso.load(keyed, key=KEY)(*inputs), want)
    assert torch.equal(presso.load(plain, trust_code=True)(*inputs), want)
    with pytest.raises(UntrustedCodeError):
        presso.load(plain)


# ---- overwrite -----------------------------------------------------------------------------

def test_overwrite_replaces_only_presso_artifacts(mlp, tmp_path):
    cm, _ = mlp
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ArtifactError, match="refusing to replace .*photos: it is a folder without a presso "
                                            "manifest.json, not a presso artifact"):
        cm.save(folder, overwrite=True)
    assert (folder / "cat.jpg").read_bytes() == b"meow"
    note = tmp_path / "notes.txt"
    note.write_text("keep me")
    with pytest.raises(ArtifactError, match="refusing to replace .*notes.txt: it is a file"):
        cm.save(note, overwrite=True)
    assert note.read_text() == "keep me"
    path = cm.save(tmp_path / "m.presso")
    (path / "my-notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="besides the artifact it holds my-notes.txt"):
        cm.save(path, overwrite=True)
    (path / "my-notes.txt").unlink()
    before = (path / "manifest.json").stat().st_ino
    cm.save(path, overwrite=True)
    assert (path / "manifest.json").stat().st_ino != before and presso.load(path) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.presso", "notes.txt", "photos"]


def test_cli_force_refuses_a_non_artifact_folder(tmp_path, capsys):
    from presso.cli import main
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    assert main(["compile", "presso.models:make_mlp", "-q", "-o", str(folder), "--force"]) == 2
    assert "not a presso artifact" in capsys.readouterr().err
    assert (folder / "thesis.tex").read_text() == "years of work"


# ---- crashes and races ---------------------------------------------------------------------

def _in_child(fn) -> int:
    """Run ``fn`` in a forked process; its exit code (3: ArtifactError, 0: success)."""
    pid = os.fork()
    if pid == 0:
        code = 4
        try:
            fn()
            code = 0
        except ArtifactError:
            code = 3
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _killed_at(step):
    def hook(name):
        if name == step:
            os._exit(9)     # as abrupt as SIGKILL: no cleanup runs
    return hook


def _save_killed_at(cm, path, step, **kw):
    def child():
        art._fault_hook = _killed_at(step)
        cm.save(path, **kw)
    assert _in_child(child) == 9


def _new_version(cm, marker):
    other = presso.CompiledModel(cm.graph.copy(), cm.target)
    other.graph.meta["marker"] = marker
    return other


def test_killed_between_the_renames_recovers_the_old_artifact(mlp, tmp_path):
    cm, _ = mlp
    path = _new_version(cm, "old").save(tmp_path / "m.presso")
    _save_killed_at(_new_version(cm, "new"), path, "after_first_rename", overwrite=True)
    assert not path.exists() and any(".m.presso.old-" in p.name for p in tmp_path.iterdir())
    assert presso.load(path).graph.meta["marker"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.presso"]


def test_killed_after_the_swap_keeps_the_new_one_and_cleans_up(mlp, tmp_path):
    cm, _ = mlp
    path = _new_version(cm, "old").save(tmp_path / "m.presso")
    _save_killed_at(_new_version(cm, "new"), path, "after_second_rename", overwrite=True)
    assert presso.load(path).graph.meta["marker"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.presso"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_killed_while_writing_leaves_the_old_state_and_the_next_save_cleans(mlp, tmp_path, overwrite):
    cm, _ = mlp
    path = tmp_path / "m.presso"
    if overwrite:
        _new_version(cm, "old").save(path)
    _save_killed_at(_new_version(cm, "new"), path, "written", overwrite=overwrite)
    assert any(".m.presso.tmp-" in p.name for p in tmp_path.iterdir())
    if overwrite:
        assert presso.load(path).graph.meta["marker"] == "old"
    else:
        assert not path.exists()
    _new_version(cm, "next").save(path, overwrite=overwrite)
    assert presso.load(path).graph.meta["marker"] == "next"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.presso"]


def test_two_concurrent_saves_without_overwrite_cannot_both_succeed(mlp, tmp_path):
    """Each saver pauses just before publishing, which is where an exists()-then-rename save
    lets both through; exactly one must win and the artifact at the path must be the winner's."""
    cm, _ = mlp
    path = tmp_path / "m.presso"

    def saver(i):
        def run():
            art._fault_hook = lambda step: time.sleep(0.5) if step == "before_publish" else None
            _new_version(cm, f"saver {i}").save(path)
        return run
    pids = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:
            code = 4
            try:
                saver(i)()
                code = 0
            except ArtifactError as e:
                code = 3 if "exists; pass overwrite=True" in str(e) else 5
            finally:
                os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    assert sorted(codes) == [0, 3], codes
    assert presso.load(path).graph.meta["marker"] == f"saver {codes.index(0)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.presso"]


# ---- graphs the parser would misread -------------------------------------------------------

def test_onnx_dim_param_inf_saves_and_loads(tmp_path):
    import onnx
    import onnx.helper as h
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["inf", 4])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["inf", 4])
    m = h.make_model(h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                     opset_imports=[h.make_opsetid("", 17)])
    cm = presso.compile(m)
    loaded = presso.load(cm.save(tmp_path / "inf.presso"))
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), torch.relu(x))


def test_a_graph_whose_text_cannot_be_read_back_is_refused_at_save(tmp_path):
    from presso.ir.graph import Graph
    from presso.ir.types import DType, TensorType
    g = Graph("g")
    x = g.add_input("x", TensorType(("inf", 4), DType.f32))
    g.outputs = [g.op("relu", x)]
    with pytest.raises(ArtifactError, match="text form cannot be read back, so its artifact could never be loaded"):
        presso.CompiledModel(g, "reference").save(tmp_path / "g.presso")
    assert list(tmp_path.iterdir()) == []
