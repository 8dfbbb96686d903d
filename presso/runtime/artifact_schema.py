"""The types of an artifact manifest's fields, checked when it is read: a manifest that is edited,
damaged or written by someone else must fail as a typed ``ArtifactError`` naming the field, not
deep inside the load (a list where a dict is read, an int of a thousand digits used as a cache
length, a thousand nested lists in the graph metadata)."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import ArtifactError

MAX_DEPTH = 32                     # nesting anywhere in the manifest (what presso writes: < 10)
INT_LIMIT = 2 ** 63                # every int in the manifest fits in 64 bits
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(v, lo: int = -INT_LIMIT, hi: int = INT_LIMIT - 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# graph_meta fields later stages read, with what each must be (others are checked generically)
_GRAPH_META = {
    "max_len": ("an int in 1..2**24", lambda v: _is_int(v, 1, 1 << 24)),
    "example_bindings": ("an object of int sizes", lambda v: isinstance(v, dict)
                         and all(_is_int(x, 0, 1 << 40) for x in v.values())),
    "uncompressed_bytes": ("an int >= 0", lambda v: _is_int(v, 0)),
    "kv_cache_bytes_per_token_uncompressed": ("a number >= 0", lambda v: isinstance(v, (int, float))
                                              and not isinstance(v, bool) and 0 <= v < INT_LIMIT),
    "input_names": ("a list of strings", _is_str_list),
    "frontend": ("a string", lambda v: isinstance(v, str)),
    "output_spec": ("a string", lambda v: isinstance(v, str)),
    "compression": ("an object of per-layer objects (bytes_before, bits, group_size, rank: ints; rel_error: "
                    "a number)", lambda v: isinstance(v, dict) and all(_valid_record(x) for x in v.values())),
    "param_origin": ("an object of strings", lambda v: isinstance(v, dict)
                     and all(isinstance(x, str) for x in v.values())),
    "param_parts": ("an object of [name, rows] lists", lambda v: isinstance(v, dict) and all(
        isinstance(parts, list) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                        and _is_int(p[1], 0) for p in parts) for parts in v.values())),
    "input_mutations": ("a list of [output, input] index pairs", lambda v: isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 2 and all(_is_int(i, 0, 1 << 20) for i in p) for p in v)),
}


def _valid_record(rec) -> bool:
    """A layer's compression record, as ``CompiledModel.report`` reads it."""
    return isinstance(rec, dict) and all(_is_int(rec[k], 0) for k in ("bytes_before", "bits", "group_size", "rank")
                                         if k in rec) \
        and ("rel_error" not in rec or (isinstance(rec["rel_error"], (int, float))
                                        and not isinstance(rec["rel_error"], bool)))


def check_manifest(path: Path, manifest: dict) -> None:
    """Raise ``ArtifactError`` naming the first field of ``manifest`` that has the wrong type."""
    def bad(field: str, want: str, got) -> ArtifactError:
        return ArtifactError(f"{path}: manifest field '{field}' must be {want}, got {type(got).__name__} "
                             f"{_short(got)}")

    _check_values(path, manifest, "manifest", 0)
    if not _is_int(manifest.get("format_version")):
        raise bad("format_version", "an int", manifest.get("format_version"))
    for field in ("target", "graph_hash", "presso_version"):
        if not isinstance(manifest.get(field), str):
            raise bad(field, "a string", manifest.get(field))
    if not _SHA256.fullmatch(manifest["graph_hash"]):
        raise bad("graph_hash", "a SHA-256 in hex", manifest["graph_hash"])
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(d, str) and _SHA256.fullmatch(d) for d in files.values()):
        raise bad("files", "an object of file name -> SHA-256 in hex", files)
    for field in ("inputs", "outputs"):
        sig = manifest.get(field)
        if not isinstance(sig, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                and isinstance(e.get("type"), str) for e in sig):
            raise bad(field, "a list of {name, type} strings", sig)
    meta = manifest.get("graph_meta", {})
    if not isinstance(meta, dict):
        raise bad("graph_meta", "an object", meta)
    for key, (want, ok) in _GRAPH_META.items():
        if key in meta and not ok(meta[key]) and not (key == "output_spec" and meta[key] is None):
            raise bad(f"graph_meta.{key}", want, meta[key])
    notes = manifest.get("node_notes", {})
    if not isinstance(notes, dict) or not all(isinstance(n, dict) for n in notes.values()):
        raise bad("node_notes", "an object of per-node objects", notes)
    if "requires" in manifest and not isinstance(manifest["requires"], (dict, type(None))):
        raise bad("requires", "an object", manifest["requires"])


def _check_values(path: Path, v, where: str, depth: int) -> None:
    """No nesting deeper than ``MAX_DEPTH`` and no int beyond 64 bits, anywhere."""
    if depth > MAX_DEPTH:
        raise ArtifactError(f"{path}: manifest nests deeper than {MAX_DEPTH} levels at {where}")
    if isinstance(v, dict):
        for k, x in v.items():
            _check_values(path, x, f"{where}.{k}", depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_values(path, x, f"{where}[{i}]", depth + 1)
    elif isinstance(v, int) and not isinstance(v, bool) and not _is_int(v):
        raise ArtifactError(f"{path}: manifest field '{where}' holds an int that does not fit in 64 bits")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
