"""Tuneboard's cache folder: decoded images and cached activations, kept within a size budget.

Everything in it can be made again from the photos (at the cost of time), so it is bounded: after
a run adds entries, the least recently used ones are deleted until the folder is within the budget
(`TUNEBOARD_CACHE_BUDGET_MB`, default DEFAULT_BUDGET_MB). An entry's modification time is its last
use: a read touches it. Entries the caller still needs (the set in use) go last, and only when the
set alone is over the budget; such an entry is then made again when it is read.

The folder is `TUNEBOARD_CACHE`, or ~/.cache/tuneboard/decoded. Home shows its size and clears it.
That folder is a user setting and may hold files of its own: eviction, the size and Clear touch only
Tuneboard's entries (ENTRY_FOLDERS, entry-shaped names: see is_entry), and a cache folder inside a
data root, or holding one, is refused before anything is deleted.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

BUDGET_VARIABLE = "TUNEBOARD_CACHE_BUDGET_MB"
DEFAULT_BUDGET_MB = 4096
TEMPORARY_PREFIX = "."  # files being written (and the mkstemp files of mapped activations)
# Tuneboard's own subfolders of the cache folder and the names of its entries there: decoded images
# (prepare.py, DiskStore: images/<first two characters>/<sha1>) and activations (activations.py:
# activations/<sha1>.npy) and the scan's per-file results (data.ScanMemo: scans/<sha1>.json); their
# temporary files start with TEMPORARY_PREFIX.
IMAGES, ACTIVATIONS, SCANS = "images", "activations", "scans"
ENTRY_FOLDERS = (IMAGES, ACTIVATIONS, SCANS)
_SHA1 = "[0-9a-f]{40}"
_IMAGE_ENTRY = re.compile(rf"{_SHA1}")
_IMAGE_TEMPORARY = re.compile(rf"\.{_SHA1}\.[^/]*\.tmp")
_SHARD = re.compile("[0-9a-f]{2}")
_ACTIVATION_ENTRY = re.compile(rf"{_SHA1}\.npy")
_ACTIVATION_TEMPORARY = re.compile(r"\.tuneboard-activations-[^/]*\.npy")
_SCAN_ENTRY = re.compile(rf"{_SHA1}\.json")
_SCAN_TEMPORARY = re.compile(r"\.tuneboard-scan-[^/]*\.json")


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


def is_entry(name: str, subfolder: str, temporary: bool = False) -> bool:
    """Whether a file name in one of ENTRY_FOLDERS is a finished entry Tuneboard wrote (or, with
    `temporary`, one of its temporary files)."""
    if subfolder == IMAGES:
        pattern = _IMAGE_TEMPORARY if temporary else _IMAGE_ENTRY
    elif subfolder == SCANS:
        pattern = _SCAN_TEMPORARY if temporary else _SCAN_ENTRY
    else:
        pattern = _ACTIVATION_TEMPORARY if temporary else _ACTIVATION_ENTRY
    return pattern.fullmatch(name) is not None


def _files(folder: Path) -> list[os.DirEntry]:
    try:
        return [entry for entry in os.scandir(folder) if entry.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _entries(folder: Path, temporary: bool = False) -> Iterable[os.DirEntry]:
    """Tuneboard's finished entries in the cache folder `folder` (its temporary files instead, with
    `temporary`); any other file there is the user's and never listed."""
    for subfolder in (ACTIVATIONS, SCANS):
        for entry in _files(folder / subfolder):
            if is_entry(entry.name, subfolder, temporary):
                yield entry
    try:
        shards = [entry for entry in os.scandir(folder / IMAGES)
                  if _SHARD.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return
    for shard in shards:
        for entry in _files(Path(shard.path)):
            if is_entry(entry.name, IMAGES, temporary) and entry.name.lstrip(TEMPORARY_PREFIX)[:2] == shard.name:
                yield entry


def check_not_a_data_folder(folder: Path) -> None:
    """Refuse a cache folder that is inside the data root, or holds it or an extra data root
    (datastore.allowed_roots): deleting there could reach photos. A cache inside an extra root is
    allowed: those can be broad folders (a home folder) that hold ~/.cache."""
    from .datastore import allowed_roots, data_root  # the data roots (datastore does not import the cache)
    cache, main = Path(folder).expanduser().resolve(), data_root()
    for root in {main, *(allowed_roots() or [])}:
        root = Path(root).expanduser().resolve()
        if cache == root or cache in root.parents or (root == main and root in cache.parents):
            raise ValueError(f"the cache folder {cache} (TUNEBOARD_CACHE) is inside or holds the data folder {root}: "
                             "choose a cache folder of its own; nothing was deleted")


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
    """Delete Tuneboard's entries in the cache (and temporary files left by stopped runs); returns
    the bytes freed. Other files in the folder stay. Runs in progress lose nothing but time: what
    they read next is decoded again."""
    folder = Path(folder) if folder else default_cache_dir()
    check_not_a_data_folder(folder)
    freed = cache_size(folder)
    for entry in [*_entries(folder), *_entries(folder, temporary=True)]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
    for shard in sorted(p for p in (folder / IMAGES).glob("??") if _SHARD.fullmatch(p.name)):  # emptied shards
        with contextlib.suppress(OSError):
            shard.rmdir()
    return freed


def evict(folder: str | os.PathLike, budget: int | None = None, keep: Iterable[str | os.PathLike] = ()) -> int:
    """Delete the least recently used entries until the folder holds at most `budget` bytes (the
    configured budget by default); the entries in `keep` go last. Returns the bytes freed.
    `keep` is read only when the folder is over the budget (it may be a generator: a 50,000-image
    set's paths cost more than listing a cache within its budget)."""
    budget = budget_bytes() if budget is None else budget
    check_not_a_data_folder(Path(folder))
    files = []
    for entry in _entries(Path(folder)):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        files.append((st.st_mtime, entry.path, st.st_size))
    total = sum(f[2] for f in files)
    if total <= budget:
        return 0
    keep = {os.fspath(p) for p in keep}
    freed = 0
    for _, _, path, size in sorted((path in keep, mtime, path, size) for mtime, path, size in files):
        # others' entries first, the oldest first
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

    def keys(self) -> set[str]:
        """The keys of the entries present now, from one listing per shard folder: what a set's
        index reads the headers of, instead of trying to open every image's entry (at 50,000 images
        on a cold cache that was 56,250 failed opens, each through the thread pool)."""
        present: set[str] = set()
        try:
            shards = [entry.path for entry in os.scandir(self.folder)
                      if _SHARD.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return present
        for shard in shards:
            present.update(entry.name for entry in _files(Path(shard)) if _IMAGE_ENTRY.fullmatch(entry.name))
        return present

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

    def keys(self) -> set[str]:
        return set(self.entries)

    def get(self, key: str, head: int = -1) -> bytes | None:
        blob = self.entries.get(key)
        return blob if blob is None or head < 0 else blob[:head]

    def put(self, key: str, blob: bytes) -> None:
        self.entries[key] = blob
