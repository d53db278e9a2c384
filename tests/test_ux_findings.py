"""A first user's findings on the Home, Train and Compare pages, fixed in the library."""
from __future__ import annotations

import io
import zipfile

import pytest

from finetune_core import models


def test_the_backbones_line_and_what_trains_count_the_same_parameters():
    """The Train page showed the backbone with its ImageNet head (1000 classes) beside what trains
    with the dataset's head: two totals for one model. Both now count the model a run fine-tunes."""
    for backbone, n_classes in (("tiny_lite", 3), ("efficientnet_lite0", 10)):
        total = models.trainable_summary(backbone, "all", n_classes=n_classes).split(": ")[1].split(" parameters")[0]
        assert models.backbone_details(backbone, n_classes).startswith(f"{total} parameters with a {n_classes}-class")
    assert models.parameter_count("efficientnet_lite0") - models.parameter_count("efficientnet_lite0", 2) == 1281 * 998


def test_the_preset_names_the_backbone_and_size_in_force_and_a_replaced_backbone_brings_its_size():
    from finetune_core.config import native_image_size, preset_description, preset_for_machine

    text = preset_description("fast", "efficientnet_lite0", 224)
    assert "efficientnet_lite0 at 224 px" in text.lower().replace("efficientnet-lite0", "efficientnet_lite0")
    assert "Lite2 at 260" not in text
    assert native_image_size("efficientnet_lite2") == 260 and native_image_size("resnet18") == 224
    assert native_image_size("no_such_net") is None
    config, note = preset_for_machine("fast", ["efficientnet_lite0"])  # Lite2's weights are not here
    assert (config.backbone, config.image_size) == ("efficientnet_lite0", 224) and "224 px" in note


def _epoch_rows(run, speeds):
    for epoch, images_per_s in enumerate(speeds, start=1):
        run.append_metrics({"kind": "epoch", "epoch": epoch, "step": epoch, "loss": 0.5, "images_per_s": images_per_s})


def test_a_cost_estimate_uses_the_last_epochs_speed_not_the_runs_average():
    import pandas as pd

    from finetune_core import analysis

    # 100 images an epoch: the first in 50 s (decoding), then 10 s each; the rows hold the running average
    rows = pd.DataFrame({"kind": "epoch", "epoch": [1, 2, 3], "images_per_s": [100 / 50, 200 / 60, 300 / 70]})
    assert analysis.last_epoch_speed(rows) == pytest.approx(10.0)
    assert analysis.last_epoch_speed(rows.iloc[:1]) is None  # one epoch: the status's average stands
    assert analysis.long_run_warning(3000.0, 50) == ""
    assert "about 2.2 hours (1,000 epochs)" in analysis.long_run_warning(8000.0, 1000)


def test_the_train_page_follows_the_backbones_size_warns_under_a_rates_field_and_when_a_run_is_hours(
        dashboard_env):
    """One page session for three findings: a changed backbone brings its native size and the
    preset's text names it; a rate far out is warned under its field; a run of hours is warned
    about, at the speed of a recorded run's last epoch."""
    from conftest import TINY_BACKBONE, make_dataset, page
    from test_compare_predict import write_run
    from test_pages import tiny_recipe, use_folder

    at = page("pages/1_Train.py").run()
    assert at.session_state["preset"] == "fast" and at.number_input(key="f_image_size").value == 260
    at.selectbox(key="f_backbone").set_value("efficientnet_lite0").run()
    assert at.number_input(key="f_image_size").value == 224
    assert any("EfficientNet-Lite0 at 224 px" in c.value for c in at.caption)
    assert not any("Lite2 at 260" in c.value for c in at.caption)

    data = make_dataset(dashboard_env / "tiny", per_class=4, test_per_class=2)  # 8 training images
    use_folder(at, data)
    tiny_recipe(at, lr="100")  # the page tests' tiny recipe, but 1000 epochs at a rate far out
    at.number_input(key="f_epochs").set_value(1000)
    at.run()
    # a run like this one measured 8 images/s in its first epoch, 1 image/s in its second (average 1.8)
    run = write_run(dashboard_env / "runs", "20260101-000000-measured", metrics=False, backbone=TINY_BACKBONE,
                    image_size=32, batch_size=8, train_stages="all", device=at.session_state["f_device"],
                    images_per_s=16 / 9)
    _epoch_rows(run, [8.0, 16 / 9])
    at.run()
    lr_column = next(c for c in at.columns if any(t.key == "f_lr" for t in c.get("text_input")))
    assert any(w.value.startswith("Learning rate 100 is far above") for w in lr_column.warning)
    assert any(c.value.startswith("This run: about") and "1.0 images/s" in c.value for c in at.caption), [c.value for c in at.caption if "This run" in c.value or "disabled" in c.value]
    assert any("about 2.2 hours (1,000 epochs)" in w.value for w in at.warning), [w.value for w in at.warning]
    assert not at.exception


def test_a_run_left_unnamed_is_named_by_backbone_preset_and_time_its_twins_and_cells_too(tmp_path):
    import time

    from finetune_core import sweep
    from finetune_core.config import comparison_configs, default_run_name, preset_config

    config = preset_config("fast", data=str(tmp_path))
    at_1405 = time.strptime("2026-12-07 14:05", "%Y-%m-%d %H:%M")
    assert default_run_name(config, at_1405) == "efficientnet_lite2 · fast · 14:05"
    names = [c.name for c in comparison_configs(config, True, True)]
    assert names[0].startswith("efficientnet_lite2 · fast · ") and names[1] == f"{names[0]} (scratch)"
    cells = sweep.sweep_configs(config, [1e-3], [10.0], group="g")
    assert cells[0].name.startswith("efficientnet_lite2 · fast · ") and cells[0].name.endswith("lr=0.001 x10")
    assert comparison_configs(config.replace(name="mine"))[0].name == "mine"  # a given name is kept


def test_a_one_epoch_runs_axes_end_at_epoch_1_not_2():
    import pandas as pd

    from finetune_core import plots

    frame = pd.DataFrame({"kind": ["batch", "batch", "epoch"], "epoch": [0.5, 1.0, 1.0], "step": [1, 2, 2],
                          "loss": [0.9, 0.7, 0.7], "train_acc": [0.5, 0.6, 0.6], "test_acc": [None, None, 0.8]})
    figure = plots.overlay_figure({"run": frame}, x="epoch")
    assert all(tuple(axis.range) == (0, 1.03) for axis in figure.select_xaxes())


def _zip(entries: dict) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    buf.seek(0)
    return buf


def test_an_upload_says_which_files_the_scan_skips_and_a_flat_zip_is_refused_leaving_nothing(tmp_path):
    from conftest import write_image
    from finetune_core import datastore

    png = write_image(tmp_path / "a.png").read_bytes()
    target = datastore.extract_zip(_zip({"pets/cat/a.png": png, "pets/dog/b.png": png, "pets/cat/notes.txt": b"x",
                                         "pets/dog/.DS_Store": b"x"}), tmp_path / "data", "pets.zip")
    summary, skipped = datastore.unpacked_summary(target)
    assert skipped == 2 and summary.startswith(f"Unpacked 4 files into {target}; the scan skips 2 of them")
    assert "1 file that is not an image (notes.txt)" in summary and "1 hidden file (.DS_Store)" in summary
    clean = datastore.extract_zip(_zip({"birds/owl/a.png": png, "birds/tit/b.png": png}), tmp_path / "data", "b.zip")
    assert datastore.unpacked_summary(clean) == (f"Unpacked 2 files into {clean}.", 0)
    with pytest.raises(datastore.UploadError, match="flat.zip: its 2 images are at the top of the archive"):
        datastore.extract_zip(_zip({"flat/a.png": png, "flat/b.png": png}), tmp_path / "data", "flat.zip")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["b", "pets"]  # no leftover folder


def test_the_train_page_unpacks_an_uploaded_zip_once_and_warns_about_the_files_it_skips(dashboard_env, monkeypatch):
    from conftest import page, write_image
    from finetune_core import datastore

    summaries = []
    summary = datastore.unpacked_summary
    monkeypatch.setattr(datastore, "unpacked_summary", lambda folder: (summaries.append(folder), summary(folder))[1])

    photos = {f"pets/{c}/{c}_{k}.png": write_image(dashboard_env / "p.png", (40 * k + i * 120, 90, 200 - 30 * k),
                                                    (32, 32)).read_bytes()
              for i, c in enumerate(("cat", "dog")) for k in range(4)}
    upload = _zip(photos | {"pets/cat/notes.txt": b"x"})
    at = page("pages/1_Train.py").run()
    at.radio(key="data_source").set_value("Upload a zip").run()
    at.file_uploader(key="zip_upload").set_value([("pets.zip", upload.getvalue(), "application/zip")]).run()
    assert not at.exception
    assert any("the scan skips 1 of them: 1 file that is not an image (notes.txt)" in w.value for w in at.warning)
    at.run()  # a rerun keeps the folder and its summary (the zip is not unpacked twice: 'already exists')
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("notes.txt" in w.value for w in at.warning) and len(summaries) == 1  # the folder walked once
    clean = _zip({name: photo for name, photo in photos.items()})  # no file skipped, in a folder named 'skips'
    at.file_uploader(key="zip_upload").set_value([("skips.zip", clean.getvalue(), "application/zip")]).run()
    assert not at.warning and any("Unpacked 8 files into" in s.value and "skips" in s.value for s in at.success)


def test_a_run_of_too_few_steps_to_learn_is_warned_about_before_launch(tmp_path):
    """58 photos at batch 64 for 2 epochs is 2 steps: a first user got a model at chance, no word why."""
    from conftest import make_dataset
    from finetune_core import analysis
    from finetune_core.config import TrainConfig
    from finetune_core.data import scan_dataset

    report = scan_dataset(make_dataset(tmp_path / "d", per_class=29, test_per_class=2, size=(16, 16)))
    few = analysis.too_few_steps_warning(TrainConfig(data=str(report.root), batch_size=64, epochs=2), report)
    assert few.startswith("Only 2 training steps in all (58 training images at batch 64 is 1 step per epoch")
    assert analysis.too_few_steps_warning(TrainConfig(data=str(report.root), batch_size=8, epochs=30), report) == ""
    held_out = TrainConfig(data=str(report.root), batch_size=8, epochs=3, val_fraction=0.5)  # 29 images: 4 steps x 3
    assert analysis.too_few_steps_warning(held_out, report).startswith("Only 12 training steps in all (29 training")
