"""Fixes a data review decided: relabel, exclude, drop a leaked test image, keep (not an issue).

Nothing here moves, renames or deletes a user's photo. The fixes live in one small JSON file
that a person can read and edit:

    <dataset root>/tuneboard-fixes.json        (when the dataset folder is writable)
    <runs folder>/dataset-fixes/<name>-<hash of the dataset path>.json   (when it is not)

    {"format": "tuneboard-fixes-1",
     "fixes": [{"action": "relabel", "path": "train/ants/12.jpg", "sha1": "...", "to": "bees", "at": "..."},
               {"action": "exclude", "path": "train/bees/dark.jpg", "sha1": "...", "kind": "dark", ...},
               {"action": "drop_leak", "path": "test/ants/3.jpg", "sha1": "...", "other": "train/ants/9.jpg"},
               {"action": "keep", "path": "train/ants/odd.jpg", "sha1": "...", "kind": "label"}]}

`path` is relative to the dataset root (so the folder can move) and `sha1` is the file's
content hash (so a file that was moved or renamed inside the folder is still matched). The scan
(data.scan_dataset) applies them, so every training, the review and the command line see the
same corrected dataset; a run records the fixes it trained with in its config.json. A file that
cannot be read as fixes is refused by name and applies nothing (the scan reports it as an error:
training on the uncorrected labels without saying so would be worse).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

FIXES_FILE = "tuneboard-fixes.json"
FORMAT = "tuneboard-fixes-1"
ACTIONS = ("relabel", "exclude", "drop_leak", "keep")


class FixesError(ValueError):
    """A fixes file that cannot be used; the message names the file and what is wrong."""


@dataclass
class Fix:
    action: str          # relabel | exclude | drop_leak | keep
    path: str            # relative to the dataset root, with "/"
    sha1: str = ""       # the file's content, to find it again after a move
    to: str = ""         # relabel: the new class
    kind: str = ""       # the issue it answers (label, dark, leak, ...), for the record
    other: str = ""      # drop_leak: the training image it copies
    at: str = ""         # when it was decided (ISO time)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v != "" or k in ("action", "path")}


@dataclass
class AppliedFixes:
    """What the scan did with a fixes file: the counts the Train page shows, and the entries
    that matched no file (named, not applied)."""
    file: str = ""
    relabelled: int = 0
    excluded: int = 0
    leaks_dropped: int = 0
    kept: int = 0
    unmatched: list[str] = field(default_factory=list)
    fixes: list[dict] = field(default_factory=list)  # the entries applied, as in the file

    @property
    def count(self) -> int:
        return self.relabelled + self.excluded + self.leaks_dropped

    def text(self) -> str:
        return summary_text(self.relabelled, self.excluded, self.leaks_dropped)

    def to_dict(self) -> dict:
        return {"file": self.file, "relabelled": self.relabelled, "excluded": self.excluded,
                "leaks_dropped": self.leaks_dropped, "kept": self.kept, "unmatched": self.unmatched,
                "fixes": self.fixes}


def summary_text(relabelled: int, excluded: int, leaks_dropped: int) -> str:
    """"3 relabelled, 5 excluded, 2 leaks dropped" ("no fixes" when there are none)."""
    parts = []
    if relabelled:
        parts.append(f"{relabelled} relabelled")
    if excluded:
        parts.append(f"{excluded} excluded")
    if leaks_dropped:
        parts.append(f"{leaks_dropped} leak{'s' if leaks_dropped != 1 else ''} dropped")
    return ", ".join(parts) or "no fixes"


# --------------------------------------------------------------------------------------------
# Where the file lives


def _fallback_path(root: Path) -> Path:
    from .runs import DATASET_FIXES_FOLDER, default_runs_dir, slugify

    resolved = str(Path(root).expanduser().resolve())
    key = hashlib.sha1(resolved.encode()).hexdigest()[:12]
    return default_runs_dir() / DATASET_FIXES_FOLDER / f"{slugify(Path(resolved).name) or 'dataset'}-{key}.json"


def fixes_path(root: str | os.PathLike) -> Path:
    """The fixes file of the dataset whose scan root is `root`: the one that exists, else where a
    new one goes (in the dataset folder when it is writable, else in the runs folder)."""
    root = Path(root)
    inside, fallback = root / FIXES_FILE, _fallback_path(root)
    if inside.exists():
        return inside
    if fallback.exists() or not writable(root):
        return fallback
    return inside


def writable(folder: Path) -> bool:
    """Whether a fixes file may be written into `folder`: its owner allows it (the write bits,
    which even root honours here: a folder made read-only means "leave my files alone") and
    this process can."""
    try:
        return bool(folder.stat().st_mode & 0o222) and os.access(folder, os.W_OK)
    except OSError:
        return False


def relative_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def file_sha1(path: str | os.PathLike) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Reading and writing


def parse_fixes(data, source: str) -> list[Fix]:
    """The fixes of a parsed JSON document; FixesError naming `source` when it is not one."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("fixes"), list):
        raise FixesError(f"{source}: not a Tuneboard fixes file (expected an object with \"format\": "
                         f"\"{FORMAT}\" and a \"fixes\" list)")
    fixes = []
    known = set(Fix.__dataclass_fields__)
    for i, entry in enumerate(data["fixes"]):
        where = f"{source}: fix {i + 1}"
        if not isinstance(entry, dict):
            raise FixesError(f"{where}: must be an object, got {entry!r}")
        unknown = set(entry) - known
        if unknown:
            raise FixesError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if entry.get("action") not in ACTIONS:
            raise FixesError(f"{where}: action must be one of {', '.join(ACTIONS)}, got {entry.get('action')!r}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise FixesError(f"{where}: needs a \"path\" (relative to the dataset folder)")
        if not all(isinstance(v, str) for v in entry.values()):
            raise FixesError(f"{where}: every value must be text")
        if entry["action"] == "relabel" and not entry.get("to"):
            raise FixesError(f"{where}: a relabel needs \"to\" (the new class)")
        fixes.append(Fix(**entry))
    return fixes


def load_fixes(path: str | os.PathLike) -> list[Fix]:
    """The fixes in `path` ([] when there is no such file). FixesError when it is malformed."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FixesError(f"{path}: cannot be read as a fixes file ({exc})") from None
    return parse_fixes(data, str(path))


def save_fixes(path: str | os.PathLike, fixes: list[Fix]) -> None:
    from .runs import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "fixes": [f.to_dict() for f in fixes]}, indent=1)
    atomic_write_text(path, text + "\n")


def _same_target(a: Fix, b: Fix) -> bool:
    """A new decision about an image replaces the earlier one (a keep is per issue kind)."""
    if a.path != b.path:
        return False
    if "keep" in (a.action, b.action):
        return a.action == b.action and a.kind == b.kind
    return True


def add_fixes(root: str | os.PathLike, new: list[Fix]) -> Path:
    """Record `new` in the dataset's fixes file (replacing earlier decisions about the same
    images). Fills in each one's content hash and time. Returns the file."""
    from .runs import now_iso

    root = Path(root)
    path = fixes_path(root)
    fixes = load_fixes(path)
    for fix in new:
        if fix.action not in ACTIONS:
            raise FixesError(f"unknown action {fix.action!r}: one of {', '.join(ACTIONS)}")
        if not fix.sha1 and (root / fix.path).is_file():
            fix.sha1 = file_sha1(root / fix.path)
        fix.at = fix.at or now_iso()
        fixes = [f for f in fixes if not _same_target(f, fix)] + [fix]
    save_fixes(path, fixes)
    return path


def fixes_for_images(root: str | os.PathLike, paths: list[str], action: str, to: str = "",
                     kind: str = "") -> list[Fix]:
    """Fixes of one action for images given by their full paths (the Predict page's confusion cell)."""
    return [Fix(action, relative_path(p, root), to=to if action == "relabel" else "", kind=kind) for p in paths]


def undo_fix(root: str | os.PathLike, index: int) -> Fix:
    """Remove the fix at `index` of the dataset's fixes file (the image is as it was before)."""
    path = fixes_path(root)
    fixes = load_fixes(path)
    if not 0 <= index < len(fixes):
        raise FixesError(f"{path}: no fix number {index + 1} (it holds {len(fixes)})")
    removed = fixes.pop(index)
    save_fixes(path, fixes)
    return removed


def install_fixes(root: str | os.PathLike, source: str | os.PathLike) -> tuple[Path, int]:
    """`review --apply FIXES`: check a fixes file and add its entries to the dataset's own.
    A malformed file is refused (FixesError) before anything is written."""
    fixes = load_fixes(source) if Path(source).exists() else None
    if fixes is None:
        raise FixesError(f"{source}: no such fixes file")
    return add_fixes(root, fixes), len(fixes)


# --------------------------------------------------------------------------------------------
# Applying them to a scan


def apply_fixes(report, fixes: list[Fix], file: str = "") -> AppliedFixes:
    """Change the scan's records as the fixes say: relabel (to a class the dataset has), exclude
    (from any split), drop_leak (from the test split). A fix matches its image by path, or by
    content hash when no file has that path any more. Entries that match nothing, or relabel
    to an unknown class, are named in `unmatched` and change nothing."""
    applied = AppliedFixes(file=file)
    root = report.root
    by_path, by_sha = {}, {}
    for split, records in report.samples.items():
        for r in records:
            by_path[relative_path(r.path, root)] = (split, r)
            by_sha.setdefault(r.sha1, (split, r))
    index = {c: i for i, c in enumerate(report.classes)}
    removed: set[int] = set()
    for fix in fixes:
        found = by_path.get(fix.path) or (by_sha.get(fix.sha1) if fix.sha1 else None)
        if found is None:
            applied.unmatched.append(f"{fix.path}: no such image in the dataset ({fix.action} not applied)")
            continue
        split, record = found
        if fix.action == "relabel":
            if fix.to not in index:
                applied.unmatched.append(f"{fix.path}: class '{fix.to}' is not one of the dataset's classes "
                                         "(relabel not applied)")
                continue
            record.label = index[fix.to]
            applied.relabelled += 1
        elif fix.action == "exclude":
            removed.add(id(record))
            applied.excluded += 1
        elif fix.action == "drop_leak":
            if split != "test":
                applied.unmatched.append(f"{fix.path}: not in the test split (drop_leak not applied)")
                continue
            removed.add(id(record))
            applied.leaks_dropped += 1
        else:
            applied.kept += 1
            continue
        applied.fixes.append(fix.to_dict())
    for split, records in report.samples.items():
        report.samples[split] = [r for r in records if id(r) not in removed]
    return applied


# --------------------------------------------------------------------------------------------
# A corrected copy


def export_corrected(report, out_dir: str | os.PathLike) -> Path:
    """Copy the scanned (fixed) dataset into `out_dir` as out/train/<class>/* and
    out/test/<class>/*: relabelled images in their new class folder, excluded and dropped ones
    left out. The original folder is not touched. Refuses a folder that is not empty, and one
    inside the dataset or holding it (the copy would land among the images it copies, or the next
    scan would find it there)."""
    out = Path(out_dir)
    source, target = Path(report.root).resolve(), out.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise FixesError(f"{out}: the corrected copy must go outside the dataset {report.root} "
                         "(and must not hold it); choose a folder beside it")
    if out.exists() and any(out.iterdir()):
        raise FixesError(f"{out}: the folder for the corrected copy must be new or empty")
    for split, records in report.samples.items():
        for r in records:
            dest = out / split / report.classes[r.label] / Path(r.path).name
            n = 1
            while dest.exists():  # two images of one name from two source folders
                dest = dest.with_name(f"{Path(r.path).stem}-{n}{Path(r.path).suffix}")
                n += 1
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(r.path, dest)
    return out


def dataset_stamp(path: str | os.PathLike) -> tuple[float, float]:
    """(the folder's modification time, its fixes file's): what a cached scan of `path` must key
    on, so that a fix recorded on the Review page shows on the Train page at once."""
    from .data import DatasetError, find_dataset_root

    path = Path(path).expanduser()
    try:
        root, _ = find_dataset_root(path)
        fixes = fixes_path(root)
        return path.stat().st_mtime, fixes.stat().st_mtime if fixes.exists() else 0.0
    except (DatasetError, OSError):
        return path.stat().st_mtime, 0.0
