"""Artifact authenticity: an HMAC-SHA256 over the exact bytes of ``manifest.json``.

The manifest holds the SHA-256 of every other file of the artifact, the graph hash, the format
version, the input/output signature and the graph metadata, so one MAC over its bytes covers the
whole artifact. The MAC lives in ``signature.json`` next to it::

    {"algorithm": "hmac-sha256", "key_id": "<16 hex>", "mac": "<64 hex>"}

``key_id`` is an HMAC of a fixed string under the same key: it lets ``load`` tell "signed with
another key" from "edited after signing" without revealing anything the MAC itself does not.

The key is the caller's (``save(path, key=...)`` / ``load(path, key=...)``, bytes or str), or
the ``PRESSO_ARTIFACT_KEY`` environment variable when no key is passed. With a key, ``load``
accepts only an artifact that verifies under it; without one it refuses a signed artifact (it
cannot check it) and accepts an unsigned one, whose hashes then detect corruption only.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Optional, Union

from ..config import ARTIFACT_KEY, artifact_key
from ..errors import ArtifactAuthError

ENV_KEY = ARTIFACT_KEY
SIGNATURE = "signature.json"
ALGORITHM = "hmac-sha256"
_MAC_DOMAIN = b"presso-artifact manifest v1\0"
_KEY_ID_DOMAIN = b"presso-artifact key id v1"

Key = Union[bytes, bytearray, str, None]


def resolve_key(key: Key) -> Optional[bytes]:
    """The key as bytes: the one given, else ``$PRESSO_ARTIFACT_KEY``, else None (unkeyed)."""
    if key is None:
        key = artifact_key()
        if key is None:
            return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray)):
        raise ArtifactAuthError(f"an artifact key must be bytes or str, got {type(key).__name__}")
    if not key:
        raise ArtifactAuthError("an artifact key must not be empty (an empty key authenticates nothing)")
    return bytes(key)


def key_id(key: bytes) -> str:
    return hmac.new(key, _KEY_ID_DOMAIN, hashlib.sha256).hexdigest()[:16]


def mac(key: bytes, manifest_bytes: bytes) -> str:
    return hmac.new(key, _MAC_DOMAIN + manifest_bytes, hashlib.sha256).hexdigest()


def signature_bytes(key: bytes, manifest_bytes: bytes) -> bytes:
    sig = {"algorithm": ALGORITHM, "key_id": key_id(key), "mac": mac(key, manifest_bytes)}
    return json.dumps(sig, indent=1, sort_keys=True).encode()


def verify(path: Path, manifest_bytes: bytes, signature: Optional[bytes], key: Optional[bytes]) -> bool:
    """True when the artifact authenticates under ``key``; False for an unsigned artifact loaded
    without a key; otherwise an ``ArtifactAuthError`` that says what failed and what to do."""
    if signature is None:
        if key is None:
            return False
        raise ArtifactAuthError(
            f"{path}: the artifact is not signed, but a key was given (load(key=...) or ${ENV_KEY}), so only "
            "an artifact signed with that key is accepted; re-save it with save(path, key=...), or load it "
            f"without a key (unset ${ENV_KEY}) to accept an unauthenticated artifact")
    try:
        sig = json.loads(signature)
        ok = (isinstance(sig, dict) and sig.get("algorithm") == ALGORITHM
              and all(isinstance(sig.get(k), str) for k in ("key_id", "mac")))
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ArtifactAuthError(f"{path}: {SIGNATURE} is malformed (expected {{\"algorithm\": \"{ALGORITHM}\", "
                                "\"key_id\": ..., \"mac\": ...}); the artifact cannot be authenticated")
    if key is None:
        raise ArtifactAuthError(
            f"{path}: the artifact is signed (key id {sig['key_id']}) and no key was given; pass "
            f"load(path, key=...) or set ${ENV_KEY} to the key it was saved with")
    if not hmac.compare_digest(sig["key_id"], key_id(key)):
        raise ArtifactAuthError(f"{path}: the artifact was signed with another key (key id {sig['key_id']}; "
                                f"the key given has id {key_id(key)}); it was not loaded")
    if not hmac.compare_digest(sig["mac"], mac(key, manifest_bytes)):
        raise ArtifactAuthError(f"{path}: manifest.json does not match its MAC: the artifact was changed after "
                                "it was signed; it was not loaded")
    return True

