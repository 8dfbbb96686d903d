"""The file-system side of artifacts: paths confined to the artifact folder, the per-artifact
lock, and recovery of what a killed ``save`` leaves behind.

Names ``save`` uses next to an artifact ``DIR/NAME``:

    .NAME.lock            held (``flock``) while a save publishes NAME and while leftovers are recovered
    .NAME.tmp-PID-XXXX    the new artifact being written by process PID
    .NAME.old-PID-XXXX    the previous artifact, moved aside for the instant of the swap

A process killed while writing leaves a ``.tmp-``; one killed between the two renames of the
swap leaves NAME missing and the old artifact in ``.old-``. ``recover`` (run by every save of
NAME, and by a load that finds leftovers) puts a complete ``.old-`` back when NAME is missing
and deletes the leftovers of processes that no longer run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

from ..errors import ArtifactError, ArtifactPathError

MANIFEST = "manifest.json"
FORMAT = "presso-artifact"     # the manifest's "format": what makes a folder a presso artifact
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_ALLOWED = ("relative paths of regular files inside the artifact folder, made of letters, digits, '_', '.', '-' "
            "and '/', with no '..', no absolute path and no symlink")


def member(root: Path, name) -> Path:
    """The path of the artifact file ``name`` (a manifest ``files`` entry), refusing anything that
    could lead outside ``root``. Names are checked as text before the file system is touched, and
    symlinks are refused without being followed, so the error says nothing about outside files."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(not _PART.match(p) for p in parts):
        raise ArtifactPathError(f"{root}: the manifest names the file {name!r}, which is not allowed; "
                                f"allowed: {_ALLOWED}")
    p = root
    for i, part in enumerate(parts):
        p = p / part
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:
            raise ArtifactError(f"{root}: {name} is missing (truncated artifact?)") from None
        if stat.S_ISLNK(mode):
            raise ArtifactPathError(f"{root}: {'/'.join(parts[:i + 1])} is a symlink; an artifact holds "
                                    f"regular files only ({_ALLOWED})")
        if i < len(parts) - 1 and not stat.S_ISDIR(mode):
            raise ArtifactError(f"{root}: {name} is missing (truncated artifact?)")
    if not stat.S_ISREG(mode):
        raise ArtifactPathError(f"{root}: {name} is not a regular file ({_ALLOWED})")
    return p


def read_member(root: Path, name: str) -> bytes:
    with os.fdopen(os.open(member(root, name), os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        return f.read()


def sha256_member(root: Path, name: str) -> str:
    h = hashlib.sha256()
    with os.fdopen(os.open(member(root, name), os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so that a power loss after the rename
    that publishes it cannot leave a published artifact with empty files."""
    for dirpath, _, filenames in os.walk(root):
        for fn in filenames:
            fd = os.open(os.path.join(dirpath, fn), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path):
    """Hold ``.NAME.lock`` next to ``path``: an exclusive ``flock``, released by the kernel if the
    process dies. The lock file is removed on release; a waiter that then holds a removed file
    retries on the new one, so two processes never hold the lock on different files."""
    import fcntl
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st, cur = os.fstat(fd), os.stat(lock)
            if (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino):
                break
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _leftover_re(name: str):
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)-[^/]*$")


def leftovers(path: Path) -> list[tuple[str, int, Path]]:
    """(kind, pid, path) of the ``.tmp-`` and ``.old-`` folders saves of ``path`` left behind."""
    pat = _leftover_re(path.name)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [(m.group(1), int(m.group(2)), path.parent / n) for n in names if (m := pat.match(n))]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if not 0 < pid < 1 << 22:       # no process has this id (Linux's pid_max is at most 2**22)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_complete(d: Path) -> bool:
    """A folder holds a whole artifact: its manifest (written last) and every file it lists."""
    try:
        manifest = json.loads(read_member(d, MANIFEST))
        files = manifest["files"]
        for name in files:
            member(d, name)
        return isinstance(files, dict)
    except (ArtifactError, OSError, ValueError, KeyError, TypeError):
        return False


def recover(path: Path) -> None:
    """Undo what killed saves of ``path`` left (call with ``locked(path)`` held): when ``path`` is
    missing, put back the newest complete old artifact; delete leftovers of dead processes."""
    found = [(k, pid, p) for k, pid, p in leftovers(path) if not _alive(pid)]
    if not os.path.lexists(path):
        olds = [p for k, _, p in found if k == "old" and is_complete(p)]
        if olds:
            newest = max(olds, key=lambda p: p.stat().st_mtime)
            os.rename(newest, path)
            fsync_dir(path.parent)
    for _, _, p in found:
        if os.path.lexists(p):
            shutil.rmtree(p, ignore_errors=True)


def check_replaceable(path: Path) -> None:
    """``overwrite=True`` replaces a presso artifact and nothing else: refuse a file, a symlink,
    a folder without a presso manifest, or an artifact folder holding files of its own."""
    how = "overwrite=True (--force) replaces only a presso artifact folder; remove it yourself or choose another path"
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        raise ArtifactError(f"refusing to replace {path}: it is a symlink, not a presso artifact; {how}")
    if not stat.S_ISDIR(mode):
        raise ArtifactError(f"refusing to replace {path}: it is a file, not a presso artifact; {how}")
    try:
        manifest = json.loads(read_member(path, MANIFEST))
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError
    except (ArtifactError, OSError, ValueError, AttributeError):
        raise ArtifactError(f"refusing to replace {path}: it is a folder without a presso manifest.json, "
                            f"not a presso artifact; {how}") from None
    known = {MANIFEST, "signature.json"} | {f for f in files if isinstance(f, str)}
    known |= {"/".join(f.split("/")[:i]) for f in known for i in range(1, f.count("/") + 1)}
    extra = []
    for dirpath, dirnames, filenames in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        for n in dirnames + filenames:
            r = n if rel == "." else f"{rel}/{n}"
            if r not in known:
                extra.append(r)
    if extra:
        raise ArtifactError(f"refusing to replace {path}: besides the artifact it holds {', '.join(sorted(extra)[:5])}"
                            f"{' ...' if len(extra) > 5 else ''}, which the manifest does not list; {how}")
