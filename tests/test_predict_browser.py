"""The Predict page in a real Chromium (issue 24's browser test): drop a folder's zip on A folder and
download its CSV, drop a photo on Classify and toggle its heatmap. A tiny run made in-process stands
in for a real model, so the test times the page, not the model."""
from __future__ import annotations

import io
import json
import zipfile

import pandas as pd
import pytest

from conftest import make_tiny_dataset, tiny_train_config
from finetune_core import calibration
from finetune_core.engine import train
from test_e2e_browser import wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_run(dashboard_server):
    """A calibrated tiny run (with its "not sure" reference) in the session dashboard's runs folder."""
    server = dashboard_server
    minimum, calibration.MIN_CALIBRATION_IMAGES = calibration.MIN_CALIBRATION_IMAGES, 4
    try:
        config = tiny_train_config(make_tiny_dataset(server["data"] / "tiny"), epochs=2)
        train(config, server["runs"] / "tiny-run", cache_dir="")
    finally:
        calibration.MIN_CALIBRATION_IMAGES = minimum
    return server["runs"] / "tiny-run"


def test_predict_page_classifies_a_zipped_folder_downloads_the_csv_and_shows_heatmaps(dashboard_server,
                                                                                      chromium_page, tiny_run):
    """The session's dashboard and Chromium (conftest), shared with the other browser files."""
    page, url = chromium_page, dashboard_server["url"]
    photos = list(pd.read_csv(tiny_run / "predictions.csv")["path"])
    assert json.loads((tiny_run / "status.json").read_text())["state"] == "completed"
    page.goto(f"{url}/Predict")
    wait_idle(page)

    page.get_by_role("tab", name="A folder").click()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, p in enumerate(photos):
            zf.write(p, f"photos/{k}.png")
        zf.writestr("photos/broken.jpg", b"not a photo")
    page.locator(".st-key-predict_zip input[type=file]").set_input_files(
        {"name": "photos.zip", "mimeType": "application/zip", "buffer": buf.getvalue()})
    page.get_by_text(f"{len(photos) + 1} images:", exact=False).wait_for()
    wait_idle(page)
    with page.expect_download() as download:
        page.get_by_role("button", name="Download the CSV").click()
    table = pd.read_csv(download.value.path(), keep_default_na=False)
    assert len(table) == len(photos) + 1 and {"answer", "not_sure", "why", "error"} <= set(table.columns)
    assert table.set_index("file").loc["broken.jpg", "error"]  # named, the rest classified
    assert (table["answer"] != "").sum() == len(photos)

    page.get_by_role("tab", name="Classify your images").click()
    page.locator(".st-key-classify_upload input[type=file]").set_input_files(photos[0])
    wait_idle(page)
    assert page.get_by_text("why ", exact=False).count() == 0  # no heatmap until asked
    page.locator(".st-key-heatmaps_classify").get_by_text("Show where the model looks", exact=True).click()
    wait_idle(page)
    page.locator("[data-testid='stImageCaption']", has_text="why ").first.wait_for()
