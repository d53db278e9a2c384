"""Download a backbone's weights as a job: progress, Stop, a failure that names the model.
No network: the downloads are fakes that write the hub cache's own layout in chunks, in the child
process WeightsDownloads starts (so they are module-level functions it can import)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from finetune_core import downloads, models
from finetune_core.jobs import wait_until

from fake_downloads import CHUNK, CHUNKS, NAME

TESTS = Path(__file__).resolve().parent
SLOW_FAKE, UNREACHABLE = "fake_downloads:slow_fake_download", "fake_downloads:unreachable_download"
GARBLED = "fake_downloads:garbled_download"


@pytest.fixture
def hub_home(tmp_path, monkeypatch) -> Path:
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # where the download's child process finds the fakes
    return tmp_path / "hf" / "hub"


def test_a_download_reports_progress_and_home_lists_the_backbone_once_it_is_cached(hub_home, monkeypatch):
    monkeypatch.setenv("FAKE_DOWNLOAD_PAUSE", "0.15")
    assert models.weights_to_download(NAME, "auto") and NAME not in models.offline_backbones()
    jobs = downloads.WeightsDownloads(fetch=SLOW_FAKE)
    jobs.start(NAME)
    assert jobs.start(NAME)["state"] == "running"  # a second click is the same download
    seen = []
    assert wait_until(lambda: seen.append(jobs.download(NAME)) or seen[-1]["state"] != "running", timeout=60)
    assert seen[-1]["state"] == "completed", seen[-1]
    partway = [s for s in seen if s["total"] and 0 < s["bytes"] < s["total"]]
    assert partway and partway[0]["total"] == CHUNK * CHUNKS  # bytes so far against the file's size
    assert "of 0.0 MiB" in downloads.progress_text(partway[0]) and "%" in downloads.progress_text(partway[0])
    assert not models.weights_to_download(NAME, "auto") and NAME in models.offline_backbones()


def test_stop_ends_the_download_and_leaves_nothing_that_passes_as_cached(hub_home, monkeypatch):
    monkeypatch.setenv("FAKE_DOWNLOAD_PAUSE", "5")  # it would take 30 s
    jobs = downloads.WeightsDownloads(fetch=SLOW_FAKE)
    blobs = hub_home / f"models--timm--{NAME}" / "blobs"
    blobs.mkdir(parents=True)
    anothers = blobs / ("a" * 64 + ".incomplete")  # a run fetching the same weights: not this download's
    anothers.write_bytes(b"partial")
    jobs.start(NAME)
    assert wait_until(lambda: jobs.download(NAME)["bytes"] > 0, timeout=60)
    assert list(blobs.glob("*.incomplete"))
    process = jobs._downloads[NAME].process
    started = time.monotonic()
    assert jobs.stop(NAME)["state"] == "stopped"
    assert time.monotonic() - started < downloads.STOP_WAIT_S and process.poll() is not None
    assert list(blobs.glob("*")) == [anothers], "its partial blob is deleted, another's kept"
    assert models.hub_cached_file(models.backbone_spec(NAME)) is None and models.weights_to_download(NAME, "auto")
    assert jobs.download(NAME)["state"] == "stopped"


def test_a_child_that_prints_what_is_not_text_or_not_json_still_ends_its_download(hub_home):
    """The page's Train button waits on the download's end: a line it cannot read is skipped, not the
    end of following the child (the follower died, the download stayed 'running' and Stop hung)."""
    jobs = downloads.WeightsDownloads(fetch=GARBLED)
    jobs.start(NAME)
    assert wait_until(lambda: jobs.download(NAME)["state"] != "running", timeout=60)
    assert jobs.download(NAME)["state"] == "completed"


def test_a_failed_download_names_the_model(hub_home):
    jobs = downloads.WeightsDownloads(fetch=UNREACHABLE)
    jobs.start(NAME)
    assert wait_until(lambda: jobs.download(NAME)["state"] != "running", timeout=60)
    ended = jobs.download(NAME)
    assert ended["state"] == "failed" and NAME in ended["message"] and "Network is unreachable" in ended["message"]


def test_the_real_download_passes_huggingface_hubs_progress_on_and_offline_names_the_model(hub_home, monkeypatch):
    """models.download_weights gives hf_hub_download a tqdm class whose updates reach `report`;
    with HF_HUB_OFFLINE set it refuses, naming the model, without calling the hub."""
    import huggingface_hub

    def fake_hf_hub_download(repo_id, filename, cache_dir, etag_timeout, tqdm_class):
        bar = tqdm_class(total=300, unit="B")
        for _ in range(3):
            bar.update(100)
        bar.close()
        return str(Path(cache_dir) / "x.safetensors")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    reports = []
    models.download_weights(NAME, lambda done, total: reports.append((done, total)))
    assert reports[-1] == (300, 300) and (100, 300) in reports
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.WeightsUnavailable, match=NAME):
        models.download_weights(NAME)


@pytest.mark.slow
def test_the_train_page_says_the_weights_are_not_downloaded_and_offers_a_download_with_progress_and_stop(
        dashboard_env, hub_home, monkeypatch):
    """Before launch: "not downloaded (about N MiB)" and Download; during it a progress bar, Stop,
    Train disabled, and Home lists it; Stop ends it and the page says so."""
    import tuneboard_ui
    from conftest import page

    monkeypatch.setenv("FAKE_DOWNLOAD_PAUSE", "5")  # 30 s: it is still running when Stop is clicked
    at = train_page_choosing_the_backbone(dashboard_env, monkeypatch, SLOW_FAKE)
    warned = [w.value for w in at.warning if "not downloaded" in w.value]
    assert warned and f"{NAME} are not downloaded (about 6.1 MiB)" in warned[0], [w.value for w in at.warning]
    at.button(key="download_weights").click().run()
    assert at.button(key="train_button").disabled and at.button(key="stop_download")
    assert wait_until(lambda: tuneboard_ui.weights_downloads().download(NAME)["bytes"] > 0, timeout=60)
    home = page("app.py").run()  # Home shows the download among what is running
    assert any(f"Downloading the weights of {NAME}: 0.0 of 0.0 MiB" in bar.proto.text for bar in home.get("progress"))
    at.run()
    at.button(key="stop_download").click().run()
    assert tuneboard_ui.weights_downloads().download(NAME)["state"] == "stopped"
    assert [w.value for w in at.warning if "not downloaded" in w.value]  # still not here
    assert any("The last download was stopped: nothing was kept." in c.value for c in at.caption)
    assert not at.button(key="train_button").disabled and not at.exception


def test_stop_after_the_child_completed_says_the_weights_were_kept(hub_home, monkeypatch):
    """Stop pressed at 100%: the child had finished, its outcome not yet read: the page said "stopped:
    nothing was kept" while the weights sat in the cache."""
    jobs = downloads.WeightsDownloads(fetch=GARBLED)  # completes at once
    record_end = jobs._record_end
    monkeypatch.setattr(jobs, "_record_end", lambda *a: (time.sleep(0.5), record_end(*a)))
    jobs.start(NAME)
    assert wait_until(lambda: jobs._downloads[NAME].process.poll() is not None, timeout=60)
    assert jobs.stop(NAME)["state"] == "completed"
    assert models.hub_cached_file(models.backbone_spec(NAME)) is not None


def train_page_choosing_the_backbone(dashboard_env, monkeypatch, fetch: str):
    """The Train page on a tiny dataset with NAME chosen, its downloads made by `fetch` (a fake)."""
    import tuneboard_ui
    from conftest import make_dataset, page

    monkeypatch.setattr(downloads, "FETCH", fetch)
    tuneboard_ui.weights_downloads.clear()  # a manager made now, with the fake
    data = make_dataset(dashboard_env / "tiny", per_class=4, test_per_class=2)
    at = page("pages/1_Train.py").run()
    at.radio(key="data_source").set_value("A folder path").run()
    at.text_input(key="data_path_text").set_value(str(data)).run()
    at.selectbox(key="f_backbone").set_value(NAME).run()
    return at


@pytest.mark.slow
def test_after_a_failed_download_train_is_refused_naming_the_backbone_and_the_error_reads_as_written(
        dashboard_env, hub_home, monkeypatch):
    """A first user's Download failed (no network) and Train stayed enabled: the run then downloaded
    the weights again and failed. Train is refused, naming the backbone and what to do; the error
    ("<urlopen error ...>") is shown as its text, not half turned into code."""
    import tuneboard_ui

    at = train_page_choosing_the_backbone(dashboard_env, monkeypatch, "fake_downloads:offline_download")
    assert not at.button(key="train_button").disabled  # not downloaded: the run would fetch them
    at.button(key="download_weights").click().run()
    assert wait_until(lambda: tuneboard_ui.weights_downloads().download(NAME)["state"] == "failed", timeout=60)
    at.run()
    assert at.button(key="train_button").disabled
    refusal = [c.value for c in at.caption if c.value.startswith("Train is disabled")]
    assert refusal and f"the download of {NAME}'s ImageNet weights failed" in refusal[0], refusal
    assert "press Download to try again" in refusal[0] and "'none (random init)'" in refusal[0]
    (shown,) = [e.value for e in at.error if "urlopen" in e.value]
    assert "\\<urlopen error \\[Errno -2\\] Name or service not known\\>" in shown, shown  # escaped, no code
    at.radio(key="f_weights_kind").set_value("none (random init)").run()  # one of the ways out it names
    assert not at.button(key="train_button").disabled and not at.exception
