"""Ahead-of-time artifacts: ``CompiledModel.save(path)`` and ``presso.load(path)``.

An artifact is a directory:

    manifest.json        format and presso versions, target, input/output signature, graph hash,
                         SHA-256 of every other file, graph metadata (compression records)
    graph.pir            the IR in its text form
    weights.safetensors  every parameter's storage as is (packed int4 stays packed); no pickle
    code/                compiled code for targets that have it (none for "reference")

``save`` writes into a temporary sibling directory and renames it into place, so a crash never
leaves a half-written artifact. ``load`` checks the manifest, the format version, every file's
hash and the graph hash before anything is parsed or run, and refuses a target this machine
cannot run — each with a typed ``ArtifactError``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import PressoError

FORMAT = "presso-artifact"
FORMAT_VERSION = 1
# node annotations an artifact keeps: the kv_cache pass's cache points (what the decode program
# caches: the latent, not full keys and values), on a linear or on the split of stacked linears
PERSISTED_NODE_NOTES = ("kv_cache_point", "kv_cache_points")


class ArtifactError(PressoError):
    """A saved artifact is missing, tampered with, truncated, of another format version, or for a
    target this machine cannot run."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_artifact(model, path, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file
    from .. import __version__
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArtifactError(f"{path} exists; pass overwrite=True to replace it")
    g = model.graph
    text = str(g)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        (tmp / "graph.pir").write_text(text)
        weights = {name: p.data.contiguous() for name, p in g.params.items()}
        save_file(weights, str(tmp / "weights.safetensors"))
        code_files = model._export_code(tmp / "code") if hasattr(model, "_export_code") else []
        files = ["graph.pir", "weights.safetensors"] + code_files
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "presso_version": __version__,
            "target": model.target,
            "inputs": [{"name": v.name, "type": str(v.type)} for v in g.inputs],
            "outputs": [{"name": v.name, "type": str(v.type)} for v in g.outputs],
            "graph_hash": hashlib.sha256(text.encode()).hexdigest(),
            "files": {f: sha256_file(tmp / f) for f in files},
            "graph_meta": _jsonable(g.meta),
            "node_notes": _node_notes(g),
        }
        build = getattr(model, "_build", None)
        if build is not None:
            manifest["requires"] = build.requires    # the CPU features the compiled code uses
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _node_notes(g) -> dict:
    """Pass annotations that later stages read (the IR text does not print node meta), by the
    name of the node's result."""
    return {n.name: {k: n.meta[k] for k in PERSISTED_NODE_NOTES if k in n.meta}
            for n in g.nodes if any(k in n.meta for k in PERSISTED_NODE_NOTES)}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: None))


def read_manifest(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a presso artifact (expected a directory with manifest.json)")
    mf = path / "manifest.json"
    if not mf.exists():
        raise ArtifactError(f"{path}: manifest.json is missing: not a presso artifact, or a truncated one")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: manifest.json is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: manifest.json does not describe a presso artifact")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {manifest.get('format_version')!r} is not supported by "
                            f"this presso (which reads version {FORMAT_VERSION}); recompile the model")
    files = manifest.get("files")
    if not isinstance(files, dict) or "graph.pir" not in files or "weights.safetensors" not in files:
        raise ArtifactError(f"{path}: manifest.json lists no graph or weights")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: {name} is missing (truncated artifact?)")
        if sha256_file(f) != digest:
            raise ArtifactError(f"{path}: {name} does not match its SHA-256 in the manifest (tampered or truncated)")
    return manifest


def load_artifact(path, device: str = "cpu"):
    from safetensors.torch import load_file
    from ..api import CompiledModel, TARGETS
    from ..ir.text import parse
    path = Path(path)
    manifest = read_manifest(path)
    text = (path / "graph.pir").read_text()
    if hashlib.sha256(text.encode()).hexdigest() != manifest.get("graph_hash"):
        raise ArtifactError(f"{path}: the graph does not match the manifest's graph hash")
    target = manifest.get("target")
    if target not in TARGETS:
        raise ArtifactError(f"{path}: target {target!r} cannot run on this machine; available: {', '.join(TARGETS)}")
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
    code = None
    if target == "cuda":
        from .cuda import cuda_device
        from ..errors import TargetUnavailableError
        try:
            cuda_device()
        except TargetUnavailableError as e:
            raise ArtifactError(f"{path}: target 'cuda' cannot run on this machine: {e}") from None
    if target in ("llvm", "aarch64"):
        from ..codegen.tvm import can_run_here, load_library
        if not can_run_here(target):
            import platform
            raise ArtifactError(f"{path}: compiled for {target}; this {platform.machine()} machine cannot run it")
        if "code/model.so" not in manifest["files"]:
            raise ArtifactError(f"{path}: a {target} artifact must hold code/model.so")
        from ..codegen.tvm.build import missing_cpu_features
        requires = manifest.get("requires") or {}
        missing = missing_cpu_features(requires)
        if missing:
            raise ArtifactError(f"{path}: compiled for a {requires.get('mcpu', '?')} CPU whose code uses "
                                f"{', '.join(missing)}, which this CPU lacks; recompile the model on this machine")
        code = load_library(g, target, path / "code" / "model.so")
    return CompiledModel(g, target, device=device, code=code)
