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


def test_example_dataset_is_real_digits_written_once(tmp_path):
    path = datastore.ensure_example_dataset(tmp_path)
    report = scan_dataset(path)
    assert report.usable and report.classes == [str(d) for d in range(10)]
    assert sum(sum(s.values()) for s in report.splits.values()) == 1797
    assert not report.warnings
    stamp = (path / "0").stat().st_mtime
    assert datastore.ensure_example_dataset(tmp_path) == path and (path / "0").stat().st_mtime == stamp


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
