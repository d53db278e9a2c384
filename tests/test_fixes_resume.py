"""A resume trains on the data its checkpoint trained on, or not at all: review fixes added or
undone since, another validation split, or a split made by path (before the split by content)
refuse it, by name, and leave the run resumable and unchanged."""
from __future__ import annotations

import json

import pytest

from conftest import make_tiny_dataset, tiny_train_config, write_image
from finetune_core.engine import train
from finetune_core.fixes import Fix, add_fixes, undo_fix
from test_resume import folder_bytes, stopped_after_one_epoch


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", str(tmp_path / "runs"))
    return make_tiny_dataset(tmp_path / "tiny")


def refused(run, cache_dir, config, says: str) -> None:
    """The resume is refused with a message containing `says`; the run is as it was."""
    before = folder_bytes(run)
    status = train(config, run.path, resume=True, cache_dir=cache_dir)
    assert status["state"] == "stopped" and says in status["message"], status["message"]
    assert status["message"].startswith("not resumed")
    assert folder_bytes(run) == before and run.has_checkpoint()


@pytest.mark.slow
def test_a_resume_is_refused_when_the_review_fixes_changed_and_goes_on_once_they_are_back(data, tmp_path, cache_dir):
    config = tiny_train_config(data, epochs=2)
    run = stopped_after_one_epoch(config, tmp_path / "run", cache_dir=cache_dir)
    add_fixes(data, [Fix("exclude", "train/cat/cat_0.png")])
    refused(run, cache_dir, config, "the review fixes applied changed since the run trained "
                                    "(then: no fixes; now: 1 excluded)")
    undo_fix(data, 0)
    assert train(config, run.path, resume=True, cache_dir=cache_dir)["state"] == "completed"


@pytest.mark.slow
def test_a_resume_is_refused_when_the_validation_split_changed_or_was_made_by_path(data, tmp_path, cache_dir):
    config = tiny_train_config(data, epochs=2, val_fraction=0.25)
    run = stopped_after_one_epoch(config, tmp_path / "run", cache_dir=cache_dir)
    record = json.loads(run.file("config.json").read_text())
    assert record["dataset"]["validation_split"]["held_out"]

    added = [write_image(data / "train" / "cat" / f"new_{i}.png", (220, 40, 40), noise=20, seed=900 + i)
             for i in range(4)]  # 16 cats: four held out, not three
    refused(run, cache_dir, config, "the validation split changed since the run trained")
    for path in added:
        path.unlink()

    old = json.loads(json.dumps(record))
    del old["dataset"]["validation_split"]["split_by"]  # as a run from before the split by content
    run.file("config.json").write_text(json.dumps(old))
    refused(run, cache_dir, config, "made by file path, before the split by file content")
    run.file("config.json").write_text(json.dumps(record))
    assert train(config, run.path, resume=True, cache_dir=cache_dir)["state"] == "completed"
