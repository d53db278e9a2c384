"""The dataset layer: layouts, image modes, every problem the scan must name, loading, the CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset, shared_dataset, write_image
from finetune_core.__main__ import main as cli_main
from finetune_core.data import IMAGE_EXTENSIONS, DatasetError, book_test_transform, load_rgb, scan_dataset


def problems_by_path(report):
    out = {}
    for p in report.problems:
        out.setdefault(os.path.basename(p.path), []).append(p)
    return out


# --- layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("test_name", ["test", "val", "valid", "validation"])
def test_split_layout_accepts_each_test_split_name(tmp_path, test_name):
    root = make_dataset(tmp_path / "d", split_names=("train", test_name), per_class=10)
    report = scan_dataset(root)
    assert report.layout == "splits"
    assert report.test_split_name == test_name
    assert report.classes == ["cat", "dog"]
    assert report.splits == {"train": {"cat": 10, "dog": 10}, "test": {"cat": 3, "dog": 3}}
    assert report.usable and not report.errors


def test_flat_layout_gets_a_stratified_split_that_never_changes(tmp_path):
    root = make_dataset(tmp_path / "flat", flat=True, per_class=17, test_per_class=3)  # 20 per class
    first = scan_dataset(root)
    assert first.layout == "flat"
    assert first.splits == {"train": {"cat": 16, "dog": 16}, "test": {"cat": 4, "dog": 4}}
    again = scan_dataset(root)
    assert [r.path for r in again.samples["test"]] == [r.path for r in first.samples["test"]]
    assert not {r.path for r in first.samples["test"]} & {r.path for r in first.samples["train"]}
    half = scan_dataset(root, test_fraction=0.5)
    assert half.splits["test"] == {"cat": 10, "dog": 10}


def test_split_of_a_class_does_not_depend_on_other_files(tmp_path):
    root = make_dataset(tmp_path / "flat", flat=True, per_class=17, test_per_class=3)
    before = {r.path for r in scan_dataset(root).samples["test"] if "/cat/" in r.path}
    for i in range(5):
        write_image(root / "dog" / f"extra_{i}.png", (40, 60, 220), seed=99 + i)
    after = {r.path for r in scan_dataset(root).samples["test"] if "/cat/" in r.path}
    assert before == after


@pytest.mark.parametrize("flat", [False, True])
def test_dataset_one_folder_down_is_found(tmp_path, flat):
    make_dataset(tmp_path / "upload" / "my_photos", flat=flat, per_class=10)
    report = scan_dataset(tmp_path / "upload")
    assert report.root == str(tmp_path / "upload" / "my_photos")
    assert report.classes == ["cat", "dog"] and report.usable


# --- image formats and modes -------------------------------------------------------------------


@pytest.mark.parametrize("name,mode,fmt", [
    ("a.jpg", "RGB", "JPEG"), ("b.JPG", "RGB", "JPEG"), ("c.jpeg", "RGB", "JPEG"), ("d.png", "RGB", "PNG"),
    ("e.bmp", "RGB", "BMP"), ("f.webp", "RGB", "WEBP"), ("g.tif", "RGB", "TIFF"), ("h.TIFF", "RGB", "TIFF"),
    ("gray.png", "L", "PNG"), ("rgba.png", "RGBA", "PNG"), ("la.png", "LA", "PNG"), ("cmyk.jpg", "CMYK", "JPEG"),
    ("pal.gif", "P", "GIF"), ("pal.png", "P", "PNG"),
])
def test_every_format_and_mode_loads_as_rgb(tmp_path, name, mode, fmt):
    path = write_image(tmp_path / name, color=(200, 100, 50), mode=mode, fmt=fmt)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (40, 32)
    tensor = book_test_transform(24)(img)
    assert tensor.shape == (3, 24, 24) and tensor.dtype == torch.float32


def test_transparency_is_composited_on_white(tmp_path):
    arr = np.zeros((10, 10, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(arr, "RGBA").save(tmp_path / "clear.png")
    assert load_rgb(tmp_path / "clear.png").getpixel((5, 5)) == (255, 255, 255)
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert load_rgb(tmp_path / "pal.png").getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    arr = np.full((12, 12), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    r, g, b = load_rgb(tmp_path / "deep.png").getpixel((3, 3))
    assert r == g == b and 126 <= r <= 129


def test_cmyk_colour_converts(tmp_path):
    path = write_image(tmp_path / "c.jpg", color=(250, 10, 10), mode="CMYK", fmt="JPEG")
    r, g, b = load_rgb(path).getpixel((10, 10))
    assert r > 200 and g < 60 and b < 60


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    r, g, b = load_rgb(tmp_path / "anim.gif").getpixel((10, 10))
    assert r > 200 and b < 50


def test_image_extensions_are_pillows_readable_formats_in_any_case(tmp_path):
    assert {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    root = make_dataset(tmp_path / "d", per_class=10)
    cat = root / "train" / "cat"
    for name, fmt in (("netpbm.PPM", "PPM"), ("targa.Tga", "TGA"), ("icon.ico", "ICO"), ("photo.JFIF", "JPEG")):
        write_image(cat / name, color=(220, 40, 40), fmt=fmt)
    Image.new("RGB", (40, 32), (220, 40, 40)).save(cat / "scan.pdf")  # Pillow writes PDFs but cannot read them
    (cat / "table.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))  # a stub format: no decoder in Pillow
    (cat / "notes.TXT").write_text("not an image")
    report = scan_dataset(root)
    used = {os.path.basename(r.path) for r in report.samples["train"]}
    assert {"netpbm.PPM", "targa.Tga", "icon.ico", "photo.JFIF"} <= used
    by = problems_by_path(report)
    for name in ("scan.pdf", "table.h5", "notes.TXT"):
        extension = os.path.splitext(name)[1]
        assert [p.problem for p in by[name]] == [f"not an image file (extension '{extension}'), skipped"]
    assert not {"netpbm.PPM", "targa.Tga", "icon.ico", "photo.JFIF"} & set(by)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (20, 40)


# --- problems ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """Every kind of bad file at once. Shared by the tests of this module: none of them changes it."""
    tmp_path = tmp_path_factory.mktemp("messy")
    root = make_dataset(tmp_path / "messy", per_class=12, test_per_class=4)
    train = root / "train"
    (train / "cat" / "empty.jpg").write_bytes(b"")
    good = (train / "cat" / "cat_0.png").read_bytes()
    jpg = write_image(tmp_path / "full.jpg", size=(50, 50), noise=40)
    (train / "cat" / "truncated.jpg").write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    (train / "cat" / "corrupt.jpg").write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)))
    (train / "cat" / "notes.txt").write_text("not an image")
    (train / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    write_image(train / "cat" / "tiny.png", size=(8, 8))
    write_image(train / "dog" / "huge.png", size=(60, 60))
    (train / "emptyclass").mkdir()
    write_image(root / "test" / "bird" / "bird_0.png")  # class only in the test split
    (root / "test" / "dog" / "leak.png").write_bytes(good)  # same bytes as a training image
    (train / "dog" / "loop").symlink_to(train / "dog", target_is_directory=True)
    return root


def test_scan_names_every_problem_with_path_and_severity(messy):
    report = scan_dataset(messy, max_pixels=3000)  # 60x60 = 3600 pixels counts as a bomb here
    by = problems_by_path(report)
    expect = {
        "empty.jpg": "empty file", "truncated.jpg": "truncated", "corrupt.jpg": "not an image Pillow can read",
        "notes.txt": "not an image file", ".DS_Store": "hidden", "tiny.png": "too small",
        "huge.png": "decompression bomb", "emptyclass": "no usable images", "leak.png": "test leakage",
        "loop": "symbolic link loop",
    }
    for name, text in expect.items():
        assert name in by, f"{name} not reported; problems: {report.problems}"
        assert any(text in p.problem for p in by[name]), (name, by[name])
        assert all(p.severity == "warning" for p in by[name])
        assert all(os.path.isabs(p.path) for p in by[name])
    assert any("test split only" in p.problem for p in by["bird"])
    assert report.usable  # all of these are skipped files, not errors
    assert report.classes == ["cat", "dog"]
    assert report.splits["train"] == {"cat": 12, "dog": 12}
    used = {os.path.basename(r.path) for rs in report.samples.values() for r in rs}
    assert not used & set(expect)


def test_decompression_bomb_at_pillow_default_limit_is_skipped(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", per_class=10)
    write_image(root / "train" / "cat" / "bomb.png", size=(50, 50))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2x this raises DecompressionBombError
    report = scan_dataset(root, min_side=1)
    bombs = [p for p in report.problems if "decompression bomb" in p.problem]
    assert {os.path.basename(p.path) for p in bombs} >= {"bomb.png"}


def test_few_images_and_imbalance_are_warned(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=30, test_per_class=3)
    for f in sorted((root / "train" / "dog").iterdir())[4:]:
        f.unlink()
    report = scan_dataset(root)
    texts = [p.problem for p in report.warnings]
    assert any("only 4 training images" in t for t in texts)
    assert any("strong class imbalance in train" in t and "ratio 7.5" in t for t in texts)
    assert report.usable


@pytest.mark.parametrize("build,expected", [
    (lambda r: make_dataset(r, classes=("only",)), "fewer than two classes"),
    (lambda r: (make_dataset(r), [f.unlink() for f in (r / "test").rglob("*.png")]),
     "the test split has no usable images"),
    (lambda r: (r / "a").mkdir(parents=True) or (r / "b").mkdir() or (r / "a" / "x.txt").write_text("x"),
     "no dataset found"),
    (lambda r: [(r / "train" / c).mkdir(parents=True) or (r / "test" / c).mkdir(parents=True) for c in "ab"],
     "no usable images"),
])
def test_unusable_datasets_are_errors(tmp_path, build, expected):
    root = tmp_path / "bad"
    root.mkdir()
    build(root)
    report = scan_dataset(root)
    assert not report.usable
    assert any(expected in p.problem and p.severity == "error" for p in report.problems), report.problems
    reason = report.reason()  # the one line the CLI and the Train page show
    assert expected in reason and "\n" not in reason, reason


@pytest.mark.parametrize("flat", [False, True])
def test_a_test_split_made_only_of_copies_of_training_images_is_unusable(tmp_path, flat):
    import shutil

    root = make_dataset(tmp_path / "d", per_class=4, test_per_class=2, flat=flat)
    if flat:  # every file of a class is the same image: whatever goes to test has a copy in train
        for c in ("cat", "dog"):
            first, *others = sorted((root / c).glob("*.png"))
            for f in others:
                shutil.copyfile(first, f)
    else:
        for c in ("cat", "dog"):
            train_file = sorted((root / "train" / c).glob("*.png"))[0]
            for f in (root / "test" / c).glob("*.png"):
                shutil.copyfile(train_file, f)
    report = scan_dataset(root)
    assert not report.usable
    assert report.samples["test"] == []
    assert "every test image is a copy of a training image" in report.reason(), report.reason()
    leaks = [p for p in report.warnings if "test leakage" in p.problem]
    assert leaks  # each copy is still named


def test_the_reason_names_the_first_error_and_counts_the_others(tmp_path):
    root = make_dataset(tmp_path / "bad", classes=("only",))
    for f in (root / "test").rglob("*.png"):
        f.unlink()
    report = scan_dataset(root)
    first, *others = report.errors
    assert others, report.errors
    assert report.reason() == f"{first.path}: {first.problem} (and {len(others)} more errors)"
    assert scan_dataset(make_dataset(tmp_path / "good")).reason() == ""


def test_missing_path_and_file_path_raise(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_dataset(tmp_path / "f.txt")


# --- loading -------------------------------------------------------------------------------------


def test_loading_yields_rgb_tensors_and_skips_a_file_that_breaks_later(tmp_path):
    from finetune_core.prepare import prepare_data

    root = make_dataset(tmp_path / "d", per_class=4)
    write_image(root / "train" / "cat" / "gray.png", (90, 90, 90), mode="L")
    write_image(root / "train" / "dog" / "cmyk.jpg", (40, 60, 220), mode="CMYK", fmt="JPEG")
    report = scan_dataset(root)
    broken = report.samples["train"][0].path
    os.remove(broken)  # fails after the scan
    data = prepare_data(report, 28, cache_dir="")
    assert data.train_images.shape == (9, 3, data.train_side, data.train_side)
    assert data.test_images.shape == (6, 3, 28, 28) and data.test_images.dtype == torch.uint8
    assert broken not in data.train_paths and len(data.train_labels) == 9
    assert [p.path for p in data.skipped] == [broken] and "failed to decode" in data.skipped[0].problem


@pytest.mark.parametrize("split", ["train", "test"])
def test_images_and_labels_agree_when_a_renamed_folder_hits_the_decode_cache(tmp_path, monkeypatch, split):
    """The decode cache is keyed by the files' contents: after a file fails to decode and the
    folder is renamed, the cached entry still drops that file's label, under its new path."""
    from finetune_core import prepare

    root = make_dataset(tmp_path / "before", per_class=4)
    real = {"train": prepare.decode_train, "test": prepare.decode_test}[split]
    victim = "dog_1.png" if split == "train" else "dog_t1.png"

    def failing(path, *args):
        if os.path.basename(path) == victim:
            raise OSError("broken after the scan")
        return real(path, *args)

    monkeypatch.setattr(prepare, f"decode_{split}", failing)
    cache = tmp_path / "cache"
    first = prepare.prepare_data(scan_dataset(root), 28, cache_dir=cache)
    renamed = root.rename(tmp_path / "after")
    report = scan_dataset(renamed)
    monkeypatch.setattr(prepare, f"decode_{split}", real)  # a second decode would not fail: the cache answers
    again = prepare.prepare_data(report, 28, cache_dir=cache)
    for data in (first, again):
        assert len(data.train_images) == len(data.train_labels) == len(data.train_paths)
        assert len(data.test_images) == len(data.test_labels) == len(data.test_paths)
        assert sum(map(len, (data.train_paths, data.test_paths))) == 4 + 4 + 3 + 3 - 1
    assert [os.path.basename(p.path) for p in again.skipped] == [victim]
    assert again.skipped[0].path.startswith(str(renamed))  # named by its path now
    paths = again.train_paths if split == "train" else again.test_paths
    assert all(not p.endswith(victim) for p in paths) and all(p.startswith(str(renamed)) for p in paths)
    images = again.train_images if split == "train" else again.test_images
    labels = again.train_labels if split == "train" else again.test_labels
    assert np.array_equal(np.asarray(images), np.asarray(first.train_images if split == "train" else first.test_images))
    assert labels.tolist() == (first.train_labels if split == "train" else first.test_labels).tolist()


def test_two_jobs_decoding_into_one_cache_never_share_a_temporary_file(tmp_path, monkeypatch):
    import shutil
    import tempfile

    from finetune_core import cachestore, prepare

    root = make_dataset(tmp_path / "d", per_class=3, test_per_class=2)
    report = scan_dataset(root)
    cache = tmp_path / "cache"
    written = []
    real_mkstemp = tempfile.mkstemp
    monkeypatch.setattr(cachestore.tempfile, "mkstemp", lambda *a, **k: (lambda fd_name: (
        written.append(fd_name[1]), fd_name)[1])(real_mkstemp(*a, **k)))
    for job in range(2):  # the same entries written twice by one process, as two jobs would
        shutil.rmtree(cache, ignore_errors=True)
        prepare.prepare_data(report, 28, cache_dir=cache)
    assert len(written) == 2 * 10 and len(set(written)) == 2 * 10, written
    assert [p.name for p in cache.rglob(".*")] == []  # nothing left behind


# --- the real datasets ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,classes,train,test", [
    ("seefood", ["hot_dog", "not_hot_dog"], {"hot_dog": 249, "not_hot_dog": 249}, {"hot_dog": 250, "not_hot_dog": 249}),
    ("hymenoptera", ["ants", "bees"], {"ants": 124, "bees": 121}, {"ants": 70, "bees": 83}),
])
def test_real_datasets_match_their_readme(name, classes, train, test):
    root = shared_dataset(name)
    report = scan_dataset(root)
    assert report.classes == classes
    assert report.splits == {"train": train, "test": test}
    assert report.usable and not report.errors, report.errors
    assert not report.warnings, report.warnings


def test_hymenoptera_gif_and_jpeg_extension_load():
    root = shared_dataset("hymenoptera")
    for rel in ("train/ants/imageNotFound.gif", "train/ants/formica.jpeg"):
        img = load_rgb(root / rel)
        assert img.mode == "RGB" and min(img.size) > 16
    used = {os.path.relpath(r.path, root) for r in scan_dataset(root).samples["train"]}
    assert {"train/ants/imageNotFound.gif", "train/ants/formica.jpeg"} <= used


# --- the scan command ----------------------------------------------------------------------------


# In-process: `python -m finetune_core` itself (its re-exec with the malloc settings) is tested in
# test_memory.py; here a fresh interpreter would only add the cost of importing torch again.


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m finetune_core ARGS`."""
    code = cli_main([*args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_scan_command_json(messy, capsys):
    code, stdout, stderr = run_cli(capsys, "scan", str(messy), "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert {"layout", "classes", "splits", "problems", "usable"} <= set(report)
    assert report["layout"] == "splits" and report["usable"] is True
    assert report["splits"]["train"] == {"cat": 12, "dog": 13}  # huge.png is fine at Pillow's own limit
    assert report["problems"] and all({"path", "problem", "severity"} <= set(p) for p in report["problems"])
    assert {os.path.basename(p["path"]) for p in report["problems"]} >= {"empty.jpg", "truncated.jpg", "leak.png"}


def test_scan_command_readable_report(messy, capsys):
    code, stdout, _ = run_cli(capsys, "scan", str(messy))
    assert code == 0
    assert "cat" in stdout and "truncated image" in stdout and "Usable: yes" in stdout


def test_scan_command_exit_2_with_one_line_reason(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    for target, text in ((tmp_path / "missing", "no such folder"), (tmp_path, "no dataset found"),
                         (tmp_path / "file.txt", "not a folder")):
        code, _, stderr = run_cli(capsys, "scan", str(target))
        assert code == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], stderr
