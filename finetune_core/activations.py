"""The frozen bottom's outputs (activations), computed once and reused.

With part of the network frozen (`train_stages` other than `all`), the engine runs the frozen
bottom once per augmented view of each image and trains only the top on its outputs. This module
holds those outputs: `FeatureCache` for one run (in memory, or memory-mapped beyond a budget) and
`shared_features_key`, which says when two runs can share them (a sweep's cells).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .cachestore import default_cache_dir, evict, megabytes_from_env
from .config import TrainConfig
from .data import DatasetError
from .prepare import center_view_batch, cut_crops, draw_crops, normalize_batch

if TYPE_CHECKING:
    from .engine import Reporter, Setup

def pass_time_left(seconds: float, done: int, total: int) -> str:
    """The time left in a pass over `total` images of which `done` took `seconds`, in words."""
    left = seconds / max(done, 1) * (total - done)
    return f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min"



FEATURE_DTYPE = torch.float16  # how cached activations are stored (benchmarks/explore_fast.py --fp32-cache)
PASS_FORMAT = "bn-folded"  # kept activations computed by fold_batchnorm's copy (earlier files: not reused)
MEMORY_VARIABLE = "TUNEBOARD_ACTIVATION_MEMORY_MB"
DEFAULT_MEMORY_MB = 1024  # cached activations beyond this are memory-mapped from their file
CPU_PASS_BATCH = 64  # images per frozen-layer pass on a CPU: as fast per image as 256, a quarter of the memory


def memory_budget() -> int:
    """Bytes of cached activations a run keeps in memory (TUNEBOARD_ACTIVATION_MEMORY_MB); beyond
    it they are read from a memory-mapped file: the page cache then holds what fits, and a set
    larger than the machine's free memory is read from disk each epoch (slower, never swapped)."""
    return megabytes_from_env(MEMORY_VARIABLE, DEFAULT_MEMORY_MB)


def memory_note() -> str:
    """The Train page's line on the activation budget: what it is and what exceeding it costs."""
    try:
        budget = f"{memory_budget() / 1024**2:,.0f} MB"
    except ValueError as exc:
        return f"Cached activations: {exc}; fix it (the runs fail until then)."
    return (f"Cached activations of the frozen layers are kept in memory up to {budget} ({MEMORY_VARIABLE}); "
            "beyond that they are memory-mapped from the cache folder: memory stays bounded, and each "
            "epoch reads them from disk where the system's page cache cannot hold them (slower, never swapped). "
            "They are kept in the cache, so a resumed run or the run after the LR finder reuses them.")


def activations_folder(cache_dir: str | None) -> Path | None:
    """Where finished activations are kept for later runs (a resume, the run after an LR finder):
    `activations/` in the cache folder, within its budget; None to keep nothing (cache_dir "")."""
    if cache_dir == "":
        return None
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / "activations"


class FeatureCache:
    """Activations of the frozen bottom, computed once per (split, view) and stored in
    FEATURE_DTYPE, float16. Training views: view 0 is the test transform's centre view; views 1,
    2, ... are the book's RandomResizedCrop + flip, seeded by (seed, view) so a resumed run sees the
    same ones. With a cache folder, each finished (split, view) is kept in a file under
    `activations/`, keyed by the settings that shape it (shared_features_key), the frozen part's
    weights (weights_fingerprint) and the images' contents, so a resumed run, or the run after the LR finder, reads it instead of computing it;
    up to memory_budget() they are held in memory, beyond it memory-mapped from that file."""

    def __init__(self, bottom: nn.Module, ctx: Setup, reporter: Reporter, store: dict | None = None,
                 stages: str = ""):
        self.ctx, self.reporter = ctx, reporter
        self._bottom, self._folded = bottom, None  # folded on the first pass (a cache that only reads files never is)
        # `store`: outputs shared with other runs whose frozen part sees the same images the same
        # way (a sweep's cells: see shared_features_key); they outlive this run.
        self._shared = store is not None
        self._cache: dict[tuple, torch.Tensor] = store if store is not None else {}
        self.folder = activations_folder(ctx.cache_dir)
        self.settings_key = shared_features_key(ctx.config, stages)
        # The frozen part's own weights: a kept file is reused only by a bottom with exactly these
        # (a resumed run's come from its checkpoint; a starting-weights file may have changed).
        self.weights_key = weights_fingerprint(bottom) if self.folder is not None else ""  # the model's own
        self.used_files: list[Path] = []  # this run's entries: evicted last
        self._partial: tuple[str, np.memmap] | None = None  # a file being written in place
        self.streaming: torch.Tensor | None = None  # the view stream() is computing, its rows done so far
        self.pass_seconds, self.pass_images = 0.0, 0  # this cache's passes so far (the engine's time-left rate)

    @property
    def bottom(self) -> nn.Module:
        """The frozen bottom that the passes run: fold_batchnorm's copy, made when first needed
        (the model's own modules stay as they train)."""
        if self._folded is None:
            self._folded = fold_batchnorm(self._bottom)
        return self._folded

    def get(self, split: str, view: int = 0, flip: bool = False) -> torch.Tensor:
        key = (split, view, flip)
        if key not in self._cache:
            loaded = self._load(split, view, flip)
            self._cache[key] = loaded if loaded is not None else self._compute(split, view, flip)
        return self._cache[key]

    def entry_path(self, split: str, view: int, flip: bool) -> Path | None:
        """The file of one (split, view): the settings, the split point and the images' entries."""
        if self.folder is None:
            return None
        data = self.ctx.data
        if split == "test":
            keys = data.test_images.keys
        else:
            rows = self.ctx.train_idx if split == "train" else self.ctx.val_idx
            keys = [data.train_images.keys[i] for i in rows]
        h = hashlib.sha1(f"{self.settings_key}|{self.weights_key}|{split}|{view}|{flip}|{FEATURE_DTYPE}|"
                         f"{PASS_FORMAT}".encode())
        for key in keys:
            h.update(key.encode())
        return self.folder / f"{h.hexdigest()}.npy"

    def _load(self, split: str, view: int, flip: bool) -> torch.Tensor | None:
        path = self.entry_path(split, view, flip)
        if path is None or not path.exists():
            return None
        try:
            mapped = np.load(path, mmap_mode="c")  # copy-on-write: writable for torch, the file untouched
            os.utime(path)  # least recently used: a read is a use
        except (OSError, ValueError):
            return None  # damaged or evicted meanwhile: compute it again
        self.used_files.append(path)
        if mapped.nbytes + self._held() <= memory_budget():
            return torch.from_numpy(np.array(mapped))
        return torch.from_numpy(mapped)

    def _images(self, split: str, view: int, flip: bool) -> tuple[int, Callable[[list[int]], torch.Tensor]]:
        """(images in the split, a function from positions in it to their uint8 batch)."""
        ctx, data, size = self.ctx, self.ctx.data, self.ctx.config.image_size
        if split == "train" and view > 0:
            from .engine import epoch_seed  # the engine's seeding rule (it imports this module)

            indices = ctx.train_idx
            failed = data.decode_pending(indices)  # the crops need every image's size
            if failed:
                row, why = next(iter(failed.items()))
                raise OSError(f"{data.train_paths[row]}: {why}")
            crops = draw_crops(data, indices, random.Random(epoch_seed(ctx.config.seed, view, 3)), ctx.config.crop_scale)
            return len(indices), lambda idx: cut_crops(data, [indices[i] for i in idx], [crops[i] for i in idx], size,
                                                       ctx.device)
        if split in ("train", "val"):
            indices = ctx.train_idx if split == "train" else ctx.val_idx
            batch = lambda idx: center_view_batch(data, [indices[i] for i in idx], size, ctx.device)  # noqa: E731
        else:
            batch = lambda idx: data.test_images[idx].to(ctx.device)  # noqa: E731
            indices = range(len(data.test_labels))
        if flip:
            return len(indices), lambda idx: batch(idx).flip(-1)
        return len(indices), batch

    def holds(self, split: str, view: int = 0, flip: bool = False) -> bool:
        """Whether (split, view) is computed and held (without looking for a kept file)."""
        return (split, view, flip) in self._cache

    def missing(self, split: str, view: int = 0, flip: bool = False) -> bool:
        """Whether (split, view) has still to be computed: neither held nor kept in a file."""
        key = (split, view, flip)
        if key not in self._cache:
            loaded = self._load(split, view, flip)
            if loaded is None:
                return True
            self._cache[key] = loaded
        return False

    def stream(self, view: int, batches: list[list[int]], drop: Callable[[dict[int, str]], None]
               ) -> Iterator[list[int]]:
        """Compute the training view `view` while the first epoch that uses it trains: one batch of
        positions (in ctx.train_idx) at a time, in the order given, decoding the images not decoded
        yet (PreparedData.decode_pending) and running the frozen bottom on them; yields each batch's
        positions that decoded, once their activations are in the view (self.get then has them).
        The crops of view > 0 are drawn for the whole view first, in the images' order, so the view
        holds what get() would compute. Files that fail to decode are left out of their batch and,
        at the end, handed to `drop` ({position: why}), which takes them out of ctx.train_idx; the
        view then holds the others only, and is kept as get() keeps it. A stop (or any error)
        between batches leaves nothing half-written behind."""
        ctx = self.ctx
        n, images_of = self._images("train", view, False)
        path = self.entry_path("train", view, False)
        out: torch.Tensor | None = None
        failed: dict[int, str] = {}
        try:
            for positions in batches:
                t0 = time.perf_counter()
                why = ctx.data.decode_pending([ctx.train_idx[p] for p in positions])
                failed.update({p: why[ctx.train_idx[p]] for p in positions if ctx.train_idx[p] in why})
                kept = [p for p in positions if p not in failed]
                if kept:
                    out = self.streaming = self._pass(images_of(kept), torch.as_tensor(kept), out, n, path,
                                                      f"training view {view + 1}")
                self.pass_seconds += time.perf_counter() - t0
                self.pass_images += len(positions)
                yield kept
            if failed:
                if out is not None:
                    out = out[torch.as_tensor([p for p in range(n) if p not in failed])]  # a copy without them
                self._discard_partial()
                drop(failed)  # ctx.train_idx without them: the view's key and rows agree again
                path = self.entry_path("train", view, False)
            if out is None:  # every image failed: as prepare_data says when it decodes them first
                raise DatasetError("no image of the train split could be decoded")
            self._cache[("train", view, False)] = out
            if path is not None:
                self._keep(out, path)
        finally:
            self.streaming = None
            self._discard_partial()

    @torch.inference_mode()
    def _pass(self, images: torch.Tensor, rows, out: torch.Tensor | None, n: int, path: Path | None,
              what: str) -> torch.Tensor:
        """Run the frozen bottom on one batch of uint8 images and put its activations in `out` at
        `rows`; `out` (None before the first batch) is allocated for the split's `n` images then.
        Returns `out`."""
        ctx = self.ctx
        self.bottom.eval()
        x = normalize_batch(images, ctx.mean, ctx.std, ctx.config.channels_last)
        with ctx.autocast():
            y = self.bottom(x).to(FEATURE_DTYPE).cpu()
        self._check_finite(y, what)
        if out is None:
            out = self._allocate((n, *y.shape[1:]), path)
        out[rows] = y
        return out

    def _check_finite(self, y: torch.Tensor, what: str) -> None:
        if not torch.isfinite(y).all():
            raise RuntimeError(f"the frozen layers' output for {what} does not fit {FEATURE_DTYPE} (values "
                               "beyond its range or not numbers); train all layers or another backbone")

    @torch.inference_mode()
    def _compute(self, split: str, view: int, flip: bool) -> torch.Tensor:
        ctx = self.ctx
        n, images_of = self._images(split, view, flip)
        what = {"train": f"training view {view + 1}", "val": "validation images", "test": "test images"}[split]
        what += " (mirrored)" if flip else ""
        out: torch.Tensor | None = None
        path = self.entry_path(split, view, flip)
        t0 = time.perf_counter()
        batch = self.pass_batch()
        try:
            for start in range(0, n, batch):
                left = f", about {pass_time_left(time.perf_counter() - t0, start, n)} left" if start else ""
                self.reporter.prepare(f"computing the frozen layers' output for {what} ({start}/{n}{left})",
                                      ctx.progress())
                idx = list(range(start, min(n, start + batch)))
                out = self._pass(images_of(idx), slice(start, start + len(idx)), out, n, path, what)
            assert out is not None
            if path is not None:
                self._keep(out, path)
        finally:
            self._discard_partial()
        if split == "train":  # the frozen layers' work counts as training time in images/s
            ctx.train_seconds += time.perf_counter() - t0
        self.pass_seconds += time.perf_counter() - t0
        self.pass_images += n
        return out

    def pass_batch(self) -> int:
        """Images per batch of the frozen layers' pass: the evaluation batch, at most CPU_PASS_BATCH on
        a CPU (the intermediate activations of 256 images at 260 px took gigabytes at the peak)."""
        batch = self.ctx.config.eval_batch_size
        return min(batch, CPU_PASS_BATCH) if self.ctx.device.type == "cpu" else batch

    def _held(self) -> int:
        """Bytes of activations this cache holds (memory-mapped ones included: an upper bound)."""
        return sum(t.numel() * t.element_size() for t in self._cache.values() if t is not None)

    def _allocate(self, shape: tuple, path: Path | None) -> torch.Tensor:
        """Memory for one (split, view): in RAM within the budget, else a memory-mapped file (the
        entry's own file, written in place, when there is a cache folder; an unlinked temporary
        file otherwise, which leaves nothing behind even if the process is killed)."""
        itemsize = torch.empty((), dtype=FEATURE_DTYPE).element_size()
        dtype = np.float16 if itemsize == 2 else np.float32
        if itemsize * int(np.prod(shape)) + self._held() <= memory_budget():
            return torch.empty(shape, dtype=FEATURE_DTYPE)
        folder = path.parent if path is not None else Path(self.ctx.cache_dir or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".tuneboard-activations-", suffix=".npy")
        os.close(fd)
        if path is None:
            try:
                array = np.memmap(name, dtype=dtype, mode="w+", shape=shape)
            finally:
                os.unlink(name)
            return torch.from_numpy(array)
        self._partial = (name, np.lib.format.open_memmap(name, mode="w+", dtype=dtype, shape=shape))
        return torch.from_numpy(self._partial[1])

    def _keep(self, out: torch.Tensor, path: Path) -> None:
        """Put a finished (split, view) in its file for later runs, then keep the cache folder
        within its budget (this run's entries last)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if self._partial is not None:  # written in place: flush and rename
                name, array = self._partial
                array.flush()
                os.replace(name, path)
                self._partial = None
            else:
                fd, name = tempfile.mkstemp(dir=path.parent, prefix=".tuneboard-activations-", suffix=".npy")
                os.close(fd)
                try:
                    np.save(name, out.numpy())
                    os.replace(name, path)
                finally:
                    if os.path.exists(name):
                        os.unlink(name)
        except OSError:
            return  # a store that cannot be written only costs time on the next run
        self.used_files.append(path)
        evict(path.parent.parent, keep=itertools.chain(self.used_files, self.ctx.data.entry_paths()))

    def _discard_partial(self) -> None:
        """A pass that did not finish (a stop, an error) leaves no file behind."""
        if self._partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._partial[0])
            self._partial = None

    def close(self) -> None:
        if not self._shared:
            self._cache.clear()


def fold_batchnorm(bottom: nn.Module, check_size: int = 64) -> nn.Module:
    """A copy of the frozen bottom for its pass, each BatchNorm folded into the convolution just
    before it (an eval-mode BatchNorm is a per-channel scale and shift, which the convolution's
    weights and bias can hold). Profiling the fast preset's first epoch on 1,000 images showed the
    BatchNorm layers (with their activations) as a third of the frozen pass, and the pass as three
    quarters of the time to the first step; folded, the pass takes about a third less CPU time.

    Pairs are found as a module's consecutive children (a Conv2d, then a BatchNorm2d of as many
    channels: how timm and torchvision declare them, in their forward order), and the folded copy is
    checked against the original on a random batch in float32: a network whose children are not in
    forward order, or one this does not fold exactly, keeps its original bottom."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = _copy_of_what_runs(bottom).eval()
    if not _fold_children(folded, fuse_conv_bn_eval):
        return bottom
    try:
        parameter = next(bottom.parameters())
    except StopIteration:
        return bottom
    x = torch.randn(2, 3, check_size, check_size, generator=torch.Generator().manual_seed(0)).to(parameter.device)
    modes = [(module, module.training) for module in bottom.modules()]  # each its own: they are the model's
    bottom.eval()
    try:
        with torch.inference_mode():
            expected, got = bottom(x).float(), folded(x).float()
    except Exception:  # noqa: BLE001 - whatever stops the check (a stop request included) keeps the original
        return bottom
    finally:
        for module, training in modes:
            module.training = training
    tolerance = 1e-3 * expected.abs().max().item()
    if expected.shape != got.shape or not torch.allclose(got, expected, rtol=1e-3, atol=tolerance):
        return bottom
    return folded


def _copy_of_what_runs(bottom: nn.Module) -> nn.Module:
    """A deep copy of `bottom` to fold. split_model's traced bottom holds the whole model,
    unregistered, to call its forward: the parameters and buffers of that model outside the
    bottom (the top's, which the bottom's forward never reaches) are shared, not copied, so the
    copy costs the bottom's weights only, not a second model (on the GPU too)."""
    runs = {id(t) for t in itertools.chain(bottom.parameters(), bottom.buffers())}
    held = [value for value in vars(bottom).values() if isinstance(value, nn.Module)]  # unregistered modules
    memo = {id(t): t for module in held for t in itertools.chain(module.parameters(), module.buffers())
            if id(t) not in runs}
    return copy.deepcopy(bottom, memo)


def _fold_children(module: nn.Module, fuse) -> int:
    """Fold every (Conv2d, BatchNorm2d) pair of consecutive children in place, at every depth; a
    BatchNorm followed by an activation (timm's BatchNormAct2d) keeps its activation. Returns the
    number of pairs folded."""
    folded = 0
    names = list(module._modules)
    for conv_name, norm_name in zip(names, names[1:]):
        conv, norm = module._modules[conv_name], module._modules[norm_name]
        if (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None
                and norm.num_features == conv.out_channels):
            module._modules[conv_name] = fuse(conv, norm)
            after = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
            module._modules[norm_name] = nn.Sequential(*after) if after else nn.Identity()
            folded += 1
    for child in module._modules.values():
        if child is not None:
            folded += _fold_children(child, fuse)
    return folded


# Settings that change what the trainable top does but not what the frozen bottom outputs: runs
# that differ only in these (a sweep's cells) can share the bottom's cached outputs. `processes`:
# every process computes the whole split the same way, and a run stores it resolved (auto -> 1)
# while the LR finder keeps auto, so keying on it made the run after the finder compute again.
# `layer_decay` scales the learning rates of the layers that train (the optimiser's groups) only.
TOP_ONLY_SETTINGS = ("lr", "head_lr_mult", "layer_decay", "name", "group", "preset", "processes")


def weights_fingerprint(module: nn.Module) -> str:
    """A sha1 of a module's weights and buffers (names, dtypes, shapes, values): two modules with
    the same fingerprint compute the same outputs from the same inputs."""
    h = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def shared_features_key(config: TrainConfig, stages: str) -> str:
    """Which cached outputs of the frozen part a run can reuse: every setting but TOP_ONLY_SETTINGS,
    and the split point."""
    values = {k: v for k, v in config.to_dict().items() if k not in TOP_ONLY_SETTINGS}
    return json.dumps({"settings": values, "stages": stages}, sort_keys=True, default=str)
