"""The data root: the example dataset, safe zip uploads, the folder browser, server settings."""
from __future__ import annotations

import io
import os
import stat
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, make_dataset
from finetune_core import datastore
from finetune_core.data import scan_dataset


def zip_bytes(entries: dict[str, bytes], links: dict[str, str] | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    buf.seek(0)
    return buf


def test_a_zip_with_no_images_is_refused_and_leaves_nothing_behind(tmp_path):
    """A first user's zip of notes was unpacked, refused by the scan, and left in the data folder,
    where it was then listed as a dataset."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("notes/a/readme.txt", "no photos here")
        zf.writestr("notes/b/.hidden.png", b"x")  # hidden: not an image the scan reads
    with pytest.raises(datastore.UploadError, match="notes.zip: holds no images .*nothing was kept"):
        datastore.extract_zip(buf, tmp_path / "data", "notes.zip")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_example_dataset_is_real_digits_written_once(example_digits):
    """The session's copy (conftest), as the page tests use it: asked for again, it is not rewritten."""
    path = example_digits
    report = scan_dataset(path)
    assert report.usable and report.classes == [str(d) for d in range(10)]
    assert sum(sum(s.values()) for s in report.splits.values()) == 1797
    assert not report.warnings
    stamp = (path / "0").stat().st_mtime
    assert datastore.ensure_example_dataset(path.parent) == path and (path / "0").stat().st_mtime == stamp


def test_a_zipped_dataset_unpacks_and_is_found(tmp_path):
    src = make_dataset(tmp_path / "src" / "pets", per_class=10)
    entries = {f"pets/{p.relative_to(src)}": p.read_bytes() for p in src.rglob("*.png")}
    target = datastore.extract_zip(zip_bytes(entries), tmp_path / "data", "My Pets.zip")
    assert target == tmp_path / "data" / "My_Pets"
    assert [e.name for e in datastore.list_datasets(tmp_path / "data")] == ["My_Pets"]
    assert scan_dataset(target).classes == ["cat", "dog"]


@pytest.mark.parametrize("entries,links,text", [
    ({"../evil.txt": b"x"}, None, "points outside the archive"),
    ({"/etc/evil.txt": b"x"}, None, "points outside the archive"),
    ({"a/../../evil.txt": b"x"}, None, "points outside the archive"),
    ({}, {"link": "/etc/passwd"}, "symbolic link"),
])
def test_archives_that_escape_are_refused_and_leave_nothing(tmp_path, entries, links, text):
    with pytest.raises(datastore.UploadError, match=text):
        datastore.extract_zip(zip_bytes(entries, links), tmp_path / "data", "bad.zip")
    assert list((tmp_path / "data").iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_size_and_file_count_limits(tmp_path):
    big = zip_bytes({"a/x.bin": b"\0" * 5000})
    with pytest.raises(datastore.UploadError, match="over the limit"):
        datastore.extract_zip(big, tmp_path / "data", "big.zip", max_unpacked=1000)
    many = zip_bytes({f"a/{i}.txt": b"x" for i in range(20)})
    with pytest.raises(datastore.UploadError, match="20 entries is over the limit of 10"):
        datastore.extract_zip(many, tmp_path / "data", "many.zip", max_files=10)
    with pytest.raises(datastore.UploadError, match="not a zip"):
        datastore.extract_zip(io.BytesIO(b"not a zip at all"), tmp_path / "data", "fake.zip")


def nothing_written(tmp_path) -> bool:
    """The refused upload left no file: not in the data root, not beside it."""
    return [p for p in tmp_path.rglob("*") if p != tmp_path / "data"] == []


def test_a_zip_bomb_is_refused_by_its_compression_ratio(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pets/cat/fine.png", b"\x89PNG" + bytes(range(256)) * 40)  # small: any ratio is fine
        zf.writestr("pets/cat/bomb.bmp", b"\0" * (20 * 1024**2))  # 20 MB of zeros in about 20 kB
    buf.seek(0)
    with pytest.raises(datastore.UploadError, match=r"bomb.bmp' unpacks to 21.0 MB .* compression ratio over 100:1"):
        datastore.extract_zip(buf, tmp_path / "data", "bomb.zip")  # well under the 2 GB size limit
    assert nothing_written(tmp_path)


def test_a_zip_of_one_file_more_than_the_limit_is_refused_before_anything_is_written(tmp_path):
    """50,001 tiny files (the limit plus one: writing the test's 100,000 took seconds)."""
    import time

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(datastore.MAX_ZIP_FILES + 1):
            zf.writestr(f"a/{i}.png", b"")
    buf.seek(0)
    t0 = time.perf_counter()
    with pytest.raises(datastore.UploadError, match="50001 entries is over the limit of 50000"):
        datastore.extract_zip(buf, tmp_path / "data", "many.zip")
    assert time.perf_counter() - t0 < 30
    assert nothing_written(tmp_path)


def test_a_file_that_is_not_a_zip_or_an_entry_that_cannot_be_unpacked_is_refused(tmp_path):
    from conftest import write_image

    photo = write_image(tmp_path / "src" / "photo.png")
    with pytest.raises(datastore.UploadError, match="photo.zip: not a zip archive"):
        datastore.extract_zip(io.BytesIO(photo.read_bytes()), tmp_path / "data", "photo.zip")
    damaged = zip_bytes({"pets/cat/a.png": photo.read_bytes()}).getvalue()
    at = damaged.index(photo.read_bytes()[100:120])  # flip a byte inside the stored image: its CRC fails
    damaged = damaged[:at] + bytes([damaged[at] ^ 0xFF]) + damaged[at + 1:]
    with pytest.raises(datastore.UploadError, match="entry 'pets/cat/a.png' cannot be unpacked"):
        datastore.extract_zip(io.BytesIO(damaged), tmp_path / "data", "damaged.zip")
    (tmp_path / "src" / "photo.png").unlink()
    (tmp_path / "src").rmdir()
    assert nothing_written(tmp_path)


def test_a_full_disk_while_unpacking_is_a_message_and_leaves_nothing(tmp_path, monkeypatch):
    import builtins
    import errno

    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and ".upload-" in str(file):
            def write(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(datastore.UploadError, match="could not be written under .*No space left on device"):
        datastore.extract_zip(zip_bytes({"pets/cat/a.png": b"x" * 100}), tmp_path / "data", "pets.zip")
    monkeypatch.undo()
    assert nothing_written(tmp_path)


def test_an_image_over_pillows_pixel_limit_is_refused_in_an_upload_and_in_predict(tmp_path, monkeypatch):
    from PIL import Image

    from conftest import write_image
    from finetune_core.predict import PredictError, image_from_bytes

    src = make_dataset(tmp_path / "src" / "pets", per_class=3)
    big = write_image(src / "train" / "cat" / "huge.png", size=(300, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 300 x 200 = 60,000: over twice the limit
    entries = {f"pets/{p.relative_to(src)}": p.read_bytes() for p in src.rglob("*.png")}
    target = datastore.extract_zip(zip_bytes(entries), tmp_path / "data", "pets.zip")
    report = scan_dataset(target)
    problems = {p.path.rsplit("/", 1)[-1]: p.problem for p in report.problems}
    assert "decompression bomb" in problems["huge.png"] and report.usable  # skipped, named, the rest trains
    assert all("huge.png" not in r.path for r in report.samples["train"])
    with pytest.raises(PredictError, match="huge.png: too many pixels"):
        image_from_bytes(big.read_bytes(), "huge.png")


def test_browser_never_leaves_the_data_root(tmp_path):
    (tmp_path / "root" / "a" / "b").mkdir(parents=True)
    folder, subs = datastore.browse(tmp_path / "root", "a")
    assert folder == (tmp_path / "root" / "a").resolve() and subs == ["b"]
    for escape in ("..", "../..", "/etc", "a/../../.."):
        folder, _ = datastore.browse(tmp_path / "root", escape)
        assert folder == (tmp_path / "root").resolve()


def test_server_binds_to_localhost_with_an_upload_limit():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] in ("127.0.0.1", "localhost")
    assert 0 < config["server"]["maxUploadSize"] <= 1000
    assert config["server"]["enableXsrfProtection"] is True


def test_the_library_never_imports_streamlit():
    for path in (ROOT / "finetune_core").glob("*.py"):
        text = path.read_text()
        assert "import streamlit" not in text and "from streamlit" not in text, path


def test_hotdog_download_is_checksum_verified(tmp_path, monkeypatch):
    import urllib.request

    fake = zip_bytes({"hotdog/train/hotdog/1.png": b"not the real set"})
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: fake)
    with pytest.raises(datastore.UploadError, match="expected fba480ffa8aa7e0febbb511d181409f899b9baa5"):
        datastore.download_hotdog(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left


def test_hotdog_download_offline_says_so(tmp_path, monkeypatch):
    import urllib.request

    def offline(url, timeout):
        raise OSError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(datastore.UploadError, match="are you offline"):
        datastore.download_hotdog(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_dashboard_reads_datasets_only_inside_the_data_root_unless_allowed(tmp_path, monkeypatch):
    root = tmp_path / "data"
    inside = make_dataset(root / "pets", per_class=2, test_per_class=1)
    outside = make_dataset(tmp_path / "elsewhere", per_class=2, test_per_class=1)
    (root / "link").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("TUNEBOARD_DATA_ROOT", str(root))
    monkeypatch.delenv(datastore.EXTRA_ROOTS_VARIABLE, raising=False)
    assert datastore.check_data_folder(inside) == inside.resolve()
    for refused in (outside, root / ".." / "elsewhere", root / "link", "/etc", "~"):
        with pytest.raises(datastore.FolderNotAllowed) as exc:
            datastore.check_data_folder(refused)
        text = str(exc.value)
        assert str(Path(refused).expanduser().resolve()) in text and f"the data folder {root.resolve()}" in text
        assert datastore.EXTRA_ROOTS_VARIABLE in text
    monkeypatch.setenv(datastore.EXTRA_ROOTS_VARIABLE, os.pathsep.join([str(tmp_path / "elsewhere"), "/srv/x"]))
    assert datastore.check_data_folder(outside) == outside.resolve()
    assert datastore.check_data_folder(root / "link") == outside.resolve()
    with pytest.raises(datastore.FolderNotAllowed, match="outside the folders .*/srv/x"):
        datastore.check_data_folder("/etc")
    monkeypatch.setenv(datastore.EXTRA_ROOTS_VARIABLE, "*")
    assert datastore.check_data_folder("/etc") == Path("/etc").resolve()


def test_a_refused_path_says_where_a_relative_one_was_read_and_what_to_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBOARD_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.delenv(datastore.EXTRA_ROOTS_VARIABLE, raising=False)
    (tmp_path / "data").mkdir()
    with pytest.raises(datastore.FolderNotAllowed) as exc:
        datastore.check_data_folder("../shared/datasets/seefood")
    assert "(../shared/datasets/seefood is relative: it is read from the data folder)" in str(exc.value)
    assert "Copy the images there" in str(exc.value)
    with pytest.raises(datastore.FolderNotAllowed) as exc:
        datastore.check_weights_file("/etc/weights.pt")
    assert "reads weights files only from there. Copy the file there" in str(exc.value)
    assert "is relative" not in str(exc.value)
    with pytest.raises(datastore.FolderNotAllowed, match="is not a path the dashboard can read"):
        datastore.check_weights_file("weights\x00.pt")  # pasted with a NUL byte: a message, not a traceback


def test_a_relative_folder_is_read_inside_the_data_folder(tmp_path, monkeypatch):
    """Typed below "Browse <data folder>", a bare name means a folder there, not in the server's
    working folder."""
    root = tmp_path / "data"
    pets = make_dataset(root / "pets", per_class=2, test_per_class=1)
    monkeypatch.setenv("TUNEBOARD_DATA_ROOT", str(root))
    monkeypatch.delenv(datastore.EXTRA_ROOTS_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    assert datastore.check_data_folder("pets") == pets.resolve()
    assert datastore.check_data_folder("data/pets") == pets.resolve()  # the data folder named (a first user)
    (root / "data" / "pets").mkdir(parents=True)
    assert datastore.check_data_folder("data/pets") == (root / "data" / "pets").resolve()  # one that exists wins
    with pytest.raises(datastore.FolderNotAllowed):
        datastore.check_data_folder("../elsewhere")
