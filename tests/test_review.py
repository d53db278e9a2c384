"""Data review: the detectors (label issues, copies and leaks, images that teach nothing), the
fixes file the scan applies, the command line, and the Review page."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from conftest import make_dataset, page, shared_dataset, tiny_train_config
from finetune_core.data import scan_dataset
from finetune_core.fixes import (FIXES_FILE, Fix, FixesError, add_fixes, export_corrected, fixes_path, load_fixes,
                                 summary_text, undo_fix)


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    """Fixes of a read-only dataset go to the runs folder: a private one per test."""
    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


# --- the fixes file ----------------------------------------------------------------------------


def test_fixes_survive_a_restart_apply_in_the_scan_and_undo_restores(tmp_path, runs_dir):
    data = make_dataset(tmp_path / "d", per_class=4, test_per_class=2)
    add_fixes(data, [Fix("relabel", "train/cat/cat_0.png", to="dog"), Fix("exclude", "train/dog/dog_1.png"),
                     Fix("drop_leak", "test/cat/cat_t0.png", other="train/cat/cat_1.png")])
    assert (data / FIXES_FILE).is_file()  # kept with the dataset, readable by a person
    written = json.loads((data / FIXES_FILE).read_text())
    assert [f["action"] for f in written["fixes"]] == ["relabel", "exclude", "drop_leak"]
    assert all(len(f["sha1"]) == 40 for f in written["fixes"])

    report = scan_dataset(data)  # a new scan: nothing held in memory
    labels = {Path(r.path).name: report.classes[r.label] for r in report.samples["train"]}
    assert labels["cat_0.png"] == "dog"
    assert "dog_1.png" not in labels
    assert "cat_t0.png" not in {Path(r.path).name for r in report.samples["test"]}
    assert report.splits["train"] == {"cat": 3, "dog": 4}
    assert report.fixes.text() == "1 relabelled, 1 excluded, 1 leak dropped"

    undo_fix(data, 0)  # the relabel
    report = scan_dataset(data)
    labels = {Path(r.path).name: report.classes[r.label] for r in report.samples["train"]}
    assert labels["cat_0.png"] == "cat"
    assert report.fixes.text() == "1 excluded, 1 leak dropped"
    assert (data / "train" / "dog" / "dog_1.png").is_file()  # excluded, never deleted


def test_a_moved_file_is_still_matched_by_its_content(tmp_path, runs_dir):
    data = make_dataset(tmp_path / "d", per_class=4, test_per_class=2)
    add_fixes(data, [Fix("relabel", "train/cat/cat_2.png", to="dog")])
    (data / "train" / "cat" / "cat_2.png").rename(data / "train" / "cat" / "renamed.png")
    report = scan_dataset(data)
    labels = {Path(r.path).name: report.classes[r.label] for r in report.samples["train"]}
    assert labels["renamed.png"] == "dog"


def test_a_read_only_dataset_keeps_its_fixes_in_the_runs_folder(runs_dir):
    data = shared_dataset("hymenoptera")
    path = fixes_path(data)
    assert path.parent == runs_dir / "dataset-fixes"
    add_fixes(data, [Fix("exclude", "train/ants/0013035.jpg")])
    report = scan_dataset(data)
    assert report.fixes.excluded == 1
    assert str(data / "train" / "ants" / "0013035.jpg") not in {r.path for r in report.samples["train"]}


@pytest.mark.parametrize("text", ["{not json", json.dumps({"fixes": []}),
                                  json.dumps({"format": "tuneboard-fixes-1", "fixes": [{"action": "delete",
                                                                                        "path": "a.png"}]})])
def test_a_malformed_fixes_file_is_refused_by_name_and_changes_nothing(tmp_path, runs_dir, text):
    data = make_dataset(tmp_path / "d", per_class=4, test_per_class=2)
    (data / FIXES_FILE).write_text(text)
    report = scan_dataset(data)
    assert not report.usable
    assert str(data / FIXES_FILE) in report.reason()
    assert report.fixes is None
    with pytest.raises(FixesError, match=FIXES_FILE):
        add_fixes(data, [Fix("exclude", "train/cat/cat_0.png")])
    assert (data / FIXES_FILE).read_text() == text  # not rewritten
    assert scan_dataset(data, use_fixes=False).usable


def test_the_command_line_refuses_a_malformed_fixes_file_by_name(tmp_path, runs_dir, capsys):
    from finetune_core.__main__ import main

    data = make_dataset(tmp_path / "d", per_class=4, test_per_class=2)
    bad = tmp_path / "fixes.json"
    bad.write_text(json.dumps({"format": "tuneboard-fixes-1", "fixes": [{"action": "relabel",
                                                                          "path": "train/cat/cat_0.png"}]}))
    assert main(["review", str(data), "--apply", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (data / FIXES_FILE).exists()
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"format": "tuneboard-fixes-1", "fixes": [{"action": "exclude",
                                                                           "path": "train/cat/cat_0.png"}]}))
    assert main(["review", str(data), "--apply", str(good)]) == 0
    assert [f.action for f in load_fixes(data / FIXES_FILE)] == ["exclude"]
    assert main(["review", str(data), "--export", str(tmp_path / "copy")]) == 0
    assert sorted(p.name for p in (tmp_path / "copy" / "train" / "cat").iterdir()) == \
        ["cat_1.png", "cat_2.png", "cat_3.png"]


def test_export_writes_relabelled_images_in_their_new_class(tmp_path, runs_dir):
    data = make_dataset(tmp_path / "d", per_class=3, test_per_class=1)
    add_fixes(data, [Fix("relabel", "train/cat/cat_0.png", to="dog")])
    out = export_corrected(scan_dataset(data), tmp_path / "out")
    assert (out / "train" / "dog" / "cat_0.png").is_file()
    assert not (out / "train" / "cat" / "cat_0.png").exists()
    with pytest.raises(FixesError, match="new or empty"):
        export_corrected(scan_dataset(data), out)


def test_summary_text():
    assert summary_text(3, 5, 2) == "3 relabelled, 5 excluded, 2 leaks dropped"
    assert summary_text(0, 0, 0) == "no fixes"


@pytest.mark.slow
def test_a_run_trains_on_the_fixed_labels_and_records_the_fixes(tmp_path, runs_dir, cache_dir):
    from finetune_core.engine import train

    data = make_dataset(tmp_path / "d", per_class=6, test_per_class=3)
    add_fixes(data, [Fix("relabel", "test/cat/cat_t1.png", to="dog"), Fix("exclude", "train/dog/dog_0.png")])
    train(tiny_train_config(data, epochs=1), tmp_path / "run", cache_dir=cache_dir)
    preds = pd.read_csv(tmp_path / "run" / "predictions.csv")
    true = dict(zip(preds["path"].map(lambda p: Path(p).name), preds["true"]))
    assert true["cat_t1.png"] == "dog"
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    fixes = record["dataset"]["fixes"]
    assert (fixes["relabelled"], fixes["excluded"]) == (1, 1)
    assert {f["path"] for f in fixes["fixes"]} == {"test/cat/cat_t1.png", "train/dog/dog_0.png"}
    assert record["dataset"]["splits"]["train"] == {"cat": 6, "dog": 5}
