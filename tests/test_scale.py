"""Big folders (issue 22) and the decode cache's budget (issue 20, bug 12): per-image entries,
least-recently-used eviction within a budget, memory that does not grow with the set."""
from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import numpy as np
import pytest
import torch
from conftest import make_dataset, shared_dataset, tiny_train_config, write_image

from finetune_core import activations, cachestore, prepare
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


def entry_name(text: str) -> str:
    """A key shaped as the store's (a sha1: prepare.entry_key), so eviction and Clear treat it as an entry."""
    return hashlib.sha1(text.encode()).hexdigest()


def test_the_least_recently_used_entries_go_first_and_the_set_in_use_last(tmp_path):
    folder = tmp_path / "cache"
    store = cachestore.DiskStore(folder / "images")  # where prepare.py keeps decoded images
    now = time.time()
    for k, key in enumerate(["aa-old", "bb-mid", "cc-new", "dd-kept"]):
        key = entry_name(key)
        store.put(key, b"x" * 100)
        os.utime(store.path(key), (now - 1000 + 100 * k, now - 1000 + 100 * k))
    kept = store.path(entry_name("dd-kept"))
    os.utime(kept, (now - 5000, now - 5000))  # the oldest, but in use
    assert store.get(entry_name("aa-old")) == b"x" * 100  # a read is a use: now the newest
    freed = cachestore.evict(folder, budget=250, keep=[kept])
    assert freed == 200 and cachestore.cache_size(folder) == 200
    assert [store.get(entry_name(k)) is not None for k in ("aa-old", "bb-mid", "cc-new", "dd-kept")] \
        == [True, False, False, True]
    cachestore.evict(folder, budget=50, keep=[kept])  # the set alone is over: it goes too
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
    store.put(entry_name("abc"), b"x" * 3 * 1024**2)
    at = page("app.py").run()
    assert any("Decode cache: 3 MiB" in c.value for c in at.caption), [c.value for c in at.caption]  # 3 x 1024**2 bytes
    at.button(key="clear_cache").click().run()
    assert cachestore.cache_size(dashboard_env / "cache") == 0
    assert any("Decode cache: 0 MiB" in c.value for c in at.caption)


def anonymous_memory() -> int:
    """This process's resident anonymous memory in bytes (not the page cache of mapped files)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakMemory:
    """The highest anonymous memory above its level at the start, sampled every 2 ms in a thread."""

    def __enter__(self):
        self.start, self.peak, self.done = anonymous_memory(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, anonymous_memory() - self.start)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, anonymous_memory() - self.start)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures memory through /proc (Linux)")
def test_memory_stays_under_its_budget_on_a_set_larger_than_it(tmp_path, monkeypatch):
    """Decoded images are read a batch at a time and activations beyond the (lowered) budget are
    memory-mapped: a set whose decoded images (30 MB) and activations (20 MB) are far over the
    budget raises this process's anonymous memory by less than 15 MB (the 20 MB of activations
    held in memory would exceed it; 10 MB was too tight for the reading threads' own buffers:
    10.1 MB seen once)."""
    from torch import nn

    from finetune_core.engine import Reporter, setup
    from finetune_core.runs import RunDir

    monkeypatch.setenv(activations.MEMORY_VARIABLE, "1")
    root = make_dataset(tmp_path / "big", per_class=80, test_per_class=2, size=(256, 256), noise=4)
    config = tiny_train_config(root, image_size=128, train_stages="1", eval_batch_size=8, feature_views=2)
    reporter = Reporter(RunDir(tmp_path), None, None)
    ctx = setup(config, RunDir(tmp_path), reporter, cache_dir=str(tmp_path / "cache"))
    bottom = nn.Conv2d(3, 32, 4, stride=4)  # 32 x 32 x 32 float16 activations: 64 KB per image and view
    cache = activations.FeatureCache(bottom, ctx, reporter, stages="1")
    decoded = ctx.data.train_images.nbytes
    with torch.inference_mode():  # what any first use costs (reading threads, the layer's kernels), once
        bottom(prepare.normalize_batch(ctx.data.train_images[list(range(8))], ctx.mean, ctx.std))
    with PeakMemory() as memory:
        for start in range(0, len(ctx.data.train_images), 8):  # every image, as an epoch reads them
            ctx.data.train_images[list(range(start, min(start + 8, len(ctx.data.train_images))))]
        views = [cache.get("train", view) for view in (0, 1)]
    held = sum(v.numel() * v.element_size() for v in views)
    assert decoded >= 30 * 1024**2 and held >= 19 * 1024**2
    assert memory.peak < 15 * 1024**2, f"{memory.peak / 1024**2:.1f} MB"


def count_computed(monkeypatch) -> list[tuple]:
    """Every (split, view, flip) whose activations the frozen layers compute, whole (get) or
    streamed by the epoch that trains on them (stream)."""
    computed = []
    real, real_stream = activations.FeatureCache._compute, activations.FeatureCache.stream
    monkeypatch.setattr(activations.FeatureCache, "_compute",
                        lambda self, *key: (computed.append(key), real(self, *key))[1])
    monkeypatch.setattr(activations.FeatureCache, "stream",
                        lambda self, view, *args: (computed.append(("train", view, False)),
                                                   real_stream(self, view, *args))[1])
    return computed


@pytest.mark.slow
def test_a_resumed_run_and_the_run_after_the_lr_finder_compute_no_activation_again(tiny_config, tmp_path,
                                                                                    cache_dir, monkeypatch):
    """Each view is computed by the first epoch that trains on it: a run stopped once every view
    was computed (after the second epoch) computes nothing when resumed."""
    from finetune_core.engine import train
    from finetune_core.lr_find import find_lr

    config = tiny_config.replace(epochs=3, train_stages="1", feature_views=2)
    computed = count_computed(monkeypatch)
    find_lr(config, cache_dir=cache_dir, steps=2)  # within the first epoch: the first view
    assert computed == [("train", 0, False)]
    computed.clear()
    stop = threading.Event()
    status = train(config, tmp_path / "run", cache_dir=cache_dir, stop_event=stop,
                   on_event=lambda e: e["kind"] == "epoch" and e["epoch"] == 2 and stop.set())
    assert status["state"] == "stopped"
    assert ("train", 0, False) not in computed and ("train", 1, False) in computed  # the finder's view is reused
    computed.clear()
    status = train(config, tmp_path / "run", cache_dir=cache_dir, resume=True)
    assert status["state"] == "completed" and computed == []


def test_the_activation_budget_and_its_cost_are_stated_and_a_bad_one_named(monkeypatch):
    monkeypatch.setenv(activations.MEMORY_VARIABLE, "512")
    assert activations.memory_budget() == 512 * 1024**2
    assert "up to 512 MB" in activations.memory_note() and "memory-mapped" in activations.memory_note()
    monkeypatch.setenv(activations.MEMORY_VARIABLE, "-3")
    assert "TUNEBOARD_ACTIVATION_MEMORY_MB='-3'" in activations.memory_note()


def test_the_frozen_pass_on_a_cpu_runs_in_batches_that_bound_its_memory(tmp_path):
    from torch import nn

    from finetune_core.engine import Reporter, setup
    from finetune_core.runs import RunDir

    root = make_dataset(tmp_path / "d", per_class=40, test_per_class=1, size=(32, 32))
    config = tiny_train_config(root, train_stages="1", eval_batch_size=256)
    reporter = Reporter(RunDir(tmp_path), None, None)
    ctx = setup(config, RunDir(tmp_path), reporter, cache_dir="")
    sizes = []
    bottom = nn.Conv2d(3, 4, 8, stride=8)
    bottom.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    activations.FeatureCache(bottom, ctx, reporter, stages="1").get("train", 0)
    assert sum(sizes) == len(ctx.train_idx) == 80 and max(sizes) == activations.CPU_PASS_BATCH


class CountingStore(cachestore.DiskStore):
    """A DiskStore that counts the entries it is asked to open."""

    def __init__(self, folder):
        super().__init__(folder)
        self.opened: list[str] = []

    def get(self, key, head=-1):
        self.opened.append(key)
        return super().get(key, head)


def test_a_lazy_index_opens_only_the_entries_the_cache_holds(tmp_path, monkeypatch):
    """Round 4's cut in a run's start (issue 22): a streamed run's index of a cold cache opened
    every image's entry in vain (56,250 failed opens at 50,000 images); now it lists the cache
    once and opens only the entries there, with the same result: those not there wait for their
    batch, those there give their size, and a file known to fail is still skipped at once."""
    root = make_dataset(tmp_path / "d", per_class=4, test_per_class=2, size=(40, 32))
    report = scan_dataset(root)
    cache = tmp_path / "cache"
    stores = []
    monkeypatch.setattr(prepare, "DiskStore", lambda folder: stores.append(CountingStore(folder)) or stores[-1])
    cold = prepare.prepare_data(report, 28, cache_dir=cache, lazy_train=True, lazy_test=True)
    assert stores[-1].opened == [] and cold.pending == set(range(8)) and cold.test_pending
    warm_rows = [0, 5]  # two training images decoded, as a streamed batch leaves them
    assert cold.decode_pending(warm_rows) == {}
    broken = report.samples["train"][3].path
    bad_key = cold.train_images.keys[3]
    stores[-1].put(bad_key, prepare.failed_entry("failed to decode (test), skipped"))  # known to fail
    again = prepare.prepare_data(report, 28, cache_dir=cache, lazy_train=True, lazy_test=True)
    opened = set(stores[-1].opened)
    assert opened == {cold.train_images.keys[i] for i in warm_rows} | {bad_key}
    assert broken not in again.train_paths and [p.path for p in again.skipped] == [broken]
    assert len(again.train_paths) == 7 and len(again.pending) == 5  # 8 - 2 decoded - 1 known to fail
    decoded = [again.train_paths.index(cold.train_paths[i]) for i in warm_rows]
    assert not set(decoded) & again.pending
    assert [tuple(again.train_sizes[row]) for row in decoded] == [(40, 32), (40, 32)]


def test_eviction_within_the_budget_does_not_read_the_set_it_keeps(tmp_path):
    """The set's paths (a generator) are read only when the cache is over its budget."""
    folder = tmp_path / "cache"
    store = cachestore.DiskStore(folder / "images")
    store.put(entry_name("one"), b"x" * 100)

    def keep():
        raise AssertionError("the kept set was read with the cache within its budget")
        yield  # a generator

    assert cachestore.evict(folder, budget=100, keep=keep()) == 0
    assert cachestore.evict(folder, budget=50, keep=iter([store.path(entry_name("one"))])) == 100
