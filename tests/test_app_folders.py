"""The runs folder also holds Tuneboard's own folders (kept reviews, fixes files of read-only
datasets): they are never listed, flagged as damaged or offered for deletion as runs."""
from __future__ import annotations

from conftest import make_dataset

from finetune_core import fixes, review
from finetune_core.runs import list_runs, mark_interrupted


def test_reviews_and_fixes_folders_in_the_runs_folder_are_not_runs(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", str(runs))
    data = make_dataset(tmp_path / "pets", per_class=2, test_per_class=1)
    kept_review = review.result_path(data, runs)  # where the Review page keeps a dataset's review
    kept_review.parent.mkdir(parents=True)
    kept_review.write_text("{}")
    fixes_file = fixes._fallback_path(data)  # where a read-only dataset's fixes go
    fixes_file.parent.mkdir(parents=True)
    fixes_file.write_text("{}")
    assert {kept_review.parent.parent, fixes_file.parent.parent} == {runs}
    (runs / "20260101-000000-real").mkdir()  # a run folder (damaged: no status.json) is still listed
    assert [info.id for info in list_runs(runs)] == ["20260101-000000-real"]
    assert mark_interrupted(runs) == []
