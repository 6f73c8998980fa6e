"""A cache directory that can be shared and trusted: a lock so that it is built once, and a
manifest of every file's size and hash so that a damaged copy is noticed before it is read.

The manifest (``DONE``, written last, before the directory is renamed into place) records each
file's size, SHA-256 and modification time. Opening a cache compares sizes (a truncated file is
caught at once) and, for any file whose modification time differs from the recorded one
(copied, touched, rewritten), its hash: a file unchanged since it was hashed is not read again,
so opening a large cache costs a few ``stat`` calls.

The lock is ``fcntl.flock`` on a file beside the cache: held by one process at a time on one
machine, and across machines on NFSv4 and Lustre (flock is emulated there by byte-range locks);
a process that dies releases it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "DONE"
BLOCK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Records every file of ``directory`` (the manifest last, after an fsync of the others)."""
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        st = path.stat()
        files[path.name] = {"size": st.st_size, "sha256": sha256(path), "mtime_ns": st.st_mtime_ns}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def damage(directory: Path) -> str | None:
    """None if ``directory`` is a complete cache whose files match its manifest, else what is
    wrong (missing, no manifest, a file missing, truncated or altered)."""
    if not directory.is_dir():
        return "not built"
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable manifest {MANIFEST} (an interrupted or older build)"
    for name, want in files.items():
        path = directory / name
        try:
            st = path.stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != want["size"]:
            return f"{name} has {st.st_size} bytes, {want['size']} recorded"
        if st.st_mtime_ns != want["mtime_ns"] and sha256(path) != want["sha256"]:
            return f"{name} does not match its recorded SHA-256"
    return None


@contextlib.contextmanager
def file_lock(path: Path):
    """Holds an exclusive lock on ``path`` (created if needed) for the ``with`` block; says so
    when it has to wait for another process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that holds %s (building the same cache)", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
