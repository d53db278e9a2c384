"""Part 2 of the dashboard: analysis, export bundles, and the Compare and Predict pages."""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import charts, make_tiny_dataset, page, plotly_array, tiny_train_config
from finetune_core import analysis
from finetune_core.__main__ import main as cli_main
from finetune_core.data import load_rgb
from finetune_core.engine import train
from finetune_core.predict import MAX_IMAGE_BYTES, Predictor, bundle_zip_bytes, export_bundle
from finetune_core.prepare import normalize_batch
from finetune_core.runs import RunDir, list_runs


def hand_predictions():
    # true:      a a a b b c
    # predicted: a b a b c c
    return pd.DataFrame({"true": list("aaabbc"), "predicted": list("abab" "cc"),
                         "confidence": [.9, .6, .8, .7, .5, .99], "loss": [.1, .9, .2, .3, 1.2, .01],
                         "path": [f"{i}.png" for i in range(6)]})


def test_confusion_matrix_and_per_class_metrics_equal_a_hand_computed_case():
    preds = hand_predictions()
    assert analysis.confusion(preds, ["a", "b", "c"]).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    m = analysis.per_class_metrics(preds, ["a", "b", "c"]).set_index("class")
    # a: precision 2/2, recall 2/3; b: precision 1/2, recall 1/2; c: precision 1/2, recall 1/1
    assert m.loc["a", "precision"] == 1.0 and m.loc["a", "recall"] == pytest.approx(2 / 3)
    assert m.loc["b", "precision"] == 0.5 and m.loc["b", "recall"] == 0.5
    assert m.loc["c", "precision"] == 0.5 and m.loc["c", "recall"] == 1.0
    assert m.loc["a", "f1"] == pytest.approx(0.8) and m.loc["c", "f1"] == pytest.approx(2 / 3)
    assert list(m["support"]) == [3, 2, 1]


def test_gallery_filters_and_sorts():
    preds = hand_predictions()
    worst = analysis.gallery(preds, mistakes_only=True, sort="loss")
    assert list(worst["path"]) == ["4.png", "1.png"]
    only_a = analysis.gallery(preds, true_class="a", sort="least confident")
    assert list(only_a["confidence"]) == [.6, .8, .9]


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """Two finished tiny runs in one group that differ in lr and param_groups, trained once for the
    module. Tests read them; a test that changes runs works on a copy (dashboard_runs)."""
    tmp = tmp_path_factory.mktemp("finished")
    config = tiny_train_config(make_tiny_dataset(tmp / "tiny"), epochs=2, group="g1")
    runs = tmp / "runs"
    train(config.replace(name="fine"), runs / "20260101-000000-fine", cache_dir="")
    train(config.replace(name="single", param_groups=False, lr=0.02), runs / "20260101-000001-single", cache_dir="")
    return runs


def copy_runs(src, dst):
    """A private copy of a runs folder. Checkpoints are hard links: they are only ever replaced
    (written aside, then renamed), never changed in place, so the shared ones stay intact."""
    def link_checkpoints(source, target):
        if source.endswith((".pt", ".safetensors")):
            try:
                os.link(source, target)
                return target
            except OSError:
                pass
        return shutil.copy2(source, target)

    shutil.copytree(src, dst, copy_function=link_checkpoints)
    return dst


def test_run_labels_are_unique_when_names_repeat():
    from finetune_core.runs import RunInfo

    infos = [RunInfo(path="a", id="1-x", name="resnet18"), RunInfo(path="b", id="2-x", name="resnet18"),
             RunInfo(path="c", id="3-y", name="other")]
    assert analysis.run_labels(infos) == {"1-x": "resnet18 · 1-x", "2-x": "resnet18 · 2-x", "3-y": "other"}


def test_live_curves_of_jobs_with_one_name_are_kept_apart():
    jobs = [{"run_id": "1-q", "name": "digits quick start"}, {"run_id": "2-q", "name": "digits quick start"},
            {"run_id": "3-z", "name": "scratch"}]
    assert analysis.job_labels(jobs) == {"1-q": "digits quick start · 1-q", "2-q": "digits quick start · 2-q",
                                         "3-z": "scratch"}


def write_run(runs, run_id, state="completed", metrics=True, tags=(), dataset=None, group="", **settings_and_status):
    """A run folder written by hand: config.json, status.json, meta.json, a metrics row or none."""
    from finetune_core.config import settings

    run = RunDir(runs / run_id)
    run.path.mkdir(parents=True)
    config = {k: v for k, v in settings_and_status.items() if k in settings()}
    status = {k: v for k, v in settings_and_status.items() if k not in settings()}
    run.write_config({"config": {"name": run_id.split("-")[-1], "group": group, **config},
                      **({"dataset": dataset} if dataset else {})})
    run.write_status(state=state, **status)
    run.write_meta(tags=list(tags))
    if metrics:
        run.append_metrics({"kind": "epoch", "epoch": 1, "step": 1, "loss": 0.5})
    return run


def test_compare_table_leads_with_the_results_formats_numbers_and_dashes_what_has_no_effect(tmp_path):
    write_run(tmp_path, "20260101-000000-fine", lr=5e-5, head_lr_mult=10.0, param_groups=True, tags=["book"],
              test_acc=0.93871, best_test_acc=0.9412, train_acc=0.9, loss=0.22049, images_per_s=17.333)
    write_run(tmp_path, "20260101-000001-single", state="stopped", lr=5e-5, head_lr_mult=10.0, param_groups=False)
    table, differing = analysis.compare_table(list_runs(tmp_path))
    assert list(table.columns[:7]) == ["run", "state", "test acc of the kept model", "kept model",
                                       "final train acc", "final loss", "tags"]
    fine, single = table.set_index("run").loc["fine"], table.set_index("run").loc["single"]
    assert (fine["test acc of the kept model"], fine["kept model"], fine["final loss"]) == ("0.939", "final epoch",
                                                                                          "0.220")
    assert fine["tags"] == "book" and fine["images/s"] == "17.3"
    assert fine["lr"] == "5e-05" and fine["head_lr_mult"] == "10" and fine["param_groups"] == "on"  # not 10.000000
    assert single["head_lr_mult"] == "-" and single["test acc of the kept model"] == "-"  # one group; no metrics yet
    assert set(differing) == {"head_lr_mult", "param_groups"}
    assert list(table.columns[7:9]) == ["head_lr_mult", "param_groups"]  # what differs, next to the results


def test_compare_table_tells_runs_with_one_name_apart(tmp_path):
    for k in range(2):
        write_run(tmp_path, f"2026010{k}-000000-stopme")
    table = analysis.compare_table(list_runs(tmp_path))[0]
    assert table["run"].is_unique and all(r.startswith("stopme · ") for r in table["run"])


def test_the_test_fraction_shows_as_not_applying_to_a_dataset_with_its_own_test_split(tmp_path):
    write_run(tmp_path, "20260101-000000-split", dataset={"root": "/d/hotdog", "layout": "splits"})
    write_run(tmp_path, "20260101-000001-flat", dataset={"root": "/d/flowers", "layout": "flat"})
    table = analysis.compare_table(list_runs(tmp_path))[0].set_index("run")
    assert table.loc["split", "test_fraction"] == "-" and table.loc["flat", "test_fraction"] == "0.2"


def test_compare_opens_on_runs_that_have_curves(tmp_path):
    """The newest group's queued run (nothing logged yet) is not among the runs Compare opens on."""
    write_run(tmp_path, "20260101-000000-old", group="a")
    write_run(tmp_path, "20260101-000001-fine", group="b")
    write_run(tmp_path, "20260101-000002-scratch", group="b")
    write_run(tmp_path, "20260101-000003-single", state="queued", metrics=False, group="b")
    infos = list_runs(tmp_path)
    assert sorted(analysis.default_selection(infos)) == ["20260101-000001-fine", "20260101-000002-scratch"]
    empty = tmp_path / "empty"
    write_run(empty, "20260101-000000-a", state="queued", metrics=False)
    write_run(empty, "20260101-000001-b", state="queued", metrics=False)
    assert len(analysis.default_selection(list_runs(empty))) == 2  # none has curves: the newest two still


def test_a_runs_name_shows_as_typed_in_markdown_and_in_charts():
    from finetune_core import plots

    name = "**bold** <b>x</b> & [link](http://e.com) my_run"
    shown = analysis.markdown_text(name)
    assert "\\*\\*bold\\*\\*" in shown and "\\[link\\]" in shown and "my\\_run" in shown
    frame = pd.DataFrame({"kind": ["batch", "epoch"], "epoch": [0.5, 1.0], "step": [1, 2], "loss": [0.7, 0.6],
                          "train_acc": [0.5, 0.6], "test_acc": [None, 0.7], "elapsed_s": [1.0, 2.0]})
    figure = plots.overlay_figure({name: frame})
    names = {t.name for t in figure.data}
    assert names == {"**bold** &lt;b&gt;x&lt;/b&gt; &amp; [link](http://e.com) my_run"}  # plotly draws it as typed


def test_display_values_read_as_a_person_writes_them():
    assert [analysis.display_value(v) for v in (10.0, 5e-05, 0.001, 0.93871, 128, True, None, float("nan"),
                                                 "all", (0.5, 0.5, 0.5))] == \
        ["10", "5e-05", "0.001", "0.9387", "128", "on", "-", "-", "all", "0.5, 0.5, 0.5"]


def test_runs_without_metrics_are_named(tmp_path):
    write_run(tmp_path, "20260101-000000-trained")
    write_run(tmp_path, "20260101-000001-empty", state="stopped", metrics=False)
    assert [i.name for i in analysis.runs_without_metrics(list_runs(tmp_path))] == ["empty"]


def test_predict_opens_on_the_best_run_of_the_newest_group():
    from finetune_core.runs import RunInfo, RunScore

    infos = [RunInfo(path="c", id="3-scratch", group="g2", score=RunScore(test_acc=0.53)),   # newest first
             RunInfo(path="b", id="2-fine", group="g2", score=RunScore(test_acc=0.94)),
             RunInfo(path="a", id="1-old", group="g1", score=RunScore(test_acc=0.97))]
    assert analysis.best_of_newest_group(infos) == "2-fine"
    assert analysis.best_of_newest_group([RunInfo(path="d", id="4-alone"), *infos]) == "4-alone"
    assert analysis.best_of_newest_group([]) is None


def test_the_gallery_pages_through_every_image():
    frame = pd.DataFrame({"path": [f"{i}.png" for i in range(65)]})
    first, pages = analysis.page_of(frame, 1, 30)
    last, _ = analysis.page_of(frame, 3, 30)
    assert pages == 3 and list(first["path"])[:2] == ["0.png", "1.png"] and list(last["path"]) == ["60.png", "61.png",
                                                                                                    "62.png", "63.png",
                                                                                                    "64.png"]
    assert analysis.page_of(frame, 9, 30)[0].equals(last)  # kept within range


def test_messages_show_paths_and_patterns_as_code_not_markdown():
    message = ("/data/my photos: no dataset found: expected class folders holding images (root/<class>/*) "
               "or splits (root/train/<class>/*, root/test/<class>/*); see file_name_here")
    shown = analysis.markdown_message(message, paths=("/data/my photos",))
    assert shown.startswith("`/data/my photos`: no dataset found")
    assert "(`root/<class>/*`)" in shown and "(`root/train/<class>/*`, `root/test/<class>/*`)" in shown
    assert "file\\_name\\_here" in shown  # no italics from underscores either
    # a relative path as typed, inside the full path the message names: one piece of code, not two
    assert analysis.markdown_message("/srv/data/nosuchdir: does not exist", paths=("nosuchdir",)) == \
        "`/srv/data/nosuchdir`: does not exist"


def test_an_exceptions_text_in_angle_brackets_reads_as_written_with_its_paths_as_code():
    """A run that failed offline said "(URLError: `<urlopen` error [Errno -2] Name or service not `known>`)"
    on the Live tab: the first and last words of "<urlopen error ...>" made code. They are text now."""
    message = ("WeightsUnavailable: resnet18 could not be downloaded (URLError: <urlopen error [Errno -2] Name or "
               "service not known>). Place resnet18-f37072fd.pth (from https://download.pytorch.org/models/r.pth) "
               "in /srv/torch/hub/checkpoints")
    shown = analysis.markdown_message(message)
    assert "(URLError: \\<urlopen error \\[Errno -2\\] Name or service not known\\>)" in shown, shown
    assert "`https://download.pytorch.org/models/r.pth`" in shown and shown.endswith("`/srv/torch/hub/checkpoints`")
    assert "`" not in shown.split("(from")[0]  # nothing before the paths turned into code
    assert analysis.markdown_message("a <module> and <class 'ValueError'>") == \
        "a `<module>` and \\<class 'ValueError'\\>"  # a whole <name> is still a pattern


@pytest.mark.slow
def test_compare_table_marks_the_settings_that_differ(finished_runs):
    table, differing = analysis.compare_table(list_runs(finished_runs))
    assert set(differing) == {"lr", "param_groups", "head_lr_mult"}  # the multiplier: 10 against "-"
    assert set(table["run"]) == {"fine", "single"} and (table["test acc of the kept model"] != "-").all()
    metrics = analysis.metrics_of(list_runs(finished_runs))
    assert set(metrics["run"]) == {"fine", "single"} and (metrics["kind"] == "epoch").sum() == 4


@pytest.fixture(scope="module")
def fine_bundle(finished_runs, tmp_path_factory):
    """The "fine" run exported once for the module (torch.export and ONNX take seconds each); the
    tests that use it only read it."""
    return export_bundle(finished_runs / "20260101-000000-fine", tmp_path_factory.mktemp("export") / "bundle")


@pytest.mark.slow
def test_export_bundle_reloads_with_equal_outputs(finished_runs, fine_bundle, tmp_path, capsys):
    run = finished_runs / "20260101-000000-fine"
    original = Predictor.from_run(run)
    bundle = fine_bundle
    assert {p.name for p in bundle.iterdir()} == {"model.json", "weights.safetensors", "model.pt2", "model.onnx"}
    assert (bundle / "weights.safetensors").stat().st_mode & 0o044 == 0o044  # readable by those it is shared with
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["preprocessing"]["image_size"] == 32

    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = original.model(x)
        reloaded = Predictor.from_bundle(bundle).model(x)
        exported = torch.export.load(str(bundle / "model.pt2")).module()(x)
    assert torch.allclose(expected, reloaded, atol=1e-6)
    assert torch.allclose(expected, exported, atol=1e-5)
    onnx_logits = onnx_run(bundle, x)  # onnxruntime alone, any batch size
    assert onnx_logits.shape == (4, 2) and np.abs(onnx_logits - expected.numpy()).max() < 1e-4
    assert np.abs(onnx_run(bundle, x[:1]) - expected[:1].numpy()).max() < 1e-4

    (tmp_path / "bundle.zip").write_bytes(bundle_zip_bytes(bundle))
    assert zipfile.is_zipfile(tmp_path / "bundle.zip")
    image = pd.read_csv(run / "predictions.csv")["path"][0]
    import tempfile

    temp_before = set(os.listdir(tempfile.gettempdir()))
    code = cli_main(["predict", "--run", str(tmp_path / "bundle.zip"), image, "--json"])  # in-process
    out = capsys.readouterr()
    assert code == 0, out.err
    left = [n for n in set(os.listdir(tempfile.gettempdir())) - temp_before if n.startswith("tuneboard-bundle")]
    assert left == []  # the zip is read in memory: no temporary folder is left behind
    top = json.loads(out.out)[0]["top"]
    live = original.predict_files([image], top_k=2)[0].top
    assert top[0]["class"] == live[0][0] and top[0]["probability"] == pytest.approx(live[0][1], abs=1e-5)


def onnx_run(bundle, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"images": x.numpy()})[0]


@pytest.mark.slow
def test_the_exported_models_average_the_mirror_image_when_the_run_predicts_with_it(finished_runs, tmp_path):
    """With flip test-time augmentation the bundle's model.onnx and model.pt2 give what the Predict
    page gives: the logits averaged with those of the mirrored batch."""
    runs = copy_runs(finished_runs, tmp_path / "runs")
    run = runs / "20260101-000000-fine"
    record = json.loads((run / "config.json").read_text())
    record["config"]["tta_flip"] = True
    (run / "config.json").write_text(json.dumps(record))
    predictor = Predictor.from_run(run)
    assert predictor.tta_flip
    bundle = export_bundle(run, tmp_path / "bundle")
    assert json.loads((bundle / "model.json").read_text())["preprocessing"]["tta_flip"] is True
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        plain, mirrored = predictor.model(x), predictor.model(x.flip(-1))
        exported = torch.export.load(str(bundle / "model.pt2")).module()(x)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the mirror image changes the logits here
    averaged = ((plain + mirrored) / 2).numpy()
    assert np.abs(onnx_run(bundle, x) - averaged).max() < 1e-4
    assert np.abs(exported.numpy() - averaged).max() < 1e-4


@pytest.mark.slow
def test_an_onnx_export_failure_keeps_the_rest_of_the_bundle_and_says_why(finished_runs, tmp_path, monkeypatch,
                                                                          capsys):
    from finetune_core import predict

    def no_exporter(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'onnxscript'")

    monkeypatch.setattr(predict, "export_onnx", no_exporter)
    code = cli_main(["export", "--run", str(finished_runs / "20260101-000000-fine"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 0 and "model.onnx could not be exported" in err and "onnxscript" in err, err
    assert {p.name for p in (tmp_path / "b").iterdir()} == {"model.json", "weights.safetensors", "model.pt2"}
    assert "onnxscript" in json.loads((tmp_path / "b" / "model.json").read_text())["onnx_error"]
    assert Predictor.from_bundle(tmp_path / "b").classes == ["cat", "dog"]  # the bundle still works


@pytest.mark.slow
def test_the_readmes_onnxruntime_lines_classify_an_image_as_tuneboard_does(finished_runs, fine_bundle, capsys):
    """The README's lines, run as written (with this bundle and image in place of the example's
    paths): the same preprocessing, logits and class as the Predict page's."""
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    code = readme.split("<!-- onnxruntime example -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "import torch" not in code and "finetune_core" not in code  # onnxruntime alone
    run = finished_runs / "20260101-000000-fine"
    image = pd.read_csv(run / "predictions.csv")["path"][0]
    code = code.replace('"bundle/', f'"{fine_bundle}/').replace('"photo.jpg"', f'"{image}"')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own lines
    printed = capsys.readouterr().out.strip()
    predictor = Predictor.from_run(run)
    ours = normalize_batch(predictor.preprocess(load_rgb(image)).unsqueeze(0), predictor.mean, predictor.std,
                           channels_last=False)
    assert np.abs(namespace["x"] - ours.numpy()).max() < 1e-5  # their preprocessing is ours
    with torch.no_grad():
        expected = predictor.model(ours).numpy()
    assert np.abs(namespace["logits"] - expected[0] / predictor.temperature).max() < 1e-4  # calibrated
    assert printed == predictor.predict_files([image], top_k=1)[0].answer  # a class, or "not sure"


@pytest.mark.slow
def test_predict_refuses_what_is_not_an_image(finished_runs):
    predictor = Predictor.from_run(finished_runs / "20260101-000000-fine")
    assert "not an image" in predictor.predict_bytes(b"hello, I am text", "notes.txt").error
    assert "empty" in predictor.predict_bytes(b"", "nothing.png").error
    huge = predictor.predict_bytes(b"\0" * (26 * 1024 * 1024), "big.jpg").error
    assert "over the 25 MB limit" in huge


# --- curves ------------------------------------------------------------------------------------


def logged_metrics(rows: list[dict]) -> pd.DataFrame:
    """metrics.csv as a run writes it (every column, empty where a row has no value), read back."""
    import io

    from finetune_core.runs import METRIC_COLUMNS

    return pd.read_csv(io.StringIO(pd.DataFrame(rows, columns=METRIC_COLUMNS).to_csv(index=False)))


def test_a_run_with_a_validation_split_shows_its_validation_curve_and_final_test_marker():
    from finetune_core import plots

    batches = [{"kind": "batch", "epoch": e, "loss": 1.0 - e / 4, "train_acc": 0.5 + e / 8, "elapsed_s": e}
               for e in (0.5, 1.0, 1.5, 2.0)]
    with_val = logged_metrics(batches + [
        {"kind": "epoch", "epoch": 1, "loss": 0.7, "train_acc": 0.6, "val_loss": 0.6, "val_acc": 0.7, "elapsed_s": 1.1},
        {"kind": "epoch", "epoch": 2, "loss": 0.5, "train_acc": 0.7, "val_loss": 0.5, "val_acc": 0.8, "elapsed_s": 2.1},
        {"kind": "test", "epoch": 2, "test_loss": 0.55, "test_acc": 0.75, "elapsed_s": 2.5}])
    book = logged_metrics(batches + [
        {"kind": "epoch", "epoch": 1, "loss": 0.7, "train_acc": 0.6, "test_loss": 0.6, "test_acc": 0.65,
         "elapsed_s": 1.1},
        {"kind": "epoch", "epoch": 2, "loss": 0.5, "train_acc": 0.7, "test_loss": 0.5, "test_acc": 0.85,
         "elapsed_s": 2.1}])
    fig = plots.overlay_figure({"val run": with_val, "book run": book})
    accuracy = [t for t in fig.data if t.xaxis == "x3"]
    by_run = {name: [t for t in accuracy if t.name == name] for name in ("val run", "book run")}

    curve, final = by_run["val run"]
    assert list(curve.x) == [1, 2] and list(curve.y) == [0.7, 0.8] and "validation acc" in curve.hovertemplate
    assert curve.mode == "lines+markers"
    assert final.mode == "markers" and list(final.x) == [2] and list(final.y) == [0.75]
    assert "final test acc" in final.hovertemplate and final.marker.color == curve.line.color
    assert not final.showlegend  # one legend entry per run

    (book_curve,) = by_run["book run"]  # without validation: the test accuracy of every epoch, as before
    assert list(book_curve.x) == [1, 2] and list(book_curve.y) == [0.65, 0.85]
    assert "test acc" in book_curve.hovertemplate
    titles = [a.text for a in fig.layout.annotations]
    assert "validation acc" in titles[2] and "test" in titles[2]

    against_time = [t for t in plots.overlay_figure({"val run": with_val}, x="elapsed_s").data if t.xaxis == "x3"]
    assert [list(t.x) for t in against_time] == [[1.1, 2.1], [2.5]]
    only_book = plots.overlay_figure({"book run": book})
    assert [a.text for a in only_book.layout.annotations] == ["train loss", "train acc", "test acc"]


# --- pages -------------------------------------------------------------------------------------


@pytest.fixture
def dashboard_runs(dashboard_env, finished_runs):
    """The finished runs, copied into this test's own runs folder (the pages rename and delete)."""
    return copy_runs(finished_runs, dashboard_env / "runs")


@pytest.mark.slow
def test_compare_page_overlays_runs_and_highlights_differences(dashboard_runs):
    at = page("pages/2_Compare.py").run()
    assert not at.exception
    assert sorted(at.multiselect(key="compare_runs").value) == sorted(p.name for p in dashboard_runs.iterdir())
    spec = charts(at)[0]
    assert {t["name"] for t in spec["data"]} == {"fine", "single"}
    assert any("settings that differ" in c.value for c in at.caption)
    from finetune_core import plots

    ids = {i.name: i.id for i in list_runs(dashboard_runs)}  # one colour per run, from its id, as on Train
    assert {t["name"]: t["line"]["color"] for t in spec["data"]} == {
        name: plots.run_colors(ids.values())[run_id] for name, run_id in ids.items()}
    at.radio(key="compare_x").set_value("wall time").run()
    assert charts(at)[0]["layout"]["xaxis"]["title"]["text"] == "wall time (s)"
    at.slider(key="compare_smoothing").set_value(0.6).run()
    assert sum(t.get("hoverinfo") == "skip" for t in charts(at)[0]["data"]) == len(spec["data"])  # raw, faint


def test_compare_page_confirms_a_save_and_asks_before_deleting(dashboard_env):
    runs = dashboard_env / "runs"
    write_run(runs, "20260101-000000-keep")
    target = "20260101-000001-gone"
    write_run(runs, target, state="stopped", metrics=False)
    at = page("pages/2_Compare.py").run()
    assert at.multiselect(key="compare_runs").value == ["20260101-000000-keep"]  # it opens on runs with curves
    at.multiselect(key="compare_runs").set_value(["20260101-000000-keep", target]).run()
    assert any("No curves for **gone** (stopped)" in c.value for c in at.caption)  # why it is not in the legend
    at.selectbox(key="manage_run").set_value(target).run()
    at.text_input(key=f"name-{target}").set_value("renamed")
    at.text_input(key=f"tags-{target}").set_value("best, keep")
    at.button(key="save_meta").click().run()
    assert RunDir(runs / target).read_meta() == {"name": "renamed", "tags": ["best", "keep"]}
    assert any("Saved: renamed" in s.value for s in at.success)  # shown after the rerun, not wiped by it
    assert "renamed" in at.selectbox(key="manage_run").format_func(target)  # the new name, at once
    assert any(o.startswith("renamed · ") for o in at.multiselect(key="compare_runs").options)  # the run chips
    at.button(key="delete_run").click().run()
    assert (runs / target).exists() and any("cannot be undone" in w.value for w in at.warning)  # it asks first
    at.button(key="delete_cancel").click().run()
    assert (runs / target).exists() and not at.warning
    at.button(key="delete_run").click().run()
    at.button(key="delete_confirm").click().run()
    assert not (runs / target).exists() and any("Deleted renamed" in s.value for s in at.success)
    assert not at.exception


@pytest.mark.slow
def test_predict_opens_on_the_groups_best_run_and_pages_through_the_gallery(dashboard_runs):
    fine, single = dashboard_runs / "20260101-000000-fine", dashboard_runs / "20260101-000001-single"
    RunDir(fine).write_status(test_acc=0.94, best_test_acc=0.94)
    # the newest run, a worse twin in the same group: its final model, the one it keeps, scores 0.53
    # (its best test epoch, 0.99, is not what it keeps)
    RunDir(single).write_status(test_acc=0.53, best_test_acc=0.99)
    preds = pd.read_csv(fine / "predictions.csv")
    pd.concat([preds] * 9, ignore_index=True).head(65).to_csv(fine / "predictions.csv", index=False)
    at = page("pages/3_Predict.py").run()
    assert at.selectbox(key="predict_run").value == fine.name
    picker = at.selectbox(key="predict_run")
    score = "test acc 0.940 of the kept model (final epoch)"
    assert score in picker.options[picker.index]  # the picker and the header say the same
    assert any(c.value.endswith(f"{score} on 65 test images") for c in at.caption)
    assert any("65 images: 1-30 shown, page 1 of 3" in c.value for c in at.caption)
    at.number_input(key="gallery_page").set_value(3).run()
    assert any("61-65 shown, page 3 of 3" in c.value for c in at.caption)
    assert sum(c.value.startswith(("right:", "WRONG:")) for c in at.caption) == 5 and not at.exception


@pytest.mark.slow
def test_predict_page_gallery_confusion_and_uploads(dashboard_runs):
    at = page("pages/3_Predict.py").run()
    assert not at.exception
    heatmap = [c for c in charts(at) if c["data"][0]["type"] == "heatmap"][0]
    run = dashboard_runs / at.selectbox(key="predict_run").value
    preds = pd.read_csv(run / "predictions.csv")
    assert plotly_array(heatmap["data"][0]["z"]).sum() == len(preds)
    per_class = at.dataframe[0].value  # the per-class metrics under the confusion matrix
    assert list(per_class["class"]) == ["cat", "dog"] and per_class["support"].sum() == len(preds)

    import sklearn.datasets

    photo = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "flower.jpg")
    uploader = at.file_uploader(key="classify_upload")
    assert uploader.proto.max_upload_size_mb == MAX_IMAGE_BYTES // 2**20  # the limit it states is the one that applies
    with open(photo, "rb") as f:
        uploader.set_value([("flower.jpg", f.read(), "image/jpeg"),
                                                           ("notes.txt", b"just text", "text/plain")])
    at.run()
    assert not at.exception
    answers = [m.value for m in at.markdown if "flower.jpg" in m.value]
    best, probability = Predictor.from_run(run).predict_files([photo], top_k=1)[0].top[0]
    other = ({"cat", "dog"} - {best}).pop()
    assert len(answers) == 1 and best in answers[0] and other not in answers[0], answers  # what the model says
    assert f"{probability:.1%}" in answers[0], answers
    assert any("notes.txt" in e.value and "not an image" in e.value for e in at.error)

    at.button(key="build_bundle").click().run()
    assert not at.exception
    assert [b.proto.label for b in at.get("download_button")] == ["Download bundle.zip"]


@pytest.mark.slow
def test_predict_draws_a_placeholder_for_a_test_image_that_moved_and_keeps_its_other_tabs(dashboard_runs):
    fine = dashboard_runs / "20260101-000000-fine"
    preds = pd.read_csv(fine / "predictions.csv")
    gone = preds["path"].iloc[0]
    preds.loc[0, "path"] = gone + ".moved"  # the file the run saw is no longer there
    preds.to_csv(fine / "predictions.csv", index=False)
    at = page("pages/3_Predict.py").run()
    at.selectbox(key="predict_run").set_value(fine.name).run()
    assert not at.exception
    assert any(f"{Path(gone).name}.moved" in i.value and "moved or deleted" in i.value for i in at.info)
    from finetune_core.analysis import confusion_cell

    cell = confusion_cell(preds, at.selectbox(key="cell_true").value, at.selectbox(key="cell_predicted").value)
    in_cell = sum(Path(p).is_file() for p in cell["path"])  # the matrix cell below the gallery draws its own
    assert len(at.get("image")) == len(preds) - 1 + in_cell  # the other test images are drawn
    assert at.slider(key="top_k") and at.button(key="build_bundle")  # Classify and Export are drawn too
