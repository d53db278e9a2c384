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


# --- the detectors -----------------------------------------------------------------------------


def test_label_issues_rank_planted_flips_first_and_flag_none_on_clean_labels():
    from finetune_core.review import label_issues

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    probs = np.full((120, 3), 0.004)
    probs[np.arange(120), labels] = 0.98  # a confident, right model ...
    probs += rng.uniform(0, 0.004, probs.shape)
    probs /= probs.sum(1, keepdims=True)
    _, flagged = label_issues(labels, probs)
    assert not flagged.any()
    flipped = labels.copy()
    planted = np.array([3, 50, 97, 110])
    flipped[planted] = (labels[planted] + 1) % 3  # ... and four labels that disagree with it
    score, flagged = label_issues(flipped, probs)
    assert set(np.argsort(-score)[:4]) == set(planted)
    assert set(np.flatnonzero(flagged)) == set(planted)


def centre_views_of(paths, size=224):
    import torch

    from finetune_core.prepare import decode_test

    return torch.from_numpy(np.stack([decode_test(str(p), size) for p in paths]))


def plant_dark_blurred_uniform(src: Path, out: Path) -> dict[str, Path]:
    img = Image.open(src).convert("RGB")
    arr = np.asarray(img) / 255.0
    out.mkdir(parents=True, exist_ok=True)
    planted = {"dark": out / "dark.png", "blurry": out / "blurry.png", "low_information": out / "flat.png"}
    Image.fromarray((255 * 0.35 * arr ** 2.2).astype(np.uint8)).save(planted["dark"])
    img.filter(ImageFilter.GaussianBlur(max(img.size) / 100)).save(planted["blurry"])
    Image.new("RGB", img.size, (120, 130, 125)).save(planted["low_information"])
    return planted


def test_quality_detectors_find_planted_images_and_flag_no_real_photo(tmp_path):
    from finetune_core.review import quality_issues, quality_measures

    real = sorted((shared_dataset("hymenoptera") / "train").glob("*/*.jpg"))[:24]
    planted = plant_dark_blurred_uniform(real[0], tmp_path)
    paths = real + list(planted.values())
    sizes = np.asarray([Image.open(p).size for p in paths])
    found = {(paths[i], kind) for i, kind, _, _ in quality_issues(quality_measures(centre_views_of(paths)), sizes)}
    assert {(p, kind) for kind, p in planted.items()} <= found
    assert not [f for f in found if f[0] in real]


def test_near_copies_find_resized_recompressed_cropped_and_mirrored_copies(tmp_path):
    from finetune_core.review import near_copies, perceptual_hashes

    real = sorted((shared_dataset("hymenoptera") / "train").glob("*/*.jpg"))[:20]
    img = Image.open(real[8]).convert("RGB")  # its cropped copy's plain pHash is 18 bits away
    w, h = img.size
    copy = img.crop((w // 20, h // 20, w - w // 20, h - h // 20)).resize((int(w * 0.6), int(h * 0.6)))
    copy.save(tmp_path / "near.jpg", quality=70)
    Image.open(real[3]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirror.jpg", quality=90)
    paths = real + [tmp_path / "near.jpg", tmp_path / "mirror.jpg"]
    pairs = {(paths[i], paths[j]) for i, j, _ in near_copies(perceptual_hashes(centre_views_of(paths)), None)}
    assert pairs == {(tmp_path / "near.jpg", real[8]), (tmp_path / "mirror.jpg", real[3])}


# --- the whole review, and the page ------------------------------------------------------------


@pytest.mark.slow
def test_review_finds_a_flipped_label_a_leak_and_a_dark_photo_end_to_end(tmp_path, runs_dir, capsys, monkeypatch):
    from finetune_core.__main__ import main

    monkeypatch.setenv("TUNEBOARD_CACHE", str(tmp_path / "cache"))  # decoded from cold, in the test's own folder

    src = shared_dataset("hymenoptera")
    data = tmp_path / "h"
    for split, n in (("train", 30), ("test", 8)):
        for cls in ("ants", "bees"):
            (data / split / cls).mkdir(parents=True)
            for p in sorted((src / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(p, data / split / cls / p.name)
    bee = sorted((data / "train" / "bees").glob("*.jpg"))[0]
    bee.rename(data / "train" / "ants" / bee.name)  # a bee filed under ants
    leaked = sorted((data / "train" / "ants").glob("*.jpg"))[5]
    img = Image.open(leaked)
    img.resize((img.width * 6 // 10, img.height * 6 // 10)).save(data / "test" / "ants" / "leak.jpg", quality=70)
    dark = sorted((data / "train" / "bees").glob("*.jpg"))[3]
    plant_dark_blurred_uniform(dark, tmp_path / "p")
    shutil.copy(tmp_path / "p" / "dark.png", dark.with_suffix(".png"))
    dark.unlink()
    twin = sorted((data / "train" / "ants").glob("*.jpg"))[2]
    shutil.copy(twin, data / "train" / "bees" / "twin.jpg")  # one photo filed under both classes

    assert main(["review", str(data), "--json", "--image-size", "128"]) == 0
    result = json.loads(capsys.readouterr().out)
    by_path = {(Path(i["path"]).name, i["kind"]): i for i in result["issues"]}
    label = by_path[(bee.name, "label")]
    assert (label["given"], label["suggested"]) == ("ants", "bees")
    assert by_path[("leak.jpg", "leak")]["other"] == str(leaked)
    assert (dark.with_suffix(".png").name, "dark") in by_path  # the planted dark photo
    conflict = by_path[("twin.jpg", "exact_duplicate")]
    assert (conflict["given"], conflict["suggested"], conflict["other"]) == ("bees", "ants", str(twin))
    from finetune_core.review import Issue, ReviewResult, suggested_fixes

    review = ReviewResult(root=str(data), classes=result["classes"], issues=[Issue(**i) for i in result["issues"]],
                          images={}, method={})
    assert ("exclude", "train/bees/twin.jpg") in {(f.action, f.path) for f in suggested_fixes(review, [])}
    assert set(result["issues"][0]) >= {"kind", "path", "given", "suggested", "score", "other"}
    flagged_labels = [i for i in result["issues"] if i["kind"] == "label"]
    assert len(flagged_labels) <= 3  # few false alarms on 60 training photos


def write_review_result(root: Path, runs: Path) -> None:
    """A saved review of `root` (what a finished review job leaves), without running the backbone."""
    from finetune_core.review import Issue, ReviewResult, result_path, save_result

    report = scan_dataset(root)
    issues = [Issue("label", str(root / "train" / "cat" / "cat_0.png"), "train", "cat", "dog", 0.97, confidence=0.97,
                    detail="planted"),
              Issue("dark", str(root / "train" / "dog" / "dog_1.png"), "train", "dog", score=0.5, detail="planted")]
    health = [{"class": "cat", "train": 4, "test": 2, "share": 0.5, "label_issues": 1, "copies": 0, "low_quality": 0},
              {"class": "dog", "train": 4, "test": 2, "share": 0.5, "label_issues": 0, "copies": 0, "low_quality": 1}]
    save_result(ReviewResult(root=report.root, classes=report.classes, issues=issues, class_health=health,
                             images={"train": 8, "test": 4}, method={"backbone": "test", "folds": 5}),
                result_path(report.root, runs))


@pytest.mark.slow
def test_review_page_relabels_excludes_and_undoes_and_the_train_page_counts(dashboard_env):
    data = make_dataset(dashboard_env / "data" / "pets", per_class=4, test_per_class=2)
    write_review_result(data.resolve(), dashboard_env / "runs")
    at = page("pages/2_Review.py")
    at.session_state["current_dataset"] = str(data)
    at.run()
    assert not at.exception
    # class health in words and a share in percent (a first user saw 'label_issues' and 0.0987)
    (health,) = [d for d in at.dataframe if "label_issues" in d.value.columns]
    shown = json.loads(health.proto.columns)
    assert shown["label_issues"]["label"] == "Suspected wrong labels" and shown["share"]["type_config"]["format"] == "percent"
    at.checkbox(key=f"sel-label-{data.resolve() / 'train' / 'cat' / 'cat_0.png'}").check().run()
    at.selectbox(key="act_relabel_to").set_value("dog")
    at.button(key="act_relabel").click().run()
    at.checkbox(key=f"sel-dark-{data.resolve() / 'train' / 'dog' / 'dog_1.png'}").check().run()
    at.button(key="act_exclude").click().run()
    fixes = load_fixes(data / FIXES_FILE)
    assert [(f.action, f.path, f.to) for f in fixes] == [("relabel", "train/cat/cat_0.png", "dog"),
                                                         ("exclude", "train/dog/dog_1.png", "")]
    assert "1 relabelled, 1 excluded" in " ".join(i.value for i in at.info)

    train = page("pages/1_Train.py")
    train.run()
    train.radio(key="data_source").set_value("A folder path").run()
    train.text_input(key="data_path_text").set_value(str(data)).run()
    assert any("1 relabelled, 1 excluded" in c.value for c in train.caption)

    at.run()
    undo = [b for b in at.button if b.key and b.key.startswith("undo-0-")]
    undo[0].click().run()
    assert [f.action for f in load_fixes(data / FIXES_FILE)] == ["exclude"]
    assert scan_dataset(data).splits["train"] == {"cat": 4, "dog": 3}
    train.run()
    assert any("Review fixes in force: **1 excluded**" in c.value for c in train.caption)


def test_compare_shows_each_run_before_or_after_review(tmp_path):
    from finetune_core.analysis import compare_table
    from finetune_core.runs import run_info

    reviewed, never = tmp_path / "reviewed", tmp_path / "never"  # a dataset with a fixes file now, one without
    reviewed.mkdir()
    (reviewed / FIXES_FILE).write_text("{}")
    for name, root, fixes in (("before", reviewed, None), ("after", reviewed, {"relabelled": 3, "excluded": 5,
                                                                               "leaks_dropped": 2}),
                              ("unreviewed", never, None)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"config": {"data": str(root), "name": name},
                                                        "dataset": {"root": str(root), "fixes": fixes}}))
        (folder / "status.json").write_text(json.dumps({"state": "completed", "test_acc": 0.9}))
    frame, _ = compare_table([run_info(tmp_path / n) for n in ("before", "after", "unreviewed")])
    assert list(frame["review fixes"]) == ["before review", "3 relabelled, 5 excluded, 2 leaks dropped",
                                           "not reviewed"]


def test_a_review_reports_progress_and_stops_when_asked(tmp_path, runs_dir):
    from finetune_core.review import ReviewJob, ReviewStopped, review_dataset

    data = make_dataset(tmp_path / "d", per_class=12, test_per_class=4)
    stop = threading.Event()
    seen = []

    def progress(fraction, message):
        seen.append((fraction, message))
        if "decoding" in message:
            stop.set()  # the user presses Stop while the images are decoded

    with pytest.raises(ReviewStopped):
        review_dataset(data, progress=progress, stop_event=stop, cache_dir="")
    assert seen[0] == (0.0, "scanning the dataset")
    assert not any("fold" in m for _, m in seen)  # stopped before the backbone and the folds

    job = ReviewJob(str(data), tmp_path / "review.json", cache_dir="")
    job.stop_event.set()
    job.start().thread.join(60)
    assert job.snapshot()["state"] == "stopped" and not (tmp_path / "review.json").exists()


def test_confusion_cell_lists_its_images_worst_first():
    from finetune_core.analysis import confusion_cell

    preds = pd.DataFrame({"path": ["a", "b", "c", "d"], "true": ["cat", "cat", "cat", "dog"],
                          "predicted": ["dog", "dog", "cat", "dog"], "loss": [0.5, 2.0, 0.1, 0.2]})
    assert list(confusion_cell(preds, "cat", "dog")["path"]) == ["b", "a"]


@pytest.mark.slow
def test_predict_confusion_cell_excludes_the_chosen_images(dashboard_env, cache_dir):
    from finetune_core.engine import train

    data = make_dataset(dashboard_env / "data" / "pets", per_class=6, test_per_class=3)
    train(tiny_train_config(data, epochs=1), dashboard_env / "runs" / "20260101-000000-pets", cache_dir=cache_dir)
    preds = pd.read_csv(dashboard_env / "runs" / "20260101-000000-pets" / "predictions.csv")
    predicted = preds.loc[preds["true"] == "cat", "predicted"].iloc[0]  # the tiny random-init model may say dog
    at = page("pages/3_Predict.py").run()
    at.selectbox(key="cell_true").set_value("cat")
    at.selectbox(key="cell_predicted").set_value(predicted).run()
    boxes = [c for c in at.checkbox if c.key and c.key.startswith("cell-")]
    assert boxes, "the cell shows its images"
    boxes[0].check().run()
    at.button(key="cell_exclude").click().run()
    assert not at.exception
    fixes = load_fixes(data / FIXES_FILE)
    assert [(f.action, f.path) for f in fixes] == [("exclude", "test/cat/" + Path(boxes[0].key[5:]).name)]


def test_the_review_page_says_a_typed_folder_does_not_exist(dashboard_env):
    """A first user typed a folder that was not there and read Python's "[Errno 2] No such file"."""
    at = page("pages/2_Review.py")
    at.session_state["current_dataset"] = str(dashboard_env / "data" / "nonsense_zz")
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == [f"`{(dashboard_env / 'data' / 'nonsense_zz').resolve()}`: does not exist"]
