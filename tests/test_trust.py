"""Trust the answers (issue 24): calibrated confidences, "not sure", whole folders, heatmaps."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny_dataset, tiny_train_config
from finetune_core import calibration
from finetune_core.__main__ import main as cli_main
from finetune_core.engine import train
from finetune_core.predict import Predictor, export_bundle


def overconfident_logits(n=400, classes=3, seed=0):
    """Logits of a model right 70% of the time that claims ~99%: what fine-tuning often gives."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    predicted = torch.where(torch.rand(n, generator=g) < 0.7, labels, torch.randint(0, classes, (n,), generator=g))
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), predicted] += 6.0
    return logits, labels


def test_temperature_fitting_lowers_the_nll_and_keeps_every_answer():
    logits, labels = overconfident_logits()
    t = calibration.fit_temperature(logits, labels)
    assert t > 1.5  # over-confident: the logits are divided down
    assert calibration.nll(logits, labels, t) < calibration.nll(logits, labels) - 0.1
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))
    before = calibration.expected_calibration_error(torch.softmax(logits, 1), labels)
    after = calibration.expected_calibration_error(torch.softmax(logits / t, 1), labels)
    assert after < before / 2


def test_the_threshold_answers_the_most_images_at_the_stated_error_rate():
    # confidences 0.9..0.5; wrong: the 3rd and the 6th most confident
    probs = torch.tensor([[p, 1 - p] for p in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)])
    labels = torch.tensor([0, 0, 1, 0, 0, 1, 0, 0])
    assert calibration.choose_threshold(probs, labels, max_error=0.2) == pytest.approx(0.75)  # 1 of 5 wrong
    assert calibration.choose_threshold(probs, labels, max_error=0.0) == pytest.approx(0.9)
    assert calibration.choose_threshold(probs[2:3], labels[2:3], max_error=0.05) == 1.0  # answers none


@pytest.fixture(scope="module", autouse=True)
def calibrate_tiny_splits():
    """The tiny sets hold out 6-8 images, under the product's minimum (calibration.MIN_CALIBRATION_IMAGES,
    tested in test_misleading_numbers.py): these tests are about what a calibrated run does with its T."""
    minimum, calibration.MIN_CALIBRATION_IMAGES = calibration.MIN_CALIBRATION_IMAGES, 4
    yield
    calibration.MIN_CALIBRATION_IMAGES = minimum


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    """A tiny run with a validation split, trained once for the module."""
    tmp = tmp_path_factory.mktemp("trust")
    config = tiny_train_config(make_tiny_dataset(tmp / "tiny"), epochs=3, val_fraction=0.25)
    train(config, tmp / "runs" / "run", cache_dir="")
    return tmp / "runs" / "run"


def test_a_finished_run_records_its_temperature_and_predict_uses_it(calibrated_run):
    status = json.loads((calibrated_run / "status.json").read_text())
    t, record = status["temperature"], status["calibration"]
    assert record["fitted_on"] == "val" and record["temperature"] == t and 0 < record["threshold"] <= 1
    assert record["nll_after"] <= record["nll_before"] + 1e-6
    assert {"ece_before", "ece_after", "bins_before", "bins_after"} <= set(record)
    predictor = Predictor.from_run(calibrated_run)
    assert predictor.temperature == t and predictor.threshold == record["threshold"]
    frame = pd.read_csv(calibrated_run / "predictions.csv")
    live = predictor.predict_files(list(frame["path"]), top_k=1)
    # predictions.csv's confidence is the calibrated one the Predict page and the CLI give
    assert np.allclose(frame["confidence"], [p.top[0][1] for p in live], atol=1e-4)
    # the other checkpoint was not calibrated: its probabilities are the plain softmax, with no threshold
    other = "last" if status["selected_checkpoint"] == "best" else "best"
    if (calibrated_run / f"checkpoint_{other}.pt").exists():
        unfitted = Predictor.from_run(calibrated_run, other)
        assert (unfitted.temperature, unfitted.threshold) == (1.0, 0.0)


def test_a_run_without_a_validation_split_cross_validates_its_temperature(tmp_path):
    config = tiny_train_config(make_tiny_dataset(tmp_path / "tiny"), epochs=1)
    status = train(config, tmp_path / "run", cache_dir="")
    assert status["calibration"]["fitted_on"] == "test" and "cross-validation" in status["calibration"]["method"]


def test_a_run_from_before_calibration_predicts_with_temperature_1(calibrated_run, tmp_path):
    import shutil

    run = shutil.copytree(calibrated_run, tmp_path / "old")
    status = json.loads((run / "status.json").read_text())
    del status["temperature"], status["calibration"]
    (run / "status.json").write_text(json.dumps(status))
    old = Predictor.from_run(run)
    assert old.temperature == 1.0 and old.threshold == 0.0


@pytest.mark.slow
def test_the_temperature_and_threshold_reach_the_bundle_and_its_onnx_example(calibrated_run, tmp_path, capsys):
    """The README's onnxruntime lines (run as written) divide by the bundle's temperature and answer
    "not sure" below its threshold, as the Predict page does."""
    from conftest import ROOT

    bundle = export_bundle(calibrated_run, tmp_path / "bundle")
    predictor = Predictor.from_run(calibrated_run)
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["temperature"] == predictor.temperature and meta["not_sure_threshold"] == predictor.threshold
    reloaded = Predictor.from_bundle(bundle)
    assert (reloaded.temperature, reloaded.threshold) == (predictor.temperature, predictor.threshold)
    # the distance rule (novelty.py) stays with the run: the bundle says so, and answers by confidence alone
    assert meta["not_sure_rule"].startswith("confidence only") and reloaded.reference is None
    image = pd.read_csv(calibrated_run / "predictions.csv")["path"][0]
    readme = (ROOT / "README.md").read_text()
    code = readme.split("<!-- onnxruntime example -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = code.replace('"bundle/', f'"{bundle}/').replace('"photo.jpg"', f'"{image}"')
    for threshold in (0.0, 1.0):  # answers always, never
        meta["not_sure_threshold"] = threshold
        (bundle / "model.json").write_text(json.dumps(meta))
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own lines
        expected = reloaded.predict_files([image], top_k=1, threshold=threshold)[0]
        assert np.abs(namespace["probs"].max() - expected.top[0][1]) < 1e-4  # calibrated, as Predict's
        assert capsys.readouterr().out.strip() == expected.answer
    assert expected.answer == "not sure"


def test_the_folder_csv_equals_the_single_image_predictions_and_names_unreadable_files(calibrated_run, tmp_path,
                                                                                        capsys):
    """`predict --run R DIR --csv out.csv --threshold P`: batched (a batch of 4 over 10 images), the
    same answers and confidences as one image at a time, `not sure` below the threshold, an
    unreadable file skipped and named."""
    import shutil

    from finetune_core import predict

    folder = tmp_path / "photos"
    frame = pd.read_csv(calibrated_run / "predictions.csv")
    (folder / "sub").mkdir(parents=True)
    for k, path in enumerate(frame["path"]):  # sub-folders included
        shutil.copy(path, folder / ("sub" if k % 2 else "") / f"{k}.png")
    (folder / "broken.jpg").write_bytes(b"not a photo")
    (folder / "notes.txt").write_text("not an image file: left out")
    predictor = Predictor.from_run(calibrated_run)
    confidences = sorted(p.top[0][1] for p in predictor.predict_files(predict.image_files(folder)) if p.top)
    threshold = (confidences[len(confidences) // 2 - 1] + confidences[len(confidences) // 2]) / 2  # half unsure
    code = cli_main(["predict", "--run", str(calibrated_run), str(folder), "--csv", str(tmp_path / "out.csv"),
                     "--threshold", str(threshold), "--batch-size", "4"])
    out = capsys.readouterr()
    assert code == 2 and "broken.jpg" in out.err and "not an image" in out.err  # named; the rest classified
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert len(table) == len(frame) + 1 and "notes.txt" not in " ".join(table["file"])
    for row in table.itertuples():
        single = predictor.predict_files([row.file], top_k=3, threshold=threshold)[0]
        if single.error:
            assert row.file.endswith("broken.jpg") and row.error and row.answer == ""
            continue
        assert row.answer == single.answer and float(row.confidence) == pytest.approx(single.top[0][1], abs=1e-5)
        assert row.top1 == f"{single.top[0][0]} ({single.top[0][1]:.3f})"
    assert (table["answer"] == "not sure").sum() == len(frame) // 2
    assert f"{len(frame) // 2} not sure" in out.out


@pytest.mark.slow
def test_the_predict_page_shows_calibration_not_sure_heatmaps_and_classifies_a_zipped_folder(calibrated_run,
                                                                                             dashboard_env):
    """The Confidence tab (reliability diagram, ECE before and after, the threshold), Classify with
    "not sure" and a heatmap, A folder from a zip: a table and its CSV."""
    import io
    import shutil
    import zipfile

    from conftest import charts, page

    run = shutil.copytree(calibrated_run, dashboard_env / "runs" / calibrated_run.name)
    record = json.loads((run / "status.json").read_text())["calibration"]
    at = page("pages/3_Predict.py").run()
    assert not at.exception
    reliability = [c for c in charts(at) if len(c["data"]) == 3 and c["data"][0].get("name") == "calibrated"]
    assert len(reliability) == 1  # the diagonal, before, after
    assert any(f"{record['ece_before']:.3f}** before, **{record['ece_after']:.3f}** after" in m.value
               for m in at.markdown)
    assert any("unlike the training photos" in m.value and f"{record['test_not_sure_combined']:.1%}" in m.value
               for m in at.markdown)  # the second rule, "not sure" for photos of no class
    assert at.slider(key=f"threshold_{run.name}").value == pytest.approx(record["threshold"], abs=0.01)
    at.slider(key=f"threshold_{run.name}").set_value(1.0).run()  # nothing is sure enough
    paths = list(pd.read_csv(run / "predictions.csv")["path"])
    at.file_uploader(key="classify_upload").set_value([("one.png", open(paths[0], "rb").read(), "image/png")])
    at.toggle(key="heatmaps_classify").set_value(True).run()
    assert not at.exception
    assert any("one.png" in m.value and "**not sure**, " in m.value and "low confidence" in m.value and "(top guess" in m.value
               for m in at.markdown)
    assert any((i.proto.imgs[0].caption or "").startswith("why ") for i in at.get("image"))  # the heatmap
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, p in enumerate(paths):
            zf.write(p, f"photos/{k}.png")
        zf.writestr("photos/broken.jpg", b"not a photo")
    at.file_uploader(key="predict_zip").set_value([("photos.zip", buf.getvalue(), "application/zip")]).run()
    assert not at.exception
    table = [d.value for d in at.dataframe if "answer" in d.value.columns][0]
    assert len(table) == len(paths) + 1 and set(table["answer"]) == {"not sure", ""}
    assert "broken.jpg" in set(table["file"])  # named, relative to the zip (its one folder unwrapped)
    assert at.get("download_button")


def test_the_heatmap_is_laid_over_the_whole_photo_as_the_photo_beside_it_is_framed(calibrated_run):
    """Predict showed the whole photo beside a heatmap over the centre crop: two framings. The page's
    overlay is the whole photo, the map on the part the model sees, the rest faded."""
    from PIL import Image

    from finetune_core import heatmaps

    mapper = heatmaps.Heatmapper(Predictor.from_run(calibrated_run))
    size = mapper.predictor.image_size  # 32: the test view squeezes to 37 x 37 and keeps the centre 32
    wide = Image.new("RGB", (160, 40), (40, 60, 220))
    (crop,), _ = mapper.overlays([wide])
    (whole,), explained = mapper.overlays([wide], framing="photo")
    assert crop.size == (size, size) and whole.size == (160, 40)  # the photo's own shape
    left, top, right, bottom = heatmaps.crop_box(160, 40, size)
    assert (left, top, right, bottom) == (9, 2, 147, 37)  # 37 px squeezed, cut at 2 and 34 (torchvision rounds so)
    pixels = np.asarray(whole).astype(int)
    faded = (np.array([40, 60, 220]) * heatmaps.OUTSIDE_SHADE + 255 * (1 - heatmaps.OUTSIDE_SHADE)).astype(int)
    assert (pixels[:, :left] == faded).all() and (pixels[:top] == faded).all()  # not seen: the photo, faded
    assert (np.abs(pixels[top:bottom, left:right] - faded).sum(axis=2) > 0).all()  # the map on what it sees
    assert explained == mapper.heatmaps([wide])[1]
    with pytest.raises(ValueError, match="framing"):
        mapper.overlays([wide], framing="centre")


def test_a_folders_unreadable_files_are_named_with_their_whole_reason(calibrated_run, dashboard_env):
    """The error cell of A folder's table was too narrow: it showed the start of the file's path and
    cut off why. The column is wide, and each unreadable file's reason is written out below the table."""
    import shutil

    from conftest import page, write_image

    shutil.copytree(calibrated_run, dashboard_env / "runs" / calibrated_run.name)
    folder = dashboard_env / "data" / "to classify"
    write_image(folder / "fine.png")
    (folder / "a photo from the camera roll.jpg").write_bytes(b"not a photo at all")
    at = page("pages/3_Predict.py").run()
    at.text_input(key="predict_folder").set_value(str(folder)).run()
    at.button(key="predict_folder_go").click().run()
    assert not at.exception
    (table,) = [d for d in at.dataframe if "error" in d.value.columns]
    assert json.loads(table.proto.columns)["error"]["width"] == "large"
    why = table.value.set_index("file").loc["a photo from the camera roll.jpg", "error"]
    assert why.startswith("not an image that can be read (")  # the reason, not the path it began with
    # the file named whole, as one piece of code (with the folder's path left in, '/.../to classify/a photo...'
    # was cut at its spaces into pieces of code)
    assert [m.value for m in at.markdown if "`a photo from the camera roll.jpg`" in m.value and why in m.value]
    assert any(e.label.startswith("Unreadable: 1 file") for e in at.expander)


def test_the_confidence_tab_says_a_capped_threshold_misses_its_error_rate_instead_of_claiming_it(
        calibrated_run, dashboard_env):
    """A first user read "chosen for at most 5% errors" above a warning that 30.7% of the answers were
    wrong: a threshold the cap stopped says it aims at 5% and cannot reach it."""
    import shutil

    from conftest import page

    run = dashboard_env / "runs" / calibrated_run.name
    shutil.copytree(calibrated_run, run)
    status = json.loads((run / "status.json").read_text())
    status["calibration"].update(threshold=0.28, threshold_capped=True, test_error_answered=0.307, max_error=0.05)
    (run / "status.json").write_text(json.dumps(status))
    at = page("pages/3_Predict.py").run()
    assert not at.exception
    said = " ".join(m.value for m in at.markdown if "run's threshold" in m.value)
    assert "cannot reach" in said and "was chosen for at most" not in said, said
    assert [w.value for w in at.warning if "30.7% of the test photos it answers are wrong" in w.value]
