"""The cache folder (TUNEBOARD_CACHE) is a user setting: eviction and Home's "Clear the cache"
delete only Tuneboard's own entries there, never a file of the user's, and a cache folder that
overlaps a data root is refused."""
from __future__ import annotations

import hashlib
import os

import pytest

from finetune_core import cachestore


def put_foreign_files(folder) -> list:
    """A user's files in the cache folder, in and beside Tuneboard's subfolders, named like nothing it writes."""
    files = [folder / "holiday" / "photo.jpg", folder / "notes.txt", folder / "images" / "readme.txt",
             folder / "activations" / "mine.npy", folder / "images" / "ab" / "abcd.jpg"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"u" * 1000)
        os.utime(path, (1, 1))  # older than any entry: the first to go if eviction looked at them
    return files


def test_eviction_and_clear_delete_only_tuneboards_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBOARD_DATA_ROOT", str(tmp_path / "data"))
    folder = tmp_path / "cache"
    foreign = put_foreign_files(folder)
    store = cachestore.DiskStore(folder / "images")
    keys = [hashlib.sha1(str(k).encode()).hexdigest() for k in range(3)]
    for key in keys:
        store.put(key, b"x" * 100)
    activation = folder / "activations" / f"{keys[0]}.npy"
    activation.write_bytes(b"a" * 100)
    stale = folder / "activations" / ".tuneboard-activations-k1x2.npy"  # left by a killed run
    stale.write_bytes(b"t" * 100)
    assert cachestore.cache_size(folder) == 400  # the entries alone
    assert cachestore.evict(folder, budget=0) == 400
    assert all(path.exists() for path in foreign), "eviction over budget deleted a user's file"
    store.put(keys[1], b"x" * 100)
    assert cachestore.clear_cache(folder) == 100
    assert all(path.exists() for path in foreign), "Clear deleted a user's file"
    assert not stale.exists() and store.get(keys[1]) is None


def test_a_cache_folder_overlapping_a_data_root_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBOARD_DATA_ROOT", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    for folder in (tmp_path, tmp_path / "data", tmp_path / "data" / "cache"):
        with pytest.raises(ValueError, match="cache folder .* data folder .*data"):
            cachestore.clear_cache(folder)
        with pytest.raises(ValueError, match="cache folder .* data folder"):
            cachestore.evict(folder, budget=0)
    monkeypatch.setenv("TUNEBOARD_EXTRA_DATA_ROOTS", str(tmp_path / "outer" / "photos"))
    with pytest.raises(ValueError, match="data folder .*photos"):
        cachestore.clear_cache(tmp_path / "outer")  # holds an extra data root
    assert cachestore.clear_cache(tmp_path / "outer" / "photos-cache") == 0  # beside them: allowed


def test_a_run_with_its_cache_in_the_data_folder_is_refused_before_decoding(tmp_path, monkeypatch):
    from conftest import make_dataset
    from finetune_core.data import scan_dataset
    from finetune_core.prepare import prepare_data

    monkeypatch.setenv("TUNEBOARD_DATA_ROOT", str(tmp_path / "data"))
    report = scan_dataset(make_dataset(tmp_path / "data" / "pets", per_class=2, test_per_class=1))
    with pytest.raises(ValueError, match="TUNEBOARD_CACHE"):
        prepare_data(report, 32, cache_dir=tmp_path / "data" / "pets" / "cache")
    assert not (tmp_path / "data" / "pets" / "cache").exists()
