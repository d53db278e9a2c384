"""Where datasets live for the dashboard: the data root, its datasets, safe zip uploads, the
built-in example, and the book's hot-dog set.

Everything the dashboard writes goes under one data root (default: `data/` beside the app,
`TUNEBOARD_DATA_ROOT` to change it), and the dashboard reads datasets only from inside it (the
folder browser and a typed folder alike), unless whoever starts the server names more folders in
`TUNEBOARD_EXTRA_DATA_ROOTS` (separated by os.pathsep, ":" or ";" on Windows), or `*` for any
folder the server can read. The command line is the user's own shell and is not limited.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from .data import IMAGE_EXTENSIONS, DatasetError, find_dataset_root, images_under, is_hidden
from .fixes import FIXES_FILE
from .runs import APP_DIR, default_runs_dir

EXAMPLE_NAME = "digits"
HOTDOG_URL = "https://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
HOTDOG_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"

MAX_ZIP_BYTES = 500 * 1024**2        # compressed upload
MAX_UNPACKED_BYTES = 2 * 1024**3     # what it may unpack to
MAX_ZIP_FILES = 50_000
MAX_COMPRESSION_RATIO = 100          # an entry that unpacks to more than this many times its packed size...
RATIO_CHECK_BYTES = 1024**2          # ...and to more than this is a zip bomb (photos barely compress)


EXTRA_ROOTS_VARIABLE = "TUNEBOARD_EXTRA_DATA_ROOTS"


class UploadError(ValueError):
    """An archive that is refused; the message says why."""


class FolderNotAllowed(ValueError):
    """A folder outside the folders the dashboard may read; the message names it and them.
    `paths`: the paths the message names (they may hold spaces: a page shows each as one piece)."""

    def __init__(self, message: str, paths: tuple[str, ...] = ()):
        super().__init__(message)
        self.paths = tuple(str(p) for p in paths)


def data_root() -> Path:
    return Path(os.environ.get("TUNEBOARD_DATA_ROOT", APP_DIR / "data")).expanduser().resolve()


def allowed_roots() -> list[Path] | None:
    """The folders the dashboard may read datasets from: the data root and those named in
    TUNEBOARD_EXTRA_DATA_ROOTS; None when that setting is `*` (any folder)."""
    extra = [item.strip() for item in os.environ.get(EXTRA_ROOTS_VARIABLE, "").split(os.pathsep) if item.strip()]
    if "*" in extra:
        return None
    return [data_root(), *(Path(item).expanduser().resolve() for item in extra)]


def check_data_folder(path: str | os.PathLike) -> Path:
    """The folder, resolved (links followed, '..' gone), if the dashboard may read it; raises
    FolderNotAllowed naming the folder and the allowed roots otherwise. A relative path is read
    inside the data folder (where the folder browser starts), not the server's working folder."""
    return _check_readable(path, "datasets", "the images")


def check_weights_file(path: str | os.PathLike) -> Path:
    """A weights file typed on the Train page, held to the same roots as the datasets: a server
    that listens beyond localhost must not open any file on the machine for whoever reaches it."""
    return _check_readable(path, "weights files", "the file")


def _check_readable(path: str | os.PathLike, what: str, what_to_copy: str) -> Path:
    try:
        folder = Path(path).expanduser()
        relative = not folder.is_absolute()
        if relative:
            root = data_root()
            # "data/pets" typed for the data folder's "pets" (Home names the data folder by its name):
            # read as the data folder's pets when data/data/pets does not exist
            if folder.parts[:1] == (root.name,) and not (root / folder).exists() and len(folder.parts) > 1:
                folder = Path(*folder.parts[1:])
            folder = root / folder
        folder = folder.resolve()
    except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, an unknown ~user, a link loop
        raise FolderNotAllowed(f"{path!r} is not a path the dashboard can read ({exc})") from exc
    roots = allowed_roots()
    if roots is None or any(inside(root, folder) for root in roots):
        return folder
    where = f"the data folder {roots[0]}" if len(roots) == 1 else \
        "the folders " + ", ".join(str(r) for r in roots)
    typed = f" ({path} is relative: it is read from the data folder)" if relative else ""
    raise FolderNotAllowed(
        f"{folder} is outside {where}{typed}: the dashboard reads {what} only from there. Copy "
        f"{what_to_copy} there, or start the server with {EXTRA_ROOTS_VARIABLE} naming the folder "
        f"({EXTRA_ROOTS_VARIABLE}=* allows any folder)", paths=(folder, path, *roots))


def runs_root() -> Path:
    """The runs folder (one definition for the dashboard and the command line: runs.default_runs_dir)."""
    return default_runs_dir()


@dataclass
class DatasetEntry:
    name: str
    path: str     # the folder the user picked
    root: str     # where the dataset really starts (may be one folder down)
    layout: str


def list_datasets(root: str | os.PathLike | None = None) -> list[DatasetEntry]:
    """The folders directly under the data root that hold a dataset."""
    root = Path(root) if root else data_root()
    out = []
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        if not p.is_dir() or is_hidden(p.name):
            continue
        try:
            found, layout = find_dataset_root(p)
        except DatasetError:
            continue
        if layout:
            out.append(DatasetEntry(p.name, str(p), str(found), layout))
    return out


def inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def browse(root: str | os.PathLike, relative: str = "") -> tuple[Path, list[str]]:
    """(folder, its sub-folder names) for a folder browser that never leaves `root`."""
    root = Path(root).resolve()
    folder = (root / relative).resolve()
    if not inside(root, folder) or not folder.is_dir():
        folder = root
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name))
    return folder, subs


# --------------------------------------------------------------------------------------------
# Uploads


def safe_dataset_name(name: str) -> str:
    stem = Path(name).stem if name.lower().endswith(".zip") else name
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._")
    return cleaned[:64] or "upload"


def _bomb(name: str, filename: str, unpacked: int, packed: int) -> UploadError:
    return UploadError(f"{name}: entry '{filename}' unpacks to {unpacked / 1e6:.1f} MB from {packed / 1e6:.3f} MB, a "
                       f"compression ratio over {MAX_COMPRESSION_RATIO}:1 (a zip bomb); photos barely compress")


def extract_zip(source, dest_root: str | os.PathLike, name: str, max_unpacked: int = MAX_UNPACKED_BYTES,
                max_files: int = MAX_ZIP_FILES, class_folders: bool = True) -> Path:
    """Unpack an uploaded zip into dest_root/<name> safely: no absolute paths, no '..', no links,
    limits on total size, file count and compression ratio (checked before writing, and the sizes
    again while writing: a header may lie); a damaged, encrypted or unsupported entry is refused.
    The folder appears only when everything unpacked; a refused archive leaves nothing behind.
    class_folders: a dataset's zip must hold a folder per class (photos at its top are refused);
    a zip of photos to classify (Predict's) need not."""
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    target = dest_root / safe_dataset_name(name)
    if target.exists():
        raise UploadError(f"a dataset called '{target.name}' already exists in {dest_root}; rename the zip")
    try:
        zf = zipfile.ZipFile(source)
    except zipfile.BadZipFile as exc:
        raise UploadError(f"{name}: not a zip archive ({exc})") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > max_files:
            raise UploadError(f"{name}: {len(infos)} entries is over the limit of {max_files}")
        total = sum(i.file_size for i in infos)
        if total > max_unpacked:
            raise UploadError(f"{name}: unpacks to {total / 1e6:.0f} MB, over the limit of {max_unpacked / 1e6:.0f} MB")
        for info in infos:
            if info.file_size > RATIO_CHECK_BYTES and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size:
                raise _bomb(name, info.filename, info.file_size, info.compress_size)
        tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=dest_root))
        try:
            written = 0
            for info in infos:
                parts = PurePosixPath(info.filename.replace("\\", "/")).parts
                if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise UploadError(f"{name}: entry '{info.filename}' points outside the archive")
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise UploadError(f"{name}: entry '{info.filename}' is a symbolic link")
                out = tmp.joinpath(*parts) if parts else tmp
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                entry = 0
                try:
                    with zf.open(info) as src, open(out, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            written += len(chunk)
                            entry += len(chunk)
                            if written > max_unpacked:  # the header lied about sizes
                                raise UploadError(f"{name}: unpacks to more than {max_unpacked / 1e6:.0f} MB")
                            if entry > RATIO_CHECK_BYTES and entry > MAX_COMPRESSION_RATIO * info.compress_size:
                                raise _bomb(name, info.filename, entry, info.compress_size)
                            dst.write(chunk)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
                    raise UploadError(f"{name}: entry '{info.filename}' cannot be unpacked (damaged, encrypted or "
                                      f"an unsupported compression: {exc})") from None
                except OSError as exc:  # a full disk, a name the file system refuses
                    raise UploadError(f"{name}: entry '{info.filename}' could not be written under {dest_root} "
                                      f"({exc.strerror or exc}); nothing was kept") from None
            if class_folders:
                refuse_loose_images(_dataset_folder(tmp), name)
            os.replace(_dataset_folder(tmp), target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # what is left of it once its only folder moved out
    return target


def refuse_loose_images(folder: Path, name: str) -> None:
    """UploadError for a zip with no images, or of photos with no class folders (images at its top):
    the scan would refuse it anyway, and the unpacked folder was left behind in the data folder."""
    entries = [p for p in folder.iterdir() if not is_hidden(p.name)]
    if next(images_under(folder), None) is None:
        # the scan would refuse it too, and the folder stayed behind, listed as a dataset (a first user's)
        raise UploadError(f"{name}: holds no images (none of {', '.join(sorted(IMAGE_EXTENSIONS))}); put each "
                          "class's photos in a folder named after the class and zip those folders; nothing was kept")
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose and not any(p.is_dir() for p in entries):
        raise UploadError(f"{name}: its {len(loose)} images are at the top of the archive, with no class folders; "
                          "put each class's photos in a folder named after the class (cat/, dog/) and zip those "
                          "folders; nothing was kept")


def unpacked_summary(folder: str | os.PathLike) -> tuple[str, int]:
    """What an unpacked zip holds, and which files the scan will skip and why (files that are not
    images by their extension, and hidden ones), so that an upload never drops files silently:
    (the sentence, how many files the scan skips)."""
    files = [p for p in Path(folder).rglob("*") if p.is_file() and "__MACOSX" not in p.parts]
    hidden = [p for p in files if any(is_hidden(part) for part in p.relative_to(folder).parts)]
    hidden_set = set(hidden)
    not_images = [p for p in files if p not in hidden_set and p.suffix.lower() not in IMAGE_EXTENSIONS
                  and p.name != FIXES_FILE]  # the review's fixes file is read, not skipped
    text = f"Unpacked {len(files):,} file{'s' if len(files) != 1 else ''} into {folder}"
    skipped = [(not_images, ("file that is not an image", "files that are not images")),
               (hidden, ("hidden file", "hidden files"))]
    reasons = [f"{len(group)} {why[len(group) != 1]} ({', '.join(p.name for p in group[:3])}"
               f"{', ...' if len(group) > 3 else ''})" for group, why in skipped if group]
    skips = len(not_images) + len(hidden)
    if reasons:
        text += f"; the scan skips {skips} of them: " + "; ".join(reasons)
    return text + ".", skips


def _dataset_folder(unpacked: Path) -> Path:
    """The folder of an unpacked zip that is the dataset: a zip of one folder (pets.zip holding
    pets/cat, pets/dog, as zipping a folder makes it) unwraps to it, not to data/pets/pets."""
    entries = [p for p in unpacked.iterdir() if not is_hidden(p.name)]  # macOS's resource forks, .DS_Store: not data
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else unpacked


# --------------------------------------------------------------------------------------------
# The built-in example and the book's data set


def default_dataset(address: str = "") -> str:
    """The dataset a page opens on in a new session, as the Train page does: the one its address
    names (?data=FOLDER, checked where it is used), else the built-in example (written once); ""
    (the page asks for a folder) where the example cannot be written (a read-only data folder)."""
    if address:
        return address
    try:
        return str(ensure_example_dataset())
    except (OSError, ImportError):
        return ""


def ensure_example_dataset(root: str | os.PathLike | None = None, size: int = 32) -> Path:
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) as an ImageFolder
    (root/digits/<digit>/*.png, upscaled to `size` px); written once, no internet needed."""
    root = Path(root) if root else data_root()
    target = root / EXAMPLE_NAME
    if target.is_dir():  # written atomically below: if it exists, it is complete
        return target
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".example-", dir=root))
    try:
        for i, (image, label) in enumerate(zip(digits.images, digits.target)):
            folder = tmp / str(label)
            folder.mkdir(exist_ok=True)
            pixels = (255 - image * (255 / 16)).clip(0, 255).astype(np.uint8)  # dark ink on white
            Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).save(folder / f"digit_{i:04d}.png")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


def download_hotdog(root: str | os.PathLike | None = None, timeout: float = 30.0) -> Path:
    """The book's hot-dog set (2,000 train / 800 test), checksum-verified, into the data root."""
    root = Path(root) if root else data_root()
    target = root / "hotdog"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=root, suffix=".zip", delete=False) as tmp:
        try:
            with urllib.request.urlopen(HOTDOG_URL, timeout=timeout) as response:  # noqa: S310 - fixed URL
                sha1 = hashlib.sha1()
                while chunk := response.read(1 << 20):
                    sha1.update(chunk)
                    tmp.write(chunk)
        except OSError as exc:
            os.unlink(tmp.name)
            raise UploadError(f"could not download the hot-dog set from {HOTDOG_URL} ({exc}); are you offline?") from exc
    if sha1.hexdigest() != HOTDOG_SHA1:
        os.unlink(tmp.name)
        raise UploadError(f"the downloaded hot-dog set has sha1 {sha1.hexdigest()}, expected {HOTDOG_SHA1}")
    try:
        return extract_zip(tmp.name, root, "hotdog", max_unpacked=MAX_UNPACKED_BYTES)
    finally:
        os.unlink(tmp.name)
