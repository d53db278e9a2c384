"""The first step at any set size (issue 22, item 3): a run's test split is decoded when first
evaluated (the first epoch's end), not before the first step, so a large test split does not
delay training; a test image that fails then is named and left out, as before."""
from __future__ import annotations

from conftest import make_dataset, tiny_train_config

from finetune_core import prepare
from finetune_core.data import scan_dataset


def record_decodes(monkeypatch, events: list) -> None:
    real_train, real_test = prepare.decode_train, prepare.decode_test
    monkeypatch.setattr(prepare, "decode_train", lambda path, side: (events.append("train"), real_train(path, side))[1])
    monkeypatch.setattr(prepare, "decode_test", lambda path, size: (events.append("test"), real_test(path, size))[1])


def test_the_first_step_comes_before_any_test_image_is_decoded(tmp_path, monkeypatch):
    """For a frozen bottom (streamed) and for every layer trained (training images decoded first)."""
    from finetune_core.engine import train

    root = make_dataset(tmp_path / "d", per_class=8, test_per_class=3)
    for stages in ("1", "all"):
        events: list = []
        record_decodes(monkeypatch, events)
        status = train(tiny_train_config(root, train_stages=stages, feature_views=1, epochs=2), tmp_path / stages,
                       cache_dir=str(tmp_path / f"cache{stages}"),
                       on_event=lambda e: e["kind"] == "batch" and events.append("step"))
        assert status["state"] == "completed", status["message"]
        assert events.count("test") == 6 and events.count("step") == 4, events
        assert events.index("step") < events.index("test"), events  # the first step, then the test split
        assert events[events.index("test"):events.index("test") + 6] == ["test"] * 6  # all at the first evaluation


def test_a_test_image_that_fails_at_its_first_evaluation_is_named_and_left_out(tmp_path):
    """A test file that scanned well but is overwritten before the first epoch's end: the run names
    it in its log, scores and predicts the other test images, and counts it among the skipped."""
    import pandas as pd

    from finetune_core.engine import train
    from finetune_core.runs import LOG, PREDICTIONS, RunDir

    root = make_dataset(tmp_path / "d", per_class=8, test_per_class=3)
    report = scan_dataset(root)
    broken = root / "test" / "dog" / "dog_t1.png"
    broken.write_bytes(b"not a picture any more")
    status = train(tiny_train_config(root, train_stages="1", feature_views=1), tmp_path / "run",
                   cache_dir=str(tmp_path / "cache"), report=report)
    assert status["state"] == "completed", status["message"]
    run = RunDir(tmp_path / "run")
    assert f"skipped {broken}: failed to decode" in run.file(LOG).read_text()
    predicted = pd.read_csv(run.file(PREDICTIONS))
    assert len(predicted) == 5 and str(broken) not in predicted["path"].tolist()
