"""Datasets: find the layout of an image folder, scan it for problems, load images, transforms.

A dataset is a folder of class folders, with or without train/test splits:

    root/train/<class>/*, root/test/<class>/*     (test may be called val, valid, validation)
    root/<class>/*                                 (a stratified split is made for the user)

either of them possibly one folder down (what unzipping an archive usually leaves).

`scan_dataset` reads every file once and returns a `ScanReport`: the classes, the usable files
of each split, and every problem with its path and severity. With a cache folder (`scan_cache`),
each file's result is remembered by its path, size, times and inode (ScanMemo), so scanning a
folder again (the Train page, then the run; the next run) reads only the changed files. Errors make the dataset unusable;
warnings name files that will be skipped or things the user should know. Training only ever
uses the files the scan accepted, and an image that still fails to load later is skipped and
reported (prepare.py), never silently.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .fixes import FIXES_FILE


def _readable_image_extensions() -> frozenset[str]:
    """Every file extension of a format Pillow can open and decode by itself (lower case, with the
    dot). Leaves out the formats it can only write (.pdf) and its stubs that need an outside
    handler to decode (.h5, .grib, .bufr, .wmf): a file with any other extension is named by the
    scan as "not an image file"."""

    def decodes(fmt: str) -> bool:
        factory = Image.OPEN.get(fmt, (None,))[0]
        return factory is not None and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))

    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if decodes(fmt))


IMAGE_EXTENSIONS = _readable_image_extensions()
TEST_SPLIT_NAMES = ("test", "val", "valid", "validation")
TRAIN_SPLIT_NAMES = ("train", "training")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ERROR, WARNING, INFO = "error", "warning", "info"

# Thresholds for the dataset-level warnings; they are parameters of scan_dataset too.
MIN_IMAGE_SIDE = 16        # pixels: smaller images carry too little to learn from
FEW_IMAGES_PER_CLASS = 10  # a class with fewer training images than this gets a warning
IMBALANCE_RATIO = 5.0      # largest class / smallest class in a split


class DatasetError(ValueError):
    """The path cannot be used as a dataset at all (missing, not a folder, no usable images)."""


class SeveralDatasets(DatasetError):
    """The folder holds several datasets one folder down: which one is the user's to say.
    `candidates` are their folders, in name order."""

    def __init__(self, path: Path, candidates: list[Path]):
        self.path, self.candidates = path, candidates
        super().__init__(f"{path} holds {len(candidates)} datasets: "
                         + ", ".join(c.name for c in candidates) + "; choose one of them rather than "
                         "the folder that holds them")


@dataclass
class Problem:
    path: str
    problem: str
    severity: str  # error | warning | info


@dataclass
class ImageRecord:
    path: str
    label: int
    width: int
    height: int
    sha1: str


@dataclass
class ScanReport:
    root: str
    layout: str  # "splits", "flat" (split made by Tuneboard); "" when none was found
    classes: list[str] = field(default_factory=list)
    samples: dict[str, list[ImageRecord]] = field(default_factory=dict)  # split -> records
    problems: list[Problem] = field(default_factory=list)
    test_split_name: str = "test"
    test_fraction: float | None = None
    seconds: float = 0.0
    exact_leaks: list[tuple[str, str]] = field(default_factory=list)  # (test copy left out, training image)
    fixes: object | None = None  # fixes.AppliedFixes: what the dataset's fixes file changed (None: no file)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def usable(self) -> bool:
        return not self.errors

    @property
    def splits(self) -> dict[str, dict[str, int]]:
        """{split: {class: number of usable images}}."""
        out = {}
        for split, records in self.samples.items():
            counts = Counter(r.label for r in records)
            out[split] = {c: counts.get(i, 0) for i, c in enumerate(self.classes)}
        return out

    def image_size_summary(self) -> dict[str, int]:
        widths = [r.width for recs in self.samples.values() for r in recs]
        heights = [r.height for recs in self.samples.values() for r in recs]
        if not widths:
            return {}
        return {
            "min_width": min(widths), "max_width": max(widths),
            "min_height": min(heights), "max_height": max(heights),
            "median_width": int(np.median(widths)), "median_height": int(np.median(heights)),
        }

    def reason(self) -> str:
        """One line saying why the dataset is unusable ('' when it is usable)."""
        errors = self.errors
        if not errors:
            return ""
        first = errors[0]
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        return f"{first.path}: {first.problem}{more}"

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "layout": self.layout,
            "classes": self.classes,
            "splits": self.splits,
            "test_split_name": self.test_split_name,
            "test_fraction": self.test_fraction,
            "image_sizes": self.image_size_summary(),
            "problems": [asdict(p) for p in self.problems],
            "usable": self.usable,
            "reason": self.reason(),
            "seconds": round(self.seconds, 3),
            "fixes": self.fixes.to_dict() if self.fixes is not None else None,
        }


# --------------------------------------------------------------------------------------------
# Reading images


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB: EXIF orientation applied, transparency composited
    on white, CMYK and 16/32-bit modes converted with the right scaling."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated GIF/WebP/TIFF: the first frame
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode == "I" and arr.max() <= 255:
            top = 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike, data: bytes | None = None) -> Image.Image:
    """Open one image file as RGB. Raises OSError/ValueError with the reason when it cannot."""
    source = io.BytesIO(data) if data is not None else path
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as img:
            img.load()
            return to_rgb(img).copy()


# --------------------------------------------------------------------------------------------
# Walking folders


def is_hidden(name: str) -> bool:
    """A file or folder name that is not data: hidden (a leading dot), macOS's resource forks in a
    zip, Windows' thumbnails and folder settings. One rule for the scan, the data-folder listings,
    an upload's summary and Predict's folder of photos."""
    return name.startswith(".") or name in ("__MACOSX", "Thumbs.db", "desktop.ini")


def images_under(folder: Path) -> Iterator[Path]:
    """Every file under `folder` (sub-folders included) with an image extension, hidden ones
    (is_hidden, at any depth) left out, in no particular order."""
    for p in folder.rglob("*"):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() \
                and not any(is_hidden(part) for part in p.relative_to(folder).parts):
            yield p


def _list_dir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


def _subdirs(path: Path) -> list[Path]:
    return [Path(e.path) for e in _list_dir(path) if e.is_dir() and not is_hidden(e.name)]


def _walk_files(folder: Path, problems: list[Problem]) -> list[Path]:
    """Every file below `folder` (following symlinks once; loops are reported, not followed).
    Hidden files and folders are reported and skipped."""
    files: list[Path] = []
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            st = current.stat()
        except OSError as exc:
            problems.append(Problem(str(current), f"cannot be read: {exc.strerror or exc}", WARNING))
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            problems.append(Problem(str(current), "symbolic link loop: folder already visited, skipped", WARNING))
            continue
        seen.add(key)
        for entry in reversed(_list_dir(current)):
            p = Path(entry.path)
            if is_hidden(entry.name):
                problems.append(Problem(str(p), "hidden file or folder, skipped", WARNING))
                continue
            try:
                is_dir = entry.is_dir()
                is_file = entry.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                stack.append(p)
            elif is_file:
                files.append(p)
            else:
                problems.append(Problem(str(p), "broken link or special file, skipped", WARNING))
    return sorted(files)


def _split_folders(root: Path) -> tuple[Path, Path, str] | None:
    """(train folder, test folder, test split name) when root holds train/test splits."""
    names = {p.name.lower(): p for p in _subdirs(root)}
    train = next((names[n] for n in TRAIN_SPLIT_NAMES if n in names), None)
    test_name = next((n for n in TEST_SPLIT_NAMES if n in names), None)
    if train is not None and test_name is not None:
        return train, names[test_name], names[test_name].name
    return None


def _looks_like_class_root(root: Path) -> bool:
    """At least one sub-folder directly holds an image file."""
    for sub in _subdirs(root):
        for e in _list_dir(sub):
            if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS:
                return True
    return False


def dataset_candidates(path: str | os.PathLike) -> list[tuple[Path, str]]:
    """The datasets one folder below `path`: (folder, layout "splits" or "flat") each, in name order."""
    found = []
    for sub in _subdirs(Path(path).expanduser()):
        if _split_folders(sub):
            found.append((sub, "splits"))
        elif _looks_like_class_root(sub):
            found.append((sub, "flat"))
    return found


def find_dataset_root(path: str | os.PathLike) -> tuple[Path, str]:
    """Locate the dataset inside `path`: (root, layout) with layout "splits" or "flat".
    Looks at `path` itself, then one folder down (an unzipped archive's wrapper folder), where it
    goes only when exactly one dataset is there: a folder holding several (a data root) raises
    SeveralDatasets naming them, rather than training on the first in name order."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such folder")
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder")
    if _split_folders(path):
        return path, "splits"
    candidates = dataset_candidates(path)
    if _looks_like_class_root(path) and not any(layout == "splits" for _, layout in candidates):
        return path, "flat"
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise SeveralDatasets(path, [folder for folder, _ in candidates])
    return path, ""


# --------------------------------------------------------------------------------------------
# Scanning


def _check_image(path: Path, min_side: int, max_pixels: int | None) -> tuple[ImageRecord | None, str, str]:
    """Read and fully decode one file. Returns (record, problem, severity)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}", WARNING
    if not data:
        return None, "empty file (0 bytes), skipped", WARNING
    sha1 = hashlib.sha1(data).hexdigest()
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if limit and width * height > limit:
                    return None, (f"decompression bomb: {width}x{height} = {width * height} pixels is over "
                                  f"the limit of {limit}, skipped"), WARNING
                if img.format == "JPEG":  # the smallest scale (1/8): every byte is still decoded, so a
                    img.draft("RGB", SCAN_DRAFT)  # truncated file fails as at full size; 10-40% less CPU
                img.load()
    except Image.DecompressionBombError as exc:
        return None, f"decompression bomb: {exc}, skipped", WARNING
    except Image.DecompressionBombWarning as exc:
        return None, f"decompression bomb: {exc}, skipped", WARNING
    except Image.UnidentifiedImageError:
        return None, "not an image Pillow can read (corrupt or another kind of file), skipped", WARNING
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        kind = "truncated" if "truncat" in text.lower() else "corrupt"
        return None, f"{kind} image ({text}), skipped", WARNING
    if min(width, height) < min_side:
        return None, f"too small to use: {width}x{height} px (under {min_side} px), skipped", WARNING
    return ImageRecord(str(path), -1, width, height, sha1), "", ""


SCAN_FORMAT = "tuneboard-scan-1"
SCAN_DRAFT = (1, 1)  # the scan's JPEG decode: at the smallest scale libjpeg offers (only the header's size is kept)
SCAN_WORKERS = min(4, os.cpu_count() or 1)  # threads checking files (reading, hashing and decoding release the GIL)


class ScanMemo:
    """Each file's scan result (_check_image) remembered between scans of one folder, in one entry
    of the cache folder (cachestore.SCANS) per dataset root and scan settings. A file is read again
    only when its size, modification or change time, or inode differ from when it was checked (a
    file rewritten in place, replaced or touched); the decode cache keys images by the content hash
    remembered here. Checking a 500 x 375 JPEG (read, hash, decode) costs milliseconds, its stat
    microseconds: a 50,000-photo folder scans again in seconds instead of minutes."""

    def __init__(self, cache_folder: str | os.PathLike | None, root: Path, min_side: int, limit: int | None):
        self.path = None
        if cache_folder and self._may_write_in(Path(cache_folder), root):
            from .cachestore import SCANS

            import PIL  # a Pillow upgrade may read what it could not (a result is Pillow's answer)

            settings = f"{SCAN_FORMAT}|{PIL.__version__}|{root.resolve()}|{min_side}|{limit}"
            key = hashlib.sha1(settings.encode()).hexdigest()
            self.path = Path(cache_folder) / SCANS / f"{key}.json"
        self.min_side, self.limit = min_side, limit
        self.known = self._load()
        self.seen: dict[str, list] = {}
        self.checked = 0  # files read this scan (not remembered, or changed)

    @staticmethod
    def _may_write_in(cache_folder: Path, root: Path) -> bool:
        """Not in a cache folder that is, holds or lies in the data folder or the folder scanned: the
        memo's file would be scanned as a file of the dataset (and a class folder named after it).
        Such a cache is refused by the run itself (cachestore.check_not_a_data_folder); the scan
        just goes without its memo."""
        from .cachestore import SCANS, check_not_a_data_folder

        memo, scanned = (cache_folder.expanduser() / SCANS).resolve(), root.resolve()
        if memo == scanned or scanned in memo.parents or memo in scanned.parents:
            return False
        try:
            check_not_a_data_folder(cache_folder)
        except ValueError:
            return False
        return True

    def _load(self) -> dict[str, list]:
        if self.path is None:
            return {}
        try:
            known = json.loads(self.path.read_text())
            os.utime(self.path)  # least recently used: a read is a use
        except (OSError, ValueError):
            return {}
        return known if isinstance(known, dict) else {}

    def check(self, path: Path) -> tuple[ImageRecord | None, str, str]:
        """_check_image's result for `path`, read from the memo when the file is unchanged."""
        try:
            st = os.stat(path)
            stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        except OSError:
            return _check_image(path, self.min_side, self.limit)
        name = str(path)
        hit = self.known.get(name)
        if isinstance(hit, list) and len(hit) == 5 and hit[0] == stamp:
            width, height, sha1, problem = hit[1:]
            self.seen[name] = hit
            if problem:
                return None, problem, WARNING
            return ImageRecord(name, -1, width, height, sha1), "", ""
        self.checked += 1
        record, problem, severity = _check_image(path, self.min_side, self.limit)
        if record is not None:
            self.seen[name] = [stamp, record.width, record.height, record.sha1, ""]
        elif severity == WARNING and not problem.startswith("unreadable"):  # a read that failed may work next time
            self.seen[name] = [stamp, 0, 0, "", problem]
        return record, problem, severity

    def save(self) -> None:
        """Keep this scan's files (those gone from the folder drop out), then keep the cache folder
        within its budget. A cache that cannot be written only costs time on the next scan."""
        if self.path is None or (not self.checked and len(self.seen) == len(self.known)):
            return
        from .cachestore import TEMPORARY_PREFIX, evict

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{TEMPORARY_PREFIX}tuneboard-scan-",
                                       suffix=".json")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.seen, f, separators=(",", ":"))
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            evict(self.path.parent.parent, keep=[self.path])
        except (OSError, ValueError):
            pass


def _split_key(record: ImageRecord, root: Path) -> str:
    rel = os.path.relpath(record.path, root)
    return hashlib.sha1(rel.replace(os.sep, "/").encode()).hexdigest()


def stratified_split(records_by_class: dict[str, list[ImageRecord]], root: Path, test_fraction: float):
    """Split each class into train/test; the same files always give the same split
    (the order is the hash of each file's path relative to the dataset root)."""
    train, test = [], []
    for records in records_by_class.values():
        ordered = sorted(records, key=lambda r: _split_key(r, root))
        n = len(ordered)
        n_test = int(round(n * test_fraction))
        if n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        else:
            n_test = 0
        test.extend(ordered[:n_test])
        train.extend(ordered[n_test:])
    return train, test


def scan_dataset(
    path: str | os.PathLike,
    test_fraction: float = 0.2,
    min_side: int = MIN_IMAGE_SIDE,
    max_pixels: int | None = None,
    few_images: int = FEW_IMAGES_PER_CLASS,
    imbalance_ratio: float = IMBALANCE_RATIO,
    use_fixes: bool = True,
    scan_cache: str | os.PathLike | None = None,
) -> ScanReport:
    """Scan a dataset folder. Raises DatasetError only when `path` is missing or not a folder, and
    SeveralDatasets when it holds several datasets; every other problem is in the report. The
    dataset's fixes file (fixes.py: relabelled, excluded, dropped leaks), if it has one, is applied
    unless `use_fixes` is off. `scan_cache`: a cache folder (cachestore.default_cache_dir()) where
    each file's result is remembered for the next scan (ScanMemo); None: every file is read."""
    import time

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    t0 = time.perf_counter()
    root, layout = find_dataset_root(path)
    report = ScanReport(root=str(root), layout=layout)
    problems = report.problems
    if not layout:
        problems.append(Problem(str(root), "no dataset found: expected class folders holding images "
                                "(root/<class>/*) or train and test splits (root/train/<class>/*, "
                                "root/test/<class>/*)", ERROR))
        report.seconds = time.perf_counter() - t0
        return report

    # split name -> class name -> folder
    if layout == "splits":
        train_dir, test_dir, test_name = _split_folders(root)
        report.test_split_name = test_name
        split_dirs = {"train": train_dir, "test": test_dir}
        for p in _list_dir(root):
            full = Path(p.path)
            if full not in (train_dir, test_dir) and not is_hidden(p.name):
                problems.append(Problem(str(full), "not part of the train or test split, ignored", INFO))
    else:
        split_dirs = {"all": root}

    memo = ScanMemo(scan_cache, root, min_side, Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
    with ThreadPoolExecutor(max_workers=SCAN_WORKERS, thread_name_prefix="tuneboard-scan") as pool:
        class_records = _check_class_folders(split_dirs, root, layout, memo, pool, problems)
    memo.save()

    if layout == "splits":
        present = {s: {c for c, r in cr.items() if r} for s, cr in class_records.items()}
        classes = sorted(present["train"] | present["test"])
        for c in classes:
            for s in ("train", "test"):
                if c not in present[s]:
                    other = "test" if s == "train" else "train"
                    problems.append(Problem(str(Path(split_dirs[other]) / c),
                                            f"class '{c}' has images in the {other} split only", WARNING))
        classes = sorted(present["train"])  # a class can only be learned from training images
    else:
        report.test_fraction = test_fraction
        classes = sorted(c for c, r in class_records["all"].items() if r)

    report.classes = classes
    index = {c: i for i, c in enumerate(classes)}
    if layout == "splits":
        for s in ("train", "test"):
            recs = []
            for c, records in class_records[s].items():
                if c in index:
                    for r in records:
                        r.label = index[c]
                        recs.append(r)
            report.samples[s] = recs
    else:
        by_class = {c: class_records["all"][c] for c in classes}
        for c, records in by_class.items():
            for r in records:
                r.label = index[c]
        report.samples["train"], report.samples["test"] = stratified_split(by_class, root, test_fraction)

    if use_fixes:
        _apply_fixes_file(report)
    _dataset_checks(report, split_dirs, few_images, imbalance_ratio)
    report.seconds = time.perf_counter() - t0
    return report


def _check_class_folders(split_dirs: dict, root: Path, layout: str, memo: ScanMemo, pool: ThreadPoolExecutor,
                         problems: list[Problem]) -> dict[str, dict[str, list[ImageRecord]]]:
    """split -> class -> the usable images of its folder, each file checked on the pool's threads
    (through `memo`); every file skipped is added to `problems`, in the folders' order."""
    class_records: dict[str, dict[str, list[ImageRecord]]] = {}
    for split, split_dir in split_dirs.items():
        class_records[split] = {}
        for entry in _list_dir(split_dir):
            p = Path(entry.path)
            if is_hidden(entry.name):
                problems.append(Problem(str(p), "hidden file or folder, skipped", WARNING))
                continue
            if not entry.is_dir():
                if split_dir == root and entry.name == FIXES_FILE:
                    continue  # Tuneboard's own review fixes, beside a flat dataset's class folders
                problems.append(Problem(str(p), "file outside any class folder, skipped", WARNING))
                continue
            files = _walk_files(p, problems)
            images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
            checked = dict(zip(images, pool.map(memo.check, images)))
            records = []
            for f in files:
                if f not in checked:
                    problems.append(Problem(str(f), f"not an image file (extension '{f.suffix}'), skipped", WARNING))
                    continue
                record, problem, severity = checked[f]
                if record is None:
                    problems.append(Problem(str(f), problem, severity))
                else:
                    records.append(record)
            class_records[split][entry.name] = records
            if not records:
                problems.append(Problem(str(p), "class folder has no usable images, class ignored"
                                        + (" in this split" if layout == "splits" else ""), WARNING))
    return class_records


def _apply_fixes_file(report: ScanReport) -> None:
    """Apply the review's fixes to the scanned records. A malformed fixes file is an error that
    names it (nothing applied: training on labels the user believes corrected would mislead)."""
    from .fixes import FixesError, apply_fixes, fixes_path, load_fixes

    path = fixes_path(report.root)
    try:
        fixes = load_fixes(path)
    except FixesError as exc:
        report.problems.append(Problem(str(path), f"{exc}; no fix applied. Correct or delete the file", ERROR))
        return
    if not path.exists():
        return
    report.fixes = apply_fixes(report, fixes, str(path))
    for line in report.fixes.unmatched:
        report.problems.append(Problem(str(path), line, WARNING))


def _dataset_checks(report: ScanReport, split_dirs: dict, few_images: int, imbalance_ratio: float) -> None:
    problems, root = report.problems, report.root
    n_images = sum(len(r) for r in report.samples.values())
    if n_images == 0:
        problems.append(Problem(root, "no usable images found", ERROR))
        return
    if len(report.classes) < 2:
        found = f"only '{report.classes[0]}'" if report.classes else "none"
        problems.append(Problem(root, f"fewer than two classes with training images ({found}); "
                                "a classifier needs at least two", ERROR))
    for split in ("train", "test"):
        if not report.samples.get(split):
            where = split_dirs.get(split, root)
            problems.append(Problem(str(where), f"the {split} split has no usable images", ERROR))
    if report.errors:
        return
    # Exact duplicates across splits leak test images into training.
    train_hashes = {}
    for r in report.samples["train"]:
        train_hashes.setdefault(r.sha1, r.path)
    kept = []
    for r in report.samples["test"]:
        if r.sha1 in train_hashes:
            problems.append(Problem(r.path, f"same file as training image {train_hashes[r.sha1]} "
                                    "(test leakage), left out of the test split", WARNING))
            report.exact_leaks.append((r.path, train_hashes[r.sha1]))
        else:
            kept.append(r)
    report.samples["test"] = kept
    if not kept:
        where = split_dirs.get("test", root)
        problems.append(Problem(str(where), "every test image is a copy of a training image (test leakage): "
                                "the test split is empty once they are left out", ERROR))
        return
    for split, counts in report.splits.items():
        for c, n in counts.items():
            if split == "train" and 0 < n < few_images:
                problems.append(Problem(str(Path(root) / c) if report.layout == "flat" else
                                        str(Path(split_dirs["train"]) / c),
                                        f"class '{c}' has only {n} training images (fewer than {few_images})",
                                        WARNING))
        nonzero = [n for n in counts.values() if n > 0]
        if len(nonzero) >= 2 and max(nonzero) / min(nonzero) >= imbalance_ratio:
            big = max(counts, key=counts.get)
            small = min((c for c in counts if counts[c] > 0), key=counts.get)
            problems.append(Problem(root, f"strong class imbalance in {split}: '{big}' has {counts[big]} "
                                    f"images, '{small}' {counts[small]} (ratio {max(nonzero) / min(nonzero):.1f})",
                                    WARNING))


def format_report(report: ScanReport, max_problems: int = 50) -> str:
    """The scan as a readable text report."""
    lines = [f"Dataset: {report.root}"]
    if report.layout == "splits":
        lines.append(f"Layout: train/{report.test_split_name} splits")
    elif report.layout == "flat":
        lines.append(f"Layout: class folders without splits; {report.test_fraction:.0%} of each class "
                     "held out as the test split (the same files every time)")
    if report.classes:
        width = max(len(c) for c in report.classes + ["class"])
        lines.append("")
        lines.append(f"  {'class':<{width}}  {'train':>7}  {'test':>7}")
        splits = report.splits
        for c in report.classes:
            lines.append(f"  {c:<{width}}  {splits.get('train', {}).get(c, 0):>7}  {splits.get('test', {}).get(c, 0):>7}")
        total_train = sum(splits.get("train", {}).values())
        total_test = sum(splits.get("test", {}).values())
        lines.append(f"  {'total':<{width}}  {total_train:>7}  {total_test:>7}")
    sizes = report.image_size_summary()
    if sizes:
        lines.append("")
        lines.append(f"Image sizes: width {sizes['min_width']}-{sizes['max_width']} px, height "
                     f"{sizes['min_height']}-{sizes['max_height']} px (median {sizes['median_width']}x"
                     f"{sizes['median_height']})")
    shown = [p for p in report.problems if p.severity != INFO]
    if shown:
        lines.append("")
        lines.append(f"Problems ({len(report.errors)} errors, {len(report.warnings)} warnings):")
        for p in shown[:max_problems]:
            lines.append(f"  {p.severity.upper():7} {p.path}: {p.problem}")
        if len(shown) > max_problems:
            lines.append(f"  ... and {len(shown) - max_problems} more (use --json for all)")
    lines.append("")
    lines.append("Usable: yes" if report.usable else f"Usable: no. {report.reason()}")
    lines.append(f"Scanned in {report.seconds:.1f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Transforms (the book's, with the size and normalisation as parameters)


def book_train_transform(image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(list(mean), list(std))])


def book_test_transform(image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    from torchvision import transforms as T

    resize = resize_size_for(image_size)
    return T.Compose([T.Resize([resize, resize]), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(list(mean), list(std))])


def resize_size_for(image_size: int) -> int:
    """The book resizes to 256 before a 224 centre crop; keep that ratio for other sizes."""
    return int(math.floor(image_size * 256 / 224 + 0.5))
