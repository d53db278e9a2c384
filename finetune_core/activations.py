"""The frozen bottom's outputs (activations), computed once and reused.

With part of the network frozen (`train_stages` other than `all`), the engine runs the frozen
bottom once per augmented view of each image and trains only the top on its outputs. This module
holds those outputs: `FeatureCache` for one run (in memory, or memory-mapped beyond a budget) and
`shared_features_key`, which says when two runs can share them (a sweep's cells).
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .prepare import augment_batch, center_view_batch, normalize_batch

if TYPE_CHECKING:
    from .engine import Reporter, Setup

def pass_time_left(seconds: float, done: int, total: int) -> str:
    """The time left in a pass over `total` images of which `done` took `seconds`, in words."""
    left = seconds / max(done, 1) * (total - done)
    return f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min"



FEATURE_MEMORY_BUDGET = 4 * 1024**3  # cached activations above this go to a memory-mapped file
FEATURE_DTYPE = torch.float16        # how cached activations are stored (benchmarks/explore_fast.py --fp32-cache)

class FeatureCache:
    """Activations of the frozen bottom, computed once per (split, view) and kept in memory in
    FEATURE_DTYPE, float16 (or in a memory-mapped file above FEATURE_MEMORY_BUDGET). Training views: view 0 is
    the test transform's centre view; views 1, 2, ... are the book's RandomResizedCrop + flip,
    seeded by (seed, view) so a resumed run sees the same ones."""

    def __init__(self, bottom: nn.Module, ctx: Setup, reporter: Reporter, store: dict | None = None):
        self.bottom, self.ctx, self.reporter = bottom, ctx, reporter
        # `store`: outputs shared with other runs whose frozen part sees the same images the same
        # way (a sweep's cells: see shared_features_key); they outlive this run.
        self._shared = store is not None
        self._cache: dict[tuple, torch.Tensor] = store if store is not None else {}

    def get(self, split: str, view: int = 0, flip: bool = False) -> torch.Tensor:
        key = (split, view, flip)
        if key not in self._cache:
            self._cache[key] = self._compute(split, view, flip)
        return self._cache[key]

    def _images(self, split: str, view: int, flip: bool) -> tuple[int, Callable[[list[int]], torch.Tensor]]:
        ctx, data, size = self.ctx, self.ctx.data, self.ctx.config.image_size
        if split == "train" and view > 0:
            from .engine import epoch_seed  # the engine's seeding rule (it imports this module)

            rng = random.Random(epoch_seed(ctx.config.seed, view, 3))
            indices = ctx.train_idx
            return len(indices), lambda idx: augment_batch(data, [indices[i] for i in idx], size, rng, ctx.device,
                                                           ctx.config.crop_scale)
        if split in ("train", "val"):
            indices = ctx.train_idx if split == "train" else ctx.val_idx
            batch = lambda idx: center_view_batch(data, [indices[i] for i in idx], size, ctx.device)  # noqa: E731
        else:
            batch = lambda idx: data.test_images[idx].to(ctx.device)  # noqa: E731
            indices = range(len(data.test_labels))
        if flip:
            return len(indices), lambda idx: batch(idx).flip(-1)
        return len(indices), batch

    @torch.inference_mode()
    def _compute(self, split: str, view: int, flip: bool) -> torch.Tensor:
        ctx, cfg = self.ctx, self.ctx.config
        n, images_of = self._images(split, view, flip)
        what = {"train": f"training view {view + 1}", "val": "validation images", "test": "test images"}[split]
        what += " (mirrored)" if flip else ""
        self.bottom.eval()
        out: torch.Tensor | None = None
        t0 = time.perf_counter()
        for start in range(0, n, cfg.eval_batch_size):
            left = f", about {pass_time_left(time.perf_counter() - t0, start, n)} left" if start else ""
            self.reporter.prepare(f"computing the frozen layers' output for {what} ({start}/{n}{left})",
                                  ctx.progress())
            idx = list(range(start, min(n, start + cfg.eval_batch_size)))
            x = normalize_batch(images_of(idx), ctx.mean, ctx.std, cfg.channels_last)
            with ctx.autocast():
                y = self.bottom(x).to(FEATURE_DTYPE).cpu()
            if not torch.isfinite(y).all():
                raise RuntimeError(f"the frozen layers' output for {what} does not fit {FEATURE_DTYPE} (values "
                                   "beyond its range or not numbers); train all layers or another backbone")
            if out is None:
                out = self._allocate((n, *y.shape[1:]))
            out[start:start + len(idx)] = y
        if split == "train":  # the frozen layers' work counts as training time in images/s
            ctx.train_seconds += time.perf_counter() - t0
        assert out is not None
        return out

    def _allocate(self, shape: tuple) -> torch.Tensor:
        itemsize = torch.empty((), dtype=FEATURE_DTYPE).element_size()
        total = itemsize * int(np.prod(shape)) + sum(t.numel() * t.element_size() for t in self._cache.values())
        if total <= FEATURE_MEMORY_BUDGET:
            return torch.empty(shape, dtype=FEATURE_DTYPE)
        folder = Path(self.ctx.cache_dir or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix="tuneboard-activations-", suffix=".bin")
        os.close(fd)
        try:
            array = np.memmap(name, dtype=np.float16 if itemsize == 2 else np.float32, mode="w+", shape=shape)
        finally:
            os.unlink(name)  # the mapping stays valid; no file is left behind, even if the process is killed
        return torch.from_numpy(array)

    def close(self) -> None:
        if not self._shared:
            self._cache.clear()


# Settings that change what the trainable top does but not what the frozen bottom outputs: runs
# that differ only in these (a sweep's cells) can share the bottom's cached outputs.
TOP_ONLY_SETTINGS = ("lr", "head_lr_mult", "name", "group", "preset")


def shared_features_key(config: TrainConfig, stages: str) -> str:
    """Which cached outputs of the frozen part a run can reuse: every setting but TOP_ONLY_SETTINGS,
    and the split point."""
    values = {k: v for k, v in config.to_dict().items() if k not in TOP_ONLY_SETTINGS}
    return json.dumps({"settings": values, "stages": stages}, sort_keys=True, default=str)
