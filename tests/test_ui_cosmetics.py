"""The cheap fixes of issue 25's cosmetic list that have behaviour."""
from __future__ import annotations

import io
import zipfile

from finetune_core import analysis, plots
from finetune_core.predict import _bundle_files, bundle_zip_bytes
from test_compare_predict import logged_metrics


def test_counts_read_with_their_noun_in_the_right_number():
    assert analysis.count_text(1, "error") == "1 error"  # not "1 errors"
    assert analysis.count_text(0, "warning") == "0 warnings"
    assert analysis.count_text(1438, "image") == "1,438 images"  # as "1,797" beside it


def test_an_empty_loss_panel_runs_from_0_to_1_and_the_panels_share_the_x_range():
    empty = plots.panel_figures({}, x="step")
    assert list(empty[0].layout.yaxis.range) == [0, 1]  # not plotly's -1 to 4
    # the batches go to step 20; the test metric was last logged at step 10
    frame = logged_metrics([{"kind": "batch", "epoch": s / 10, "step": s, "loss": 1 / s, "train_acc": 0.5,
                             "elapsed_s": s * 2.0} for s in range(1, 21)]
                           + [{"kind": "epoch", "epoch": 1, "step": 10, "loss": 0.2, "train_acc": 0.6,
                               "test_acc": 0.7, "test_loss": 0.3, "elapsed_s": 21.0}])
    for x, last in (("step", 20), ("elapsed_s", 40.0)):
        ranges = {tuple(f.layout.xaxis.range) for f in plots.panel_figures({"run": frame}, x=x)}
        assert ranges == {(0, last * 1.03)}, x


def test_panel_titles_sit_left_clear_of_the_chart_toolbar():
    title = plots.panel_figures({"run": logged_metrics([{"kind": "batch", "epoch": 0.5, "step": 1, "loss": 1.0}])})[0]
    assert (title.layout.annotations[0].x, title.layout.annotations[0].xanchor) == (0.0, "left")


def test_the_confusion_matrix_takes_the_themes_colours():
    """"Blues" drew a white block on the dark theme; without a colorscale of its own the page's
    theme (light or dark) colours it."""
    fig = plots.confusion_figure([[3, 1], [0, 4]], ["a", "b"])
    assert fig.data[0].colorscale is None


def test_a_bundle_zip_unpacks_to_a_bundle_folder_and_still_loads(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.json").write_text("{}")
    (tmp_path / "b" / "weights.safetensors").write_bytes(b"w")
    data = bundle_zip_bytes(tmp_path / "b")
    assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == ["bundle/model.json", "bundle/weights.safetensors"]
    (tmp_path / "b.zip").write_bytes(data)
    assert _bundle_files(tmp_path / "b.zip") == (b"{}", b"w")
    flat = tmp_path / "flat.zip"  # a zip of the files themselves, as earlier versions wrote
    with zipfile.ZipFile(flat, "w") as zf:
        zf.writestr("model.json", "{}")
        zf.writestr("weights.safetensors", b"w")
    assert _bundle_files(flat) == (b"{}", b"w")



def test_the_sweep_heatmap_names_each_cells_state_before_any_finished():
    import pandas as pd

    from finetune_core.sweep import sweep_grid

    table = pd.DataFrame({"lr": [1e-3, 1e-3, 1e-2], "head_lr_mult": [1.0, 10.0, 1.0],
                          "state": ["running", "queued", "completed"], "run_id": ["a", "b", "c"],
                          "accuracy": [None, None, 0.9], "split": ["test"] * 3})
    fig = plots.sweep_figure(sweep_grid(table))
    shown = {(x, y, t) for trace in fig.data if trace.type == "scatter" for x, y, t in zip(trace.x, trace.y, trace.text)}
    assert shown == {("x1", "0.001", "running"), ("x10", "0.001", "queued"), ("x10", "0.01", "-")}


def test_a_zip_of_one_folder_unpacks_to_the_dataset_not_a_folder_inside_it(tmp_path):
    from finetune_core import datastore

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pets/cat/a.png", b"x")
        zf.writestr("pets/dog/b.png", b"y")
        zf.writestr("__MACOSX/pets/._a.png", b"")
        zf.writestr(".DS_Store", b"\0")  # Finder's, beside the folder: still a zip of one folder
    target = datastore.extract_zip(buf, tmp_path / "data", "pets.zip")
    assert target == tmp_path / "data" / "pets" and sorted(p.name for p in target.iterdir()) == ["cat", "dog"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["pets"]  # nothing left behind
