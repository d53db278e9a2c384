"""A run's phase, and the rate and time left of that phase alone (issue 25, item 5: "1.1 images/s"
averaged over the caching phase while training ran at over 100/s)."""
from __future__ import annotations

import pytest

from conftest import tiny_train_config
from finetune_core.engine import train
from finetune_core.phases import CACHING, DECODING, EVALUATING, TRAINING, PhaseMeter, phase_of
from tuneboard_ui import progress_text


def test_each_phase_has_its_own_rate_and_time_left():
    meter = PhaseMeter(batch_size=8)
    # caching 100 images took 50 s (2 images/s)
    for t, done in ((10, 0), (35, 50), (60, 100)):
        now = meter.update({"kind": "prepare", "message": f"computing the frozen layers' output for training view 1 "
                                                          f"({done}/100, about 1 min left)", "elapsed_s": t})
    assert now == {"phase": CACHING, "images_per_s": 2.0, "eta_s": 0.0}
    # then 100 steps of 8 images, 10 steps a second: 80 images/s, not (images so far) / 60 s
    meter.update({"kind": "batch", "step": 1, "progress": 0.01, "elapsed_s": 60.0})
    now = meter.update({"kind": "batch", "step": 11, "progress": 0.11, "elapsed_s": 61.0})
    assert now == {"phase": TRAINING, "images_per_s": 80.0, "eta_s": 8.9}  # 89 steps at 10 a second
    assert meter.update({"kind": "prepare", "message": "evaluating on the test split", "progress": 1.0,
                         "elapsed_s": 70.0}) == {"phase": EVALUATING, "images_per_s": None, "eta_s": None}
    job = {"state": "running", "message": "epoch 1/1, batch 11/100",
           "phase": {"phase": TRAINING, "images_per_s": 1234.5, "eta_s": 8.9}}
    assert progress_text(job) == "epoch 1/1, batch 11/100 · training (1,234.5 images/s, 9 s left of it)"


@pytest.mark.slow
def test_the_engines_messages_name_their_phases(tiny_dataset, tmp_path, cache_dir):
    """The phases read from what the engine says: decoding, then training (the training images are
    decoded, and a frozen backbone's output on them computed, as the first epoch streams them), then
    decoding the test split at its first evaluation (issue 22: not before the first step), then
    caching its activations; with a validation split the training view is cached before training,
    as before streaming."""
    events = []
    train(tiny_train_config(tiny_dataset, epochs=1, train_stages="head", param_groups=False), tmp_path / "run",
          on_event=events.append, cache_dir=cache_dir)
    phases = [phase_of(e) for e in events]
    seen = [p for k, p in enumerate(phases) if k == 0 or p != phases[k - 1]]
    assert seen[seen.index(DECODING):seen.index(TRAINING) + 3] == [DECODING, TRAINING, DECODING, CACHING], seen
    events.clear()
    train(tiny_train_config(tiny_dataset, epochs=1, train_stages="head", param_groups=False, val_fraction=0.25),
          tmp_path / "run2", on_event=events.append, cache_dir=cache_dir)
    phases = [phase_of(e) for e in events]
    seen = [p for k, p in enumerate(phases) if k == 0 or p != phases[k - 1]]
    assert seen[seen.index(CACHING):seen.index(TRAINING) + 1] == [CACHING, TRAINING], seen


def test_each_caching_pass_is_measured_from_its_own_start():
    """Caching runs one pass per training view, then validation and test: each restarts at 0/n in
    the same phase, and is measured from its own start, not the first pass's."""
    meter = PhaseMeter(batch_size=8)
    for t, done in ((10, 0), (35, 50), (60, 100)):  # the first pass: 100 images in 50 s
        meter.update({"kind": "prepare", "message": f"computing the frozen layers' output for training view 1 "
                                                    f"({done}/100)", "elapsed_s": t})
    for t, done in ((60, 0), (85, 50)):  # the second pass: 50 images in 25 s, 2 images/s
        now = meter.update({"kind": "prepare", "message": f"computing the frozen layers' output for training "
                                                          f"view 2 ({done}/100)", "elapsed_s": t})
    assert now == {"phase": CACHING, "images_per_s": 2.0, "eta_s": 25.0}
    for t, done in ((100, 0), (110, 20)):  # the same subject, its count going down: a new pass too
        now = meter.update({"kind": "prepare", "message": f"computing the frozen layers' output for training "
                                                          f"view 2 ({done}/100)", "elapsed_s": t})
    assert now == {"phase": CACHING, "images_per_s": 2.0, "eta_s": 40.0}


def test_an_epochs_row_and_the_lr_finder_are_training():
    """The row an epoch ends with ("epoch 1/5: loss ...") keeps the phase at training (it showed
    "preparing" between epochs), and the next epoch's first batch has a rate."""
    meter = PhaseMeter(batch_size=8)
    assert meter.update({"kind": "lr_find", "step": 5, "progress": 0.5, "lr": 0.01, "loss": 2.0,
                         "message": "learning-rate finder: step 5/10, lr 0.01", "elapsed_s": 1.0})["phase"] == TRAINING
    meter.update({"kind": "batch", "step": 1, "progress": 0.01, "elapsed_s": 10.0})
    meter.update({"kind": "prepare", "message": "evaluating on the validation split", "elapsed_s": 19.0})
    row = meter.update({"kind": "epoch", "epoch": 1, "step": 10, "progress": 0.1, "loss": 1.0,
                        "message": "epoch 1/10: loss 1.000, train acc 0.500, validation acc 0.500",
                        "elapsed_s": 20.0})
    assert row["phase"] == TRAINING
    now = meter.update({"kind": "batch", "step": 11, "progress": 0.11, "elapsed_s": 20.5})
    assert now == {"phase": TRAINING, "images_per_s": 16.0, "eta_s": 44.5}  # 2 steps a second, 89 steps left
