"""Decode each image once, then build batches from uint8 tensors.

The book's loop opens, decodes and resizes every JPEG with PIL on every epoch. Here every image
is decoded once into the form training needs, and that form is kept in the decode cache (one
compressed entry per image, keyed by the file's contents, the kind and the size: adding ten photos
to a cached set decodes ten images, and a renamed or moved folder still hits the cache). Nothing
holds the whole set in memory: a batch reads its images from their entries (a small JPEG or WebP
decode each). The cache is bounded by a size budget with least-recently-used eviction
(cachestore.py); an entry evicted meanwhile is made again from its photo, to the same pixels.

- test images exactly as the book's test transform leaves them before ToTensor:
  Resize([R, R]) then CenterCrop(S) with PIL (R = 256 for S = 224), stored losslessly (WebP), so
  evaluation sees the pixels prediction sees;
- training images squeezed to a T x T square (T = up to 2 S, never above the images' own size)
  together with their original width and height, stored as JPEG at quality TRAIN_QUALITY (about
  the photo's own size; the random crops are resized anyway). Every read goes through the stored
  form, so a cold and a warm cache give the same pixels. The book's RandomResizedCrop + flip then
  run per batch: the crop box is drawn in the original image's coordinates with the same algorithm
  and mapped onto the square, so the geometry is the book's; on a GPU the crops of a whole batch
  are cut and resized at once with roi_align.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import random
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from .cachestore import DiskStore, MemoryStore, check_not_a_data_folder, default_cache_dir, evict
from .data import WARNING, ImageRecord, Problem, ScanReport, load_rgb, resize_size_for, to_rgb

CACHE_FORMAT = "tuneboard-decoded-4"  # 4: one compressed entry per image
TRAIN_QUALITY = 90  # JPEG quality of the stored training squares (95 made them larger than the photos)
PROGRESS_EVERY = 8  # images decoded between progress calls (each checks for a stop)
READ_WORKERS = min(4, os.cpu_count() or 1)  # threads reading a batch's entries (decoding releases the GIL)


@dataclass
class PreparedData:
    classes: list[str]
    image_size: int
    resize: int
    train_side: int
    train_images: DecodedImages       # N x 3 x T x T uint8, read from the decode cache
    train_sizes: np.ndarray           # N x 2 (width, height) of the decoded originals
    train_labels: torch.Tensor        # N int64
    train_paths: list[str]
    train_sha1: list[str]             # each training file's content hash (the scan's): copies share one
    test_images: DecodedImages        # M x 3 x S x S uint8
    test_labels: torch.Tensor
    test_paths: list[str]
    skipped: list[Problem] = field(default_factory=list)
    device_train_images: torch.Tensor | None = None  # a copy on the GPU when it fits
    pending: set[int] = field(default_factory=set)  # training rows not decoded yet (lazy: see prepare_data)
    test_pending: bool = False  # the test split is decoded when first evaluated (decode_test_split)

    def decode_pending(self, rows: list[int]) -> dict[int, str]:
        """Decode those of `rows` not decoded yet (a streamed first epoch: a batch at a time, on the
        reading threads), reading each one's original size. Returns {row: why it failed} for the
        files that cannot be decoded (their failed entries say so to later runs)."""
        todo = [row for row in rows if row in self.pending]
        failed = {}
        for row, (original, error) in zip(todo, readers().map(self.train_images.entry_header, todo)):
            self.pending.discard(row)
            if error:
                failed[row] = error
            else:
                self.train_sizes[row] = original
        return failed

    def decode_test_split(self, progress: Callable[[int, int], None] | None = None,
                          batch: int = 64) -> list[Problem]:
        """Decode the test images not decoded yet (a lazy test split: at its first evaluation, the
        first epoch's end), a batch at a time on the reading threads; `progress(done, total)` after
        each batch (it may raise: a stop). The files that fail are taken out of the test split
        (images, labels and paths agree again) and returned, also added to `skipped`."""
        if not self.test_pending:
            return []
        n, failed = len(self.test_images), {}
        for start in range(0, n, batch):
            rows = range(start, min(n, start + batch))
            for row, (_, error) in zip(rows, readers().map(self.test_images.entry_header, rows)):
                if error:
                    failed[row] = Problem(self.test_paths[row], error, WARNING)
            if progress:
                progress(rows[-1] + 1, n)
        self.test_pending = False
        if failed:
            kept = [row for row in range(n) if row not in failed]
            if not kept:
                from .data import DatasetError

                raise DatasetError("no image of the test split could be decoded")
            images = self.test_images
            self.test_images = DecodedImages(images.store, images.kind, images.size, [images.keys[i] for i in kept],
                                             [images.paths[i] for i in kept], images.image_shape)
            self.test_labels = self.test_labels[torch.as_tensor(kept)]
            self.test_paths = [self.test_paths[i] for i in kept]
            self.skipped.extend(failed.values())
        return list(failed.values())

    def entry_paths(self) -> Iterator:
        """Where this set's decode-cache entries are (kept over others' when the cache is evicted)."""
        images = [self.train_images, self.test_images]
        return (d.store.path(k) for d in images for k in d.keys)  # a generator: evict reads it only when over budget


def _open_scaled(path: str, target: int) -> Image.Image:
    """Decode, letting JPEG decode at a reduced scale when the file is over twice the target
    (training images only: their random crops are resized anyway)."""
    with Image.open(path) as img:
        if img.format == "JPEG" and min(img.size) > 2 * target:
            img.draft("RGB", (2 * target, 2 * target))
        img.load()
        return to_rgb(img).copy()


def decode_train(path: str, side: int) -> tuple[np.ndarray, tuple[int, int]]:
    img = _open_scaled(path, side)
    size = img.size
    arr = np.asarray(img.resize((side, side), Image.BILINEAR), dtype=np.uint8)
    return arr.transpose(2, 0, 1), size


def test_view(img: Image.Image, image_size: int) -> np.ndarray:
    """The book's test transform up to ToTensor, in PIL: Resize([R, R]) then CenterCrop(S), as
    uint8 3 x S x S. Evaluation and prediction both go through here."""
    from torchvision.transforms import functional as TF

    resize = resize_size_for(image_size)
    img = TF.center_crop(img.resize((resize, resize), Image.BILINEAR), [image_size, image_size])
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def decode_test(path: str, image_size: int) -> np.ndarray:
    return test_view(load_rgb(path), image_size)


def choose_train_side(records: list[ImageRecord], image_size: int) -> int:
    """Up to twice the crop size (room for the small crops of RandomResizedCrop), but never above
    what most images hold (upscaling stores nothing new)."""
    if not records:
        return image_size
    short = np.percentile([min(r.width, r.height) for r in records], 90)
    return int(min(2 * image_size, max(image_size, short)))


# --------------------------------------------------------------------------------------------
# The decode cache's entries: b"I" + (width, height) + the encoded image, or b"F" + why it failed

HEADER = struct.Struct("<cII")


def entry_key(record: ImageRecord, kind: str, *sizes: int) -> str:
    """One image's entry: its contents (not its path), what it was decoded for, and the format."""
    return hashlib.sha1(f"{CACHE_FORMAT}|{kind}|{sizes}|{record.sha1}".encode()).hexdigest()


def encode_entry(image: np.ndarray, size: tuple[int, int] | None, lossless: bool) -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    if lossless:
        picture.save(buffer, "WEBP", lossless=True, method=0)
    else:
        picture.save(buffer, "JPEG", quality=TRAIN_QUALITY)
    width, height = size or (0, 0)
    return HEADER.pack(b"I", width, height) + buffer.getvalue()


def failed_entry(error: str) -> bytes:
    return HEADER.pack(b"F", 0, 0) + error.encode()


def entry_pixels(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob[HEADER.size:])) as picture:
        return np.array(picture.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)  # writable, for torch


def make_entry(kind: str, path: str, size: int) -> bytes:
    """Decode one photo for `kind` ("train": the T x T square, "test": the test view) into its
    entry; a file that fails gives a failed entry that says why."""
    try:
        if kind == "train":
            image, original = decode_train(path, size)
        else:
            image, original = decode_test(path, size), None
    except Exception as exc:  # noqa: BLE001 - a file that fails now is skipped and reported
        return failed_entry(f"failed to decode ({type(exc).__name__}: {exc}), skipped")
    return encode_entry(image, original, lossless=kind == "test")


def read_entry_header(store, key: str, kind: str, path: str, size: int, decode_missing: bool = True
                      ) -> tuple[tuple[int, int] | None, str]:
    """(original width and height, "") of one photo's entry, making the entry from the photo if
    it is missing; (None, why) for a file that failed to decode; (None, "") for an entry that
    holds no original size (the test view's) or, with `decode_missing` False, one not made yet."""
    head = store.get(key, HEADER.size)
    if head is None or len(head) < HEADER.size:
        if not decode_missing:
            return None, ""
        head = make_entry(kind, path, size)
        store.put(key, head)
    tag, width, height = HEADER.unpack(head[:HEADER.size])
    if tag != b"I":
        if len(head) <= HEADER.size:  # only the header was read: the reason follows it
            head = store.get(key) or failed_entry("failed to decode, skipped")
        return None, head[HEADER.size:].decode(errors="replace")
    return ((width, height) if width else None), ""


_readers: ThreadPoolExecutor | None = None


def readers() -> ThreadPoolExecutor:
    global _readers
    if _readers is None:
        _readers = ThreadPoolExecutor(max_workers=READ_WORKERS, thread_name_prefix="tuneboard-read")
    return _readers


class DecodedImages:
    """The decoded images of one split as a sequence of uint8 3 x H x W tensors, read from their
    cache entries when asked for: memory holds a batch, never the set. An entry evicted since is
    made again from its photo (the same pixels)."""

    def __init__(self, store, kind: str, size: int, keys: list[str], paths: list[str], shape: tuple):
        self.store, self.kind, self.size = store, kind, size
        self.keys, self.paths, self.image_shape = keys, paths, tuple(shape)
        self.dtype = torch.uint8

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def shape(self) -> tuple:
        return (len(self.keys), *self.image_shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def entry_header(self, i: int) -> tuple[tuple[int, int] | None, str]:
        """(original width and height, "") of image i, making its entry if missing, or (None, why
        it failed)."""
        return read_entry_header(self.store, self.keys[i], self.kind, self.paths[i], self.size)

    def image(self, i: int) -> np.ndarray:
        blob = self.store.get(self.keys[i])
        if blob is None:
            blob = make_entry(self.kind, self.paths[i], self.size)
            self.store.put(self.keys[i], blob)
        if blob[:1] != b"I":
            raise OSError(f"{self.paths[i]}: {blob[HEADER.size:].decode(errors='replace')}")
        return entry_pixels(blob)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return torch.from_numpy(self.image(int(index)))
        rows = range(len(self))[index] if isinstance(index, slice) else np.asarray(index).reshape(-1).tolist()
        if not len(rows):
            return torch.empty((0, *self.image_shape), dtype=torch.uint8)
        return torch.from_numpy(np.stack(list(readers().map(self.image, rows))))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole split at once (small sets and tests only)."""
        array = self[:].numpy()
        return array if dtype is None else array.astype(dtype)

    def to_device(self, device: torch.device, chunk: int = 256) -> torch.Tensor:
        """The whole split on `device`, uploaded a chunk at a time."""
        out = torch.empty(self.shape, dtype=torch.uint8, device=device)
        for start in range(0, len(self), chunk):
            out[start:start + chunk] = self[start:start + chunk].to(device)
        return out


def index_entries(records: list[ImageRecord], kind: str, size: int, store,
                  progress: Callable[[int, int], None] | None, decode_missing: bool = True
                  ) -> tuple[list[int], list[str], list[tuple | None], list[Problem]]:
    """Make sure every record has its entry (decoding only those missing) and read their
    headers. Returns (the positions in `records` of the images that decoded, their keys, their
    original sizes, the files that failed, named by their paths in `records`). With
    `decode_missing` False, a record without an entry is listed with the size None (decoded later):
    only the entries the store lists are opened (a cold cache opens none)."""
    n = len(records)
    sizes = (size,) if kind == "train" else (size, resize_size_for(size))
    keys = [entry_key(r, kind, *sizes) for r in records]
    present = None if decode_missing else store.keys()

    def work(i):
        return i, *read_entry_header(store, keys[i], kind, records[i].path, size, decode_missing)

    def results():
        """work(i) for every i in order, the entries not listed answered without opening them."""
        if present is None:
            yield from pool.map(work, range(n))
            return
        listed = pool.map(work, [i for i in range(n) if keys[i] in present])
        for i in range(n):  # not decoded yet (one made meanwhile is read when its batch comes)
            yield next(listed) if keys[i] in present else (i, None, "")

    rows, row_sizes, skipped = [], [], []
    done = 0
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for i, original, error in results():
            if error:
                skipped.append(Problem(records[i].path, error, WARNING))
            else:
                rows.append(i)
                row_sizes.append(original)
            done += 1
            if progress and (done % PROGRESS_EVERY == 0 or done == n):
                progress(done, n)  # may raise (a stop request): the images not started yet are dropped
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # only the few being decoded finish
        raise
    pool.shutdown()
    return rows, [keys[i] for i in rows], row_sizes, skipped


def prepare_data(report: ScanReport, image_size: int, cache_dir: str | os.PathLike | None = None,
                 device: torch.device | None = None,
                 progress: Callable[[int, int], None] | None = None, lazy_train: bool = False,
                 lazy_test: bool = False) -> PreparedData:
    """Decode the scanned train and test images into the decode cache (those not there yet),
    then keep the cache within its budget. cache_dir: None for the default cache folder, "" to
    keep the entries in memory only. `lazy_train`: training images not in the cache yet are left
    for the first epoch to decode as it streams them (PreparedData.pending, decode_pending);
    `lazy_test`: the test images are left for their first evaluation (decode_test_split), so
    that a large test split does not delay the first step. In both, the files already known to
    fail (their entries say so) are skipped now, as the others are when their turn comes."""
    folder = default_cache_dir() if cache_dir is None else (Path(cache_dir) if cache_dir else None)
    if folder:
        check_not_a_data_folder(folder)  # refused before any work, not at the first eviction
    store = DiskStore(folder / "images") if folder else MemoryStore()
    train_records, test_records = report.samples["train"], report.samples["test"]
    resize = resize_size_for(image_size)
    side = choose_train_side(train_records, image_size)
    total = len(train_records) + len(test_records)

    def train_progress(done, n):
        if progress:
            progress(done, total)

    def test_progress(done, n):
        if progress:
            progress(len(train_records) + done, total)

    train_rows, train_keys, train_sizes, skipped_train = index_entries(train_records, "train", side, store,
                                                                       train_progress, decode_missing=not lazy_train)
    pending = {row for row, original in enumerate(train_sizes) if original is None}
    train_sizes = [(1, 1) if original is None else original for original in train_sizes]  # read when decoded
    test_rows, test_keys, _, skipped_test = index_entries(test_records, "test", image_size, store, test_progress,
                                                          decode_missing=not lazy_test)
    if folder is not None:
        evict(folder, keep=(store.path(k) for k in train_keys + test_keys))
    skipped = skipped_train + skipped_test
    train_ok = [train_records[i] for i in train_rows]  # each row's own record: images and labels agree
    test_ok = [test_records[i] for i in test_rows]
    if not train_ok or not test_ok:
        from .data import DatasetError

        raise DatasetError("no image of the " + ("train" if not train_ok else "test") + " split could be decoded")
    data = PreparedData(
        classes=report.classes, image_size=image_size, resize=resize, train_side=side,
        train_images=DecodedImages(store, "train", side, train_keys, [r.path for r in train_ok], (3, side, side)),
        train_sizes=np.asarray(train_sizes, dtype=np.int64).reshape(-1, 2),
        train_labels=torch.tensor([r.label for r in train_ok], dtype=torch.int64),
        train_paths=[r.path for r in train_ok], train_sha1=[r.sha1 for r in train_ok],
        test_images=DecodedImages(store, "test", image_size, test_keys, [r.path for r in test_ok],
                                  (3, image_size, image_size)),
        test_labels=torch.tensor([r.label for r in test_ok], dtype=torch.int64),
        test_paths=[r.path for r in test_ok], skipped=skipped, pending=pending, test_pending=lazy_test)
    if device is not None and device.type == "cuda" and not pending:
        free, _ = torch.cuda.mem_get_info(device)
        if data.train_images.nbytes < free // 4:
            data.device_train_images = data.train_images.to_device(device)
    return data


# --------------------------------------------------------------------------------------------
# Batches


def sample_resized_crop(rng: random.Random, width: int, height: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop, drawn as torchvision's RandomResizedCrop does."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_batch(data: PreparedData, idx: list[int], image_size: int, rng: random.Random,
                  device: torch.device, crop_scale: float = 0.08) -> torch.Tensor:
    """The book's RandomResizedCrop(S, scale=(crop_scale, 1)) + RandomHorizontalFlip on a batch:
    uint8 B x 3 x S x S."""
    return cut_crops(data, idx, draw_crops(data, idx, rng, crop_scale), image_size, device)


def draw_crops(data: PreparedData, idx: list[int], rng: random.Random, crop_scale: float = 0.08
               ) -> list[tuple[tuple, bool]]:
    """Each image's random crop box (in its stored square's coordinates) and flip, drawn in the
    order of `idx` as the book's transforms draw them: a view drawn for all its images at once
    gets the same crops whatever order its batches are then cut in."""
    side, crops = data.train_side, []
    for i in idx:
        w, h = (int(v) for v in data.train_sizes[i])
        top, left, ch, cw = sample_resized_crop(rng, w, h, scale=(crop_scale, 1.0))
        sx, sy = side / w, side / h
        crops.append(((left * sx, top * sy, (left + cw) * sx, (top + ch) * sy), rng.random() < 0.5))
    return crops


def cut_crops(data: PreparedData, idx: list[int], crops: list[tuple[tuple, bool]], image_size: int,
              device: torch.device) -> torch.Tensor:
    """Cut, resize and flip each image's drawn crop (draw_crops): uint8 B x 3 x S x S."""
    boxes, flips = [box for box, _ in crops], [flip for _, flip in crops]
    if device.type == "cuda":
        src = data.device_train_images
        if src is not None:
            batch = src[torch.as_tensor(idx, device=device)]
        else:
            batch = data.train_images[idx].pin_memory().to(device, non_blocking=True)
        out = crops_batched(batch, boxes, image_size)
    else:
        out = crops_per_image(list(readers().map(data.train_images.image, idx)), boxes, image_size)
    flip = torch.tensor(flips, device=out.device)
    if flip.any():
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


def crops_batched(batch_u8: torch.Tensor, boxes: list[tuple], image_size: int) -> torch.Tensor:
    """Cut and resize every box of a batch at once (roi_align: bilinear, averaging over each output
    pixel's footprint when shrinking). The GPU path: one kernel for the whole batch."""
    from torchvision.ops import roi_align

    rois = torch.tensor([(k, *b) for k, b in enumerate(boxes)], dtype=torch.float32, device=batch_u8.device)
    out = roi_align(batch_u8.float(), rois, (image_size, image_size), 1.0, -1, aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def crops_per_image(images: list[np.ndarray], boxes: list[tuple], image_size: int) -> torch.Tensor:
    """The CPU path: slice each crop out of its uint8 image and resize only that (antialiased)."""
    from torchvision.transforms.v2 import functional as F2

    crops = []
    for image, (x0, y0, x1, y1) in zip(images, boxes):
        side_h, side_w = image.shape[1:]
        top, left = int(round(y0)), int(round(x0))
        h = max(1, min(side_h - top, int(round(y1 - y0))))
        w = max(1, min(side_w - left, int(round(x1 - x0))))
        crops.append(F2.resized_crop(torch.from_numpy(image), top, left, h, w, [image_size, image_size],
                                     antialias=True))
    return torch.stack(crops)


def center_view_batch(data: PreparedData, idx: list[int], image_size: int, device: torch.device) -> torch.Tensor:
    """Training images seen as the test transform sees them (Resize([R, R]) + CenterCrop(S))."""
    from torchvision.transforms.v2 import functional as F2

    src = data.train_images[idx].to(device)
    resized = F2.resize(src, [data.resize, data.resize], antialias=True)
    return F2.center_crop(resized, [image_size, image_size])


def normalize_batch(images_u8: torch.Tensor, mean, std, channels_last: bool = True) -> torch.Tensor:
    """uint8 B x 3 x H x W -> float, scaled to [0, 1] and normalised (ToTensor + Normalize)."""
    x = images_u8.float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = x.sub_(m).div_(s)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class ValidationSplit:
    """Which training images train and which are held out for validation, and what the split did
    with exact copies (files with the same bytes): each set of copies in one class lands whole on
    one side; a validation image that is also filed under another class in training is moved to
    training, so that no validation image is a training image."""
    train: list[int]                       # indices into data.train_*
    val: list[int]
    copy_sets: int = 0                     # sets of two or more identical files in one class
    copy_images: int = 0                   # the images in those sets
    copy_sets_in_validation: int = 0       # the sets held out whole (the others train whole)
    moved_to_training: list[str] = field(default_factory=list)  # paths of cross-class copies
    held_out: str = ""                     # sha1 of the held-out files' content hashes: which images validate

    def record(self) -> dict:
        """The field of config.json's "dataset" that says how copies were split."""
        return {"split_by": "file content", "copy_sets": self.copy_sets, "copy_images": self.copy_images,
                "copy_sets_in_validation": self.copy_sets_in_validation,
                "moved_to_training": self.moved_to_training, "held_out": self.held_out}

    def describe(self) -> str:
        """One log line; empty when the training images hold no copies."""
        if not self.copy_sets and not self.moved_to_training:
            return ""
        parts = []
        if self.copy_sets:
            parts.append(f"{self.copy_images} images are exact copies ({self.copy_sets} set{'s' * (self.copy_sets != 1)} of "
                         "identical files); "
                         f"each set kept on one side ({self.copy_sets_in_validation} in validation, "
                         f"{self.copy_sets - self.copy_sets_in_validation} in training)")
        if self.moved_to_training:
            parts.append(f"{len(self.moved_to_training)} moved to training as copies of a training image of "
                         f"another class: " + ", ".join(self.moved_to_training))
        return "validation split by content: " + "; ".join(parts)


def validation_split(data: PreparedData, fraction: float) -> ValidationSplit:
    """`fraction` of each class's training images held out for validation, the same files every
    time. Split by content, not by path: each class's distinct files are ordered by the hash of
    their bytes, so exact copies share a place in the order and fall on the same side (a
    path-ordered split put copies of one photo on both sides, and validation then scored
    training images). fraction 0: everything trains."""
    n = len(data.train_labels)
    if not fraction:
        return ValidationSplit(train=list(range(n)), val=[])
    copies: dict[int, dict[str, list[int]]] = {}  # class -> content hash -> indices
    for i, label in enumerate(data.train_labels.tolist()):
        copies.setdefault(label, {}).setdefault(data.train_sha1[i], []).append(i)
    split = ValidationSplit(train=[], val=[])
    for groups in copies.values():
        held = _held_out_groups(groups, fraction)
        for sha1, indices in groups.items():
            if len(indices) > 1:
                split.copy_sets += 1
                split.copy_images += len(indices)
                split.copy_sets_in_validation += sha1 in held
            split.val.extend(indices if sha1 in held else [])
    training_content = {data.train_sha1[i] for i in set(range(n)) - set(split.val)}
    moved = [i for i in split.val if data.train_sha1[i] in training_content]
    split.moved_to_training = sorted(data.train_paths[i] for i in moved)
    held = set(split.val) - set(moved)
    split.val = sorted(held)
    split.held_out = hashlib.sha1("".join(sorted(data.train_sha1[i] for i in split.val)).encode()).hexdigest()
    split.train = [i for i in range(n) if i not in held]
    return split


def _held_out_groups(groups: dict[str, list[int]], fraction: float) -> set[str]:
    """The content hashes of one class held out: sets of copies in the order of their hash, each
    taken whole while the class's share is not exceeded (at least one set, and never all)."""
    n = sum(len(indices) for indices in groups.values())
    if len(groups) < 2:
        return set()
    target = min(max(1, int(round(n * fraction))), n - 1)
    ordered = sorted(groups, key=lambda sha1: hashlib.sha1(f"validation|{sha1}".encode()).hexdigest())
    held, taken = set(), 0
    for sha1 in ordered[:-1]:
        if taken + len(groups[sha1]) <= target:
            held.add(sha1)
            taken += len(groups[sha1])
    return held or {ordered[0]}
