"""Fixes after the big merge: the Review page draws a placeholder for an image gone since the
review, the flat-dataset scan ignores Tuneboard's own fixes file, the corrected export refuses a
folder inside the dataset, and Train's pick among several datasets is checked again."""
from __future__ import annotations

from conftest import make_dataset, page


def test_review_page_draws_a_placeholder_for_images_gone_since_the_review(dashboard_env):
    from finetune_core.data import scan_dataset
    from finetune_core.review import Issue, ReviewResult, result_path, save_result

    data = make_dataset(dashboard_env / "data" / "pets", per_class=4, test_per_class=2).resolve()
    report = scan_dataset(data)
    gone, other = data / "train" / "cat" / "cat_0.png", data / "train" / "dog" / "dog_3.png"
    issues = [Issue("label", str(gone), "train", "cat", "dog", 0.97, confidence=0.97, detail="planted"),
              Issue("near_duplicate", str(data / "train" / "dog" / "dog_1.png"), "train", "dog", score=0.9,
                    other=str(other), detail="planted")]
    save_result(ReviewResult(root=report.root, classes=report.classes, issues=issues,
                             images={"train": 8, "test": 4}, method={"backbone": "test", "folds": 5}),
                result_path(report.root, dashboard_env / "runs"))
    gone.unlink()  # deleted since the review
    other.rename(other.with_name("renamed.png"))
    at = page("pages/2_Review.py")
    at.session_state["current_dataset"] = str(data)
    at.run()
    assert not at.exception
    placeholders = " ".join(i.value for i in at.info)
    assert "cat_0.png" in placeholders and "dog_3.png" in placeholders and "moved or deleted" in placeholders
    assert len(at.get("image")) == 1  # dog_1.png, still there, is drawn


def test_a_flat_dataset_scan_does_not_warn_about_its_own_fixes_file(tmp_path, monkeypatch):
    from finetune_core.data import scan_dataset
    from finetune_core.fixes import FIXES_FILE, Fix, add_fixes

    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", str(tmp_path / "runs"))
    data = make_dataset(tmp_path / "flat", per_class=6, test_per_class=3, flat=True)  # class folders at the root
    add_fixes(data, [Fix("exclude", "cat/cat_0.png")])
    (data / "notes.txt").write_text("a stray file")
    report = scan_dataset(data)
    assert (data / FIXES_FILE).is_file() and report.fixes.excluded == 1
    outside = [p.path for p in report.problems if "outside any class folder" in p.problem]
    assert outside == [str(data / "notes.txt")]  # a stray file is still named


def test_the_corrected_copy_is_refused_inside_the_dataset_or_around_it(tmp_path, monkeypatch):
    import pytest

    from finetune_core.data import scan_dataset
    from finetune_core.fixes import FixesError, export_corrected

    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", str(tmp_path / "runs"))
    data = make_dataset(tmp_path / "d", per_class=3, test_per_class=1)
    report = scan_dataset(data)
    for out in (data / "corrected", data, tmp_path):
        with pytest.raises(FixesError, match="outside the dataset"):
            export_corrected(report, out)
    assert not (data / "corrected").exists()
    assert (export_corrected(report, tmp_path / "beside") / "train" / "cat" / "cat_0.png").is_file()


def test_the_train_page_refuses_a_dataset_among_several_that_links_out_of_the_data_folder(dashboard_env,
                                                                                           monkeypatch):
    from test_scoring import data_root_of_two

    monkeypatch.delenv("TUNEBOARD_EXTRA_DATA_ROOTS")  # only the data folder may be read
    root = data_root_of_two(dashboard_env / "data" / "shelf")
    outside = make_dataset(dashboard_env / "outside" / "wasps", per_class=4, test_per_class=2)
    (root / "wasps").symlink_to(outside, target_is_directory=True)
    at = page("pages/1_Train.py")
    at.session_state["data_source"] = "A folder path"
    at.run()
    at.text_input(key="data_path_text").set_value(str(root)).run()
    choice = at.radio(key=f"several-{root.resolve()}")
    assert [o.rsplit("/", 1)[-1] for o in choice.options] == ["ants", "birds", "wasps"]
    choice.set_value(str(root.resolve() / "wasps")).run()
    assert not at.exception
    assert any(str(outside.resolve()) in e.value for e in at.error), [e.value for e in at.error]
    assert not at.metric  # nothing outside the data folder is scanned
