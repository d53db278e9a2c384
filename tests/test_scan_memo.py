"""Scanning a folder again costs a stat per unchanged file (issue 22: the scan of 9,000 files took
about 20 s before every run): each file's result is remembered in the cache folder by its path,
size, times and inode."""
from __future__ import annotations

import os

from conftest import make_dataset, write_image

from finetune_core import cachestore, data


def test_a_second_scan_reads_only_the_files_that_changed(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", per_class=3, test_per_class=1)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a picture")
    cache = tmp_path / "cache"
    checked = []
    real = data._check_image
    monkeypatch.setattr(data, "_check_image", lambda path, *a: (checked.append(path.name), real(path, *a))[1])
    plain = data.scan_dataset(root)
    checked.clear()
    first = data.scan_dataset(root, scan_cache=cache)
    assert len(checked) == 9 and list(cache.glob(f"{cachestore.SCANS}/*.json"))
    checked.clear()
    again = data.scan_dataset(root, scan_cache=cache)
    assert checked == []  # nothing read: every file, the broken one included, as remembered
    for report in (first, again):
        assert report.samples == plain.samples and report.problems == plain.problems  # the same report
    changed = root / "train" / "dog" / "dog_0.png"
    before = os.stat(changed)
    write_image(changed, (10, 10, 10), (40, 32))  # rewritten in place...
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))  # ...its modification time set back
    third = data.scan_dataset(root, scan_cache=cache)
    assert checked == ["dog_0.png"]
    assert next(r.sha1 for r in third.samples["train"] if r.path == str(changed)) != \
        next(r.sha1 for r in plain.samples["train"] if r.path == str(changed))
    assert cachestore.cache_size(cache) > 0 and cachestore.clear_cache(cache) and not list(cache.rglob("*.json"))
