"""Big folders (issue 22) and the decode cache's budget (issue 20, bug 12): per-image entries,
least-recently-used eviction within a budget, memory that does not grow with the set."""
from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest
from conftest import make_dataset, shared_dataset, write_image

from finetune_core import cachestore, prepare
from finetune_core.data import scan_dataset


def count_decodes(monkeypatch) -> list[str]:
    """The paths decoded from their photos (training squares and test views), in order."""
    decoded = []
    real_train, real_test = prepare.decode_train, prepare.decode_test
    monkeypatch.setattr(prepare, "decode_train", lambda p, side: (decoded.append(p), real_train(p, side))[1])
    monkeypatch.setattr(prepare, "decode_test", lambda p, size: (decoded.append(p), real_test(p, size))[1])
    return decoded


def test_adding_one_photo_to_a_cached_set_decodes_that_photo_only(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", per_class=4, test_per_class=2)
    cache = tmp_path / "cache"
    prepare.prepare_data(scan_dataset(root), 28, cache_dir=cache)
    added = write_image(root / "train" / "cat" / "cat_new.png", (220, 40, 40), (40, 32), noise=20, seed=77)
    decoded = count_decodes(monkeypatch)
    data = prepare.prepare_data(scan_dataset(root), 28, cache_dir=cache)
    assert decoded == [str(added)]
    assert len(data.train_images) == 9 and str(added) in data.train_paths


def test_the_least_recently_used_entries_go_first_and_the_set_in_use_last(tmp_path):
    folder = tmp_path / "cache"
    store = cachestore.DiskStore(folder)
    now = time.time()
    for k, key in enumerate(["aa-old", "bb-mid", "cc-new", "dd-kept"]):
        store.put(key, b"x" * 100)
        os.utime(store.path(key), (now - 1000 + 100 * k, now - 1000 + 100 * k))
    os.utime(store.path("dd-kept"), (now - 5000, now - 5000))  # the oldest, but in use
    assert store.get("aa-old") == b"x" * 100  # a read is a use: now the newest
    freed = cachestore.evict(folder, budget=250, keep=[store.path("dd-kept")])
    assert freed == 200 and cachestore.cache_size(folder) == 200
    assert [store.get(k) is not None for k in ("aa-old", "bb-mid", "cc-new", "dd-kept")] == [True, False, False, True]
    cachestore.evict(folder, budget=50, keep=[store.path("dd-kept")])  # the set alone is over: it goes too
    assert cachestore.cache_size(folder) == 0
    assert cachestore.clear_cache(folder) == 0


def test_the_cache_stays_within_its_budget_and_an_evicted_image_reads_the_same(tmp_path, monkeypatch):
    first = make_dataset(tmp_path / "first", per_class=6, test_per_class=2, size=(64, 48))
    second = make_dataset(tmp_path / "second", classes=("ant", "bee"), per_class=6, test_per_class=2, size=(66, 50))
    cache = tmp_path / "cache"
    data = prepare.prepare_data(scan_dataset(first), 32, cache_dir=cache)
    before = np.asarray(data.train_images)
    one_set = cachestore.cache_size(cache)
    monkeypatch.setenv(cachestore.BUDGET_VARIABLE, str(1.5 * one_set / 1024**2))
    prepare.prepare_data(scan_dataset(second), 32, cache_dir=cache)
    assert cachestore.cache_size(cache) <= 1.5 * one_set  # the first set's entries made room
    decoded = count_decodes(monkeypatch)
    assert np.array_equal(np.asarray(data.train_images), before)  # evicted ones are decoded again, the same
    assert decoded, "the first set's entries should have been evicted"
    assert cachestore.clear_cache(cache) > 0 and cachestore.cache_size(cache) == 0


def test_a_budget_that_is_not_a_size_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(cachestore.BUDGET_VARIABLE, "lots")
    with pytest.raises(ValueError, match="TUNEBOARD_CACHE_BUDGET_MB='lots'"):
        cachestore.budget_bytes()


def test_the_cache_of_real_photos_is_no_larger_than_the_photos(tmp_path):
    root = shared_dataset("trashnet6")
    report = scan_dataset(root)
    rng = random.Random(0)
    for split in ("train", "test"):  # a sample of each split, as the whole set would be
        report.samples[split] = rng.sample(report.samples[split], 24 if split == "train" else 6)
    photos = sum(os.path.getsize(r.path) for split in ("train", "test") for r in report.samples[split])
    prepare.prepare_data(report, 224, cache_dir=tmp_path / "cache")
    assert cachestore.cache_size(tmp_path / "cache") <= photos


def test_home_shows_the_cache_size_and_clears_it(dashboard_env):
    from conftest import page

    store = cachestore.DiskStore(dashboard_env / "cache" / "images")
    store.put("abc", b"x" * 3 * 1024**2)
    at = page("app.py").run()
    assert any("Decode cache: 3 MB" in c.value for c in at.caption), [c.value for c in at.caption]
    at.button(key="clear_cache").click().run()
    assert cachestore.cache_size(dashboard_env / "cache") == 0
    assert any("Decode cache: 0 MB" in c.value for c in at.caption)
