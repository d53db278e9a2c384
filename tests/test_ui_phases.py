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
    """The phases read from what the engine says: decoding, then caching a frozen backbone's
    output, then training (the test split's activations are cached after it)."""
    events = []
    train(tiny_train_config(tiny_dataset, epochs=1, train_stages="head", param_groups=False), tmp_path / "run",
          on_event=events.append, cache_dir=cache_dir)
    phases = [phase_of(e) for e in events]
    seen = [p for k, p in enumerate(phases) if k == 0 or p != phases[k - 1]]
    assert seen[seen.index(DECODING):seen.index(TRAINING) + 1] == [DECODING, CACHING, TRAINING], seen
