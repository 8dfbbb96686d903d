"""Ahead-of-time artifacts: ``CompiledModel.save(path)`` and ``presso.load(path)``.

An artifact is a directory:

    manifest.json        format and presso versions, target, input/output signature, graph hash,
                         SHA-256 of every other file, graph metadata (compression records)
    signature.json       with a key only: an HMAC-SHA256 of manifest.json's bytes (``artifact_mac``)
    graph.pir            the IR in its text form
    weights.safetensors  every parameter's storage as is (packed int4 stays packed); no pickle
    code/                compiled code for targets that have it (none for "reference")

What ``load`` guarantees:

- Unkeyed (no ``key=``, no ``$PRESSO_ARTIFACT_KEY``): corruption detection only. The SHA-256s
  catch truncated or damaged files, but anyone who can write the folder can change weights, graph
  or manifest and recompute them; such an artifact is not authenticated, and its native code
  (``code/model.so`` of ``llvm``/``aarch64``) is refused unless ``trust_code=True``.
- Keyed: authenticity. The MAC covers the manifest and through its hashes every file, so any
  edit, a missing or wrong key, or a stripped signature is refused with ``ArtifactAuthError``;
  native code of an artifact that authenticates is loaded.
- Always: every file the manifest names must be a regular file inside the folder (no ``..``, no
  absolute path, no symlink; ``ArtifactPathError``), and every check runs before anything is
  parsed, loaded or run.

``save`` writes a temporary sibling folder and renames it into place under a per-artifact lock
(``artifact_fs``): a process killed at any point leaves the old artifact or the new one at the
path (a half-done swap is undone by the next save or load), two savers cannot both create the
same path, and ``overwrite=True`` replaces only a presso artifact, never another file or folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from ..errors import ArtifactAuthError, ArtifactError, ArtifactPathError, IRParseError, UntrustedCodeError
from . import artifact_fs as fs
from .artifact_mac import ENV_KEY, SIGNATURE, resolve_key, signature_bytes, verify
from .artifact_schema import check_manifest
from ..targets import UnknownTargetError, get_target, target_names

__all__ = ["ArtifactError", "ArtifactAuthError", "ArtifactPathError", "UntrustedCodeError", "save_artifact",
           "load_artifact", "read_manifest", "ENV_KEY"]

FORMAT = fs.FORMAT
FORMAT_VERSION = 1
# node annotations an artifact keeps: the kv_cache pass's cache points (what the decode program
# caches: the latent, not full keys and values), on a linear or on the split of stacked linears
PERSISTED_NODE_NOTES = ("kv_cache_point", "kv_cache_points")

# Fault injection for tests: called with the name of each step of ``save`` (``written``,
# ``before_publish``, ``after_first_rename``, ``after_second_rename``).
_fault_hook = None


def _step(name: str) -> None:
    if _fault_hook is not None:
        _fault_hook(name)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_artifact(graph, target, code, path, overwrite: bool = False, key=None) -> Path:
    """Write ``graph`` compiled by ``target`` (a ``presso.targets.Target``) to ``code`` as an
    artifact at ``path``; see the module docstring for what is guaranteed. ``key`` (bytes or str;
    default ``$PRESSO_ARTIFACT_KEY``) signs it."""
    from safetensors.torch import save_file
    from ..version import __version__
    key = resolve_key(key)
    path = Path(os.path.abspath(path))
    g = graph
    text = str(g)
    _check_readable(text)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with fs.locked(path):       # fail before writing anything when the save cannot succeed
            fs.recover(path)
            _check_target(path, overwrite)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    except OSError as e:
        raise ArtifactError(f"cannot save {path}: {e.strerror or e} ({e.filename or path.parent})") from None
    old = None
    try:
        (tmp / "graph.pir").write_text(text)
        save_file(_unshared(g), str(tmp / "weights.safetensors"))
        code_files, code_fields = target.export(code, tmp / "code")
        files = ["graph.pir", "weights.safetensors"] + code_files
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "presso_version": __version__,
            "target": target.name,
            "inputs": [{"name": v.name, "type": str(v.type)} for v in g.inputs],
            "outputs": [{"name": v.name, "type": str(v.type)} for v in g.outputs],
            "graph_hash": hashlib.sha256(text.encode()).hexdigest(),
            "files": {f: sha256_file(tmp / f) for f in files},
            "graph_meta": _jsonable(g.meta),
            "node_notes": _node_notes(g),
        }
        manifest.update(code_fields)
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        if key is not None:
            (tmp / SIGNATURE).write_bytes(signature_bytes(key, body))
        (tmp / fs.MANIFEST).write_bytes(body)      # last: a folder with a manifest is complete
        fs.fsync_tree(tmp)
        _step("written")
        with fs.locked(path):
            fs.recover(path)
            _check_target(path, overwrite)
            if os.path.lexists(path):
                old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
                os.rename(path, old)
                _step("after_first_rename")
                os.rename(tmp, path)
                fs.fsync_dir(path.parent)
                _step("after_second_rename")
                shutil.rmtree(old, ignore_errors=True)
            else:
                _step("before_publish")
                os.rename(tmp, path)
                fs.fsync_dir(path.parent)
    except BaseException as e:
        if old is not None and os.path.lexists(old) and not os.path.lexists(path):
            os.rename(old, path)    # the swap failed half-way: the old artifact goes back
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ArtifactError(f"cannot save {path}: {e.strerror or e} ({e.filename or path.parent})") from None
        raise
    return path


def _unshared(g) -> dict:
    """Every parameter as its own contiguous tensor: safetensors refuses two entries over one
    storage (constant folding can leave views of one table, e.g. RoPE's cos and sin)."""
    out, seen = {}, set()
    for name, p in g.params.items():
        t = p.data.contiguous()
        key = (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else None
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


def _check_target(path: Path, overwrite: bool) -> None:
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise ArtifactError(f"{path} exists; pass overwrite=True (--force) to replace it")
    fs.check_replaceable(path)


def _check_readable(text: str) -> None:
    """An artifact whose graph text ``load`` could not parse would be lost: refuse it at save time."""
    from ..ir.parser import parse
    try:
        parse(text, verify=False)
    except IRParseError as e:
        raise ArtifactError(f"the graph's text form cannot be read back, so its artifact could never be loaded "
                            f"(nothing was saved): {e}") from None


def _node_notes(g) -> dict:
    """Pass annotations that later stages read (the IR text does not print node meta), by the
    name of the node's result."""
    return {n.name: {k: n.meta[k] for k in PERSISTED_NODE_NOTES if k in n.meta}
            for n in g.nodes if any(k in n.meta for k in PERSISTED_NODE_NOTES)}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: None))


def read_manifest(path, key=None) -> dict:
    """The manifest of the artifact at ``path``, after every check that needs no parsing: the
    signature (with a key, or when signed), the format version, every file's confinement and
    SHA-256. Raises a typed ``ArtifactError`` naming what failed."""
    return _read_manifest(Path(path), resolve_key(key))[0]


def _read_manifest(path: Path, key) -> tuple[dict, bool]:
    """-> (manifest, authenticated)."""
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a presso artifact (expected a directory with manifest.json)")
    if not os.path.lexists(path / fs.MANIFEST):
        raise ArtifactError(f"{path}: manifest.json is missing: not a presso artifact, or a truncated one")
    body = fs.read_member(path, fs.MANIFEST)
    signature = fs.read_member(path, SIGNATURE) if os.path.lexists(path / SIGNATURE) else None
    authenticated = verify(path, body, signature, key)
    try:
        manifest = json.loads(body)
    except (ValueError, RecursionError) as e:    # bad JSON or UTF-8, an int of 4300+ digits, deep nesting
        raise ArtifactError(f"{path}: manifest.json is corrupt ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: manifest.json does not describe a presso artifact")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {manifest.get('format_version')!r} is not supported by "
                            f"this presso (which reads version {FORMAT_VERSION}); recompile the model")
    check_manifest(path, manifest)
    files = manifest.get("files")
    if not isinstance(files, dict) or "graph.pir" not in files or "weights.safetensors" not in files:
        raise ArtifactError(f"{path}: manifest.json lists no graph or weights")
    for name in files:
        fs.member(path, name)       # every name confined before any file is read
    for name, digest in files.items():
        if fs.sha256_member(path, name) != digest:
            raise ArtifactError(f"{path}: {name} does not match its SHA-256 in the manifest (tampered or truncated)")
    return manifest, authenticated


def _recover_leftovers(path: Path) -> None:
    """A load that finds what a killed save left behind finishes the recovery (best effort: a
    read-only folder is left as it is)."""
    if not fs.leftovers(path):
        return
    try:
        with fs.locked(path):
            fs.recover(path)
    except OSError:
        pass


def load_artifact(path, key=None, trust_code: bool = False):
    """Check and load the artifact at ``path`` (see the module docstring): -> (graph, target,
    code), the target's code as its ``Target.load`` reads it back. ``key`` (default
    ``$PRESSO_ARTIFACT_KEY``) must authenticate it when given; ``trust_code=True`` allows the
    native library of an artifact that no key authenticates."""
    from safetensors.torch import load_file
    from ..ir.parser import parse
    key = resolve_key(key)
    path = Path(path)
    _recover_leftovers(path)
    manifest, authenticated = _read_manifest(path, key)
    text = (path / "graph.pir").read_text()
    if hashlib.sha256(text.encode()).hexdigest() != manifest.get("graph_hash"):
        raise ArtifactError(f"{path}: the graph does not match the manifest's graph hash")
    try:
        target = get_target(manifest.get("target"))
    except UnknownTargetError:
        raise ArtifactError(f"{path}: target {manifest.get('target')!r} cannot run on this machine; available: "
                            f"{', '.join(target_names())}") from None
    target.check_artifact(path, manifest, authenticated, trust_code)
    try:
        weights = load_file(str(path / "weights.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ArtifactError(f"{path}: weights.safetensors cannot be read ({e})") from None
    g = parse(text, weights)
    g.meta.update(manifest.get("graph_meta") or {})
    by_name = {v.name: v for v in g.values()}
    for name, notes in (manifest.get("node_notes") or {}).items():
        v = by_name.get(name)
        if v is None or v.node is None:
            raise ArtifactError(f"{path}: the manifest annotates %{name}, which the graph does not compute")
        v.node.meta.update({k: notes[k] for k in PERSISTED_NODE_NOTES if k in notes})
    return g, target, target.load(g, path, manifest)

