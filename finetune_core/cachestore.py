"""Tuneboard's cache folder: decoded images and cached activations, kept within a size budget.

Everything in it can be made again from the photos (at the cost of time), so it is bounded: after
a run adds entries, the least recently used ones are deleted until the folder is within the budget
(`TUNEBOARD_CACHE_BUDGET_MB`, default DEFAULT_BUDGET_MB). An entry's modification time is its last
use: a read touches it. Entries the caller still needs (the set in use) go last, and only when the
set alone is over the budget; such an entry is then made again when it is read.

The folder is `TUNEBOARD_CACHE`, or ~/.cache/tuneboard/decoded. Home shows its size and clears it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

BUDGET_VARIABLE = "TUNEBOARD_CACHE_BUDGET_MB"
DEFAULT_BUDGET_MB = 4096
TEMPORARY_PREFIX = "."  # files being written (and the mkstemp files of mapped activations)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TUNEBOARD_CACHE", Path.home() / ".cache" / "tuneboard" / "decoded"))


def megabytes_from_env(variable: str, default_mb: float) -> int:
    """A size in bytes given in megabytes by an environment variable; a value that is not a size
    is refused with a message naming the variable and the value."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return int(default_mb * 1024**2)
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = -1
    if not megabytes >= 0:
        raise ValueError(f"{variable}={text!r} is not a size in megabytes (e.g. {default_mb:g})")
    return int(megabytes * 1024**2)


def budget_bytes() -> int:
    """The cache's size budget in bytes, from TUNEBOARD_CACHE_BUDGET_MB (megabytes)."""
    return megabytes_from_env(BUDGET_VARIABLE, DEFAULT_BUDGET_MB)


def _entries(folder: Path) -> Iterable[os.DirEntry]:
    """Every finished entry under `folder` (files being written are left out)."""
    try:
        listing = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in listing:
        if entry.name.startswith(TEMPORARY_PREFIX):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _entries(Path(entry.path))
        elif entry.is_file(follow_symlinks=False):
            yield entry


def cache_size(folder: str | os.PathLike | None = None) -> int:
    """Bytes the cache holds on disk."""
    total = 0
    for entry in _entries(Path(folder) if folder else default_cache_dir()):
        try:
            total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            pass  # evicted or cleared meanwhile by another run
    return total


def clear_cache(folder: str | os.PathLike | None = None) -> int:
    """Delete everything in the cache; returns the bytes freed. Runs in progress lose nothing
    but time: what they read next is decoded again."""
    folder = Path(folder) if folder else default_cache_dir()
    freed = cache_size(folder)
    if folder.is_dir():
        for child in folder.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    return freed


def evict(folder: str | os.PathLike, budget: int | None = None, keep: Iterable[str | os.PathLike] = ()) -> int:
    """Delete the least recently used entries until the folder holds at most `budget` bytes (the
    configured budget by default); the entries in `keep` go last. Returns the bytes freed."""
    budget = budget_bytes() if budget is None else budget
    keep = {os.fspath(p) for p in keep}
    files = []
    for entry in _entries(Path(folder)):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        files.append((entry.path in keep, st.st_mtime, entry.path, st.st_size))
    total = sum(f[3] for f in files)
    freed = 0
    for _, _, path, size in sorted(files):  # others' entries first, the oldest first
        if total <= budget:
            break
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        total -= size
        freed += size
    return freed


class DiskStore:
    """Entries (bytes) by key, one file each, under `folder`/<first two characters>/<key>."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / key

    def get(self, key: str, head: int = -1) -> bytes | None:
        """The entry (its first `head` bytes when given), marked as just used; None when absent."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                blob = f.read(head)
            os.utime(path)  # least recently used: a read is a use
        except OSError:
            return None
        return blob

    def put(self, key: str, blob: bytes) -> None:
        """Write atomically (a unique temporary file renamed into place: two jobs writing the same
        entry never share a file). A cache that cannot be written only costs time."""
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMPORARY_PREFIX}{key}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError:
            pass


class MemoryStore:
    """The same interface, in memory (cache_dir "": nothing written to disk)."""

    def __init__(self):
        self.entries: dict[str, bytes] = {}

    def path(self, key: str) -> str:
        return key

    def get(self, key: str, head: int = -1) -> bytes | None:
        blob = self.entries.get(key)
        return blob if blob is None or head < 0 else blob[:head]

    def put(self, key: str, blob: bytes) -> None:
        self.entries[key] = blob
