"""Accepting what the review suggests, all at once ("the loop pays", issue 21): which fixes that
records, and the Review page's button and relabel box."""
from __future__ import annotations

import numpy as np

from conftest import make_dataset, page
from finetune_core.data import scan_dataset
from finetune_core.fixes import FIXES_FILE, Fix, load_fixes
from finetune_core.review import (Issue, ReviewResult, left_to_a_person, relabel_thresholds, result_path,
                                  save_result, suggested_fixes)


def review_of(root, issues, relabel_above=None) -> ReviewResult:
    method = {"backbone": "test", "folds": 5, **({"relabel_above": relabel_above} if relabel_above else {})}
    return ReviewResult(root=str(root), classes=["cat", "dog"], issues=issues, images={"train": 8, "test": 4},
                        method=method)


def label(root, path, given, suggested, confidence, split="train") -> Issue:
    return Issue("label", str(root / path), split, given, suggested, score=0.99, confidence=confidence)


def test_accept_all_relabels_where_the_model_is_sure_excludes_where_unsure_and_leaves_copies_and_the_test_split(
        tmp_path):
    issues = [label(tmp_path, "train/cat/sure.png", "cat", "dog", 0.9),
              label(tmp_path, "train/cat/unsure.png", "cat", "dog", 0.7),  # more likely than not, under dog's 0.8
              label(tmp_path, "train/dog/kept.png", "dog", "cat", 0.9),
              label(tmp_path, "test/cat/t0.png", "cat", "dog", 0.95, split="test"),
              Issue("leak", str(tmp_path / "test/dog/t1.png"), "test", "dog", other=str(tmp_path / "train/dog/a.png")),
              Issue("near_duplicate", str(tmp_path / "train/cat/sure.png"), "train", "cat",
                    other=str(tmp_path / "train/cat/b.png")),
              # a second photo of an object, a copy of the same bytes and a dark photo whose label is right:
              # excluding them fixes no error (last round's Accept all excluded 32 right labels, 27 such)
              Issue("near_duplicate", str(tmp_path / "train/cat/c.png"), "train", "cat",
                    other=str(tmp_path / "train/cat/b.png")),
              Issue("exact_duplicate", str(tmp_path / "train/dog/d.png"), "train", "dog",
                    other=str(tmp_path / "train/dog/a.png")),
              Issue("dark", str(tmp_path / "train/dog/dark.png"), "train", "dog"),
              Issue("blurry", str(tmp_path / "train/dog/dark.png"), "train", "dog"),  # one photo, two issues
              # the same bytes filed under cat and dog: one label is wrong, and the copy is left out
              Issue("exact_duplicate", str(tmp_path / "train/cat/e.png"), "train", "cat", suggested="dog",
                    other=str(tmp_path / "train/dog/a.png"))]
    already = [Fix("keep", "train/dog/kept.png", kind="label")]
    labels = np.array([0, 0, 1, 1])  # the mean probability of each class on the images labelled with it
    probs = np.array([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9], [0.3, 0.7]])
    relabel_above = relabel_thresholds(labels, probs, ["cat", "dog"])
    assert relabel_above == {"cat": 0.6, "dog": 0.8}
    review = review_of(tmp_path, issues, relabel_above)
    fixes = suggested_fixes(review, already)
    assert [(f.action, f.path, f.to) for f in fixes] == [("relabel", "train/cat/sure.png", "dog"),
                                                         ("exclude", "train/cat/unsure.png", ""),
                                                         ("exclude", "train/cat/e.png", "")]
    # what the page names as left to a person: the two test issues, the copies and the dark photo
    # (sure.png's near copy is undecided until its relabel is recorded); photos, not issues
    assert left_to_a_person(review, already) == {"test": 2, "train": 4}
    assert left_to_a_person(review, already + fixes) == {"test": 2, "train": 3}


def test_the_review_page_accepts_all_suggestions_and_names_its_relabel_box(dashboard_env):
    data = make_dataset(dashboard_env / "data" / "pets", per_class=4, test_per_class=2).resolve()
    issues = [label(data, "train/cat/cat_0.png", "cat", "dog", 0.97),
              Issue("dark", str(data / "train/dog/dog_1.png"), "train", "dog", score=0.5),
              label(data, "test/cat/cat_t0.png", "cat", "dog", 0.97, split="test")]
    report = scan_dataset(data)
    save_result(review_of(report.root, issues), result_path(report.root, dashboard_env / "runs"))
    at = page("pages/2_Review.py")
    at.session_state["current_dataset"] = str(data)
    at.run()
    assert not at.exception
    box = at.selectbox(key="act_relabel_to")  # a first user found it unlabelled
    assert box.label == "Relabel the selected images to" and box.proto.label_visibility.value == 0  # visible
    assert at.button(key="act_accept_all").label == ("Accept all suggested label fixes of the training split "
                                                     "(1 relabel, 0 exclude)")
    assert any(c.value.startswith("1 copy or poor photo of the training split") and "and 1 issue of the test split "
               "(leaks, labels: it is what accuracy is measured on) are left to you" in c.value for c in at.caption)
    at.button(key="act_accept_all").click().run()
    assert not at.exception
    assert [(f.action, f.path, f.to) for f in load_fixes(data / FIXES_FILE)] == [
        ("relabel", "train/cat/cat_0.png", "dog")]
    assert "1 relabelled" in " ".join(i.value for i in at.info)
