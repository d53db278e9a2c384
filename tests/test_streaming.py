"""Training starts in seconds (issue 22, item 3): with part of the network frozen, each epoch whose
view is not computed yet decodes its images and computes their activations a batch at a time, just
before the step that trains on them, and keeps them for later epochs."""
from __future__ import annotations

import threading

import torch
from conftest import make_dataset, tiny_train_config

from finetune_core import prepare
from finetune_core.data import scan_dataset


def streaming_config(root, **changes):
    return tiny_train_config(root, train_stages="1", feature_views=2, batch_size=8, **changes)


def test_the_first_step_comes_before_the_last_image_is_decoded(tmp_path, monkeypatch):
    from finetune_core.engine import train

    root = make_dataset(tmp_path / "d", per_class=16, test_per_class=2)
    events = []
    real = prepare.decode_train
    monkeypatch.setattr(prepare, "decode_train", lambda path, side: (events.append("decode"), real(path, side))[1])
    status = train(streaming_config(root, epochs=1), tmp_path / "run", cache_dir=str(tmp_path / "cache"),
                   on_event=lambda e: e["kind"] == "batch" and events.append("step"))
    assert status["state"] == "completed"
    assert events.count("decode") == 32 and events.count("step") == 4
    assert events.index("step") < len(events) - 1 - events[::-1].index("decode"), events


def epoch_batches(ctx, epochs=2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from finetune_core.engine import Reporter, split_for, training_batches

    _, cache = split_for(ctx, "1", Reporter(ctx.run, None, None))
    return [(x.clone(), y.clone()) for epoch in range(epochs) for x, y in training_batches(ctx, epoch, cache)]


def test_streamed_epochs_give_the_batches_computed_views_give(tmp_path):
    """The same seed: streaming (images decoded and activations computed batch by batch, in the
    epoch's shuffled order) and the whole view computed first give the same batches, for the centre
    view (epoch 1) and a view of random crops (epoch 2)."""
    from finetune_core.engine import Reporter, setup
    from finetune_core.runs import RunDir

    root = make_dataset(tmp_path / "d", per_class=10, test_per_class=2, size=(48, 40))
    config = streaming_config(root)
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    streamed = setup(config, RunDir(tmp_path / "a"), Reporter(RunDir(tmp_path), None, None),
                     cache_dir=str(tmp_path / "cold"), stream=True)
    assert streamed.stream and len(streamed.data.pending) == 20  # nothing decoded before the first epoch
    computed = setup(config, RunDir(tmp_path / "b"), Reporter(RunDir(tmp_path), None, None), cache_dir="")
    assert not computed.stream and not computed.data.pending
    got, expected = epoch_batches(streamed), epoch_batches(computed)
    assert len(got) == len(expected) == 6
    for (x, y), (x0, y0) in zip(got, expected):
        assert torch.equal(y, y0)
        assert torch.allclose(x, x0, atol=1e-3), (x - x0).abs().max()


def test_a_photo_that_fails_mid_stream_is_named_and_skipped(tmp_path, monkeypatch):
    """Files that scanned well but cannot be decoded when the first epoch reaches them (here they
    were overwritten after the scan), some after the first step: the run names them in its log
    and trains on the others."""
    from finetune_core.engine import train
    from finetune_core.runs import LOG, RunDir

    root = make_dataset(tmp_path / "d", per_class=10, test_per_class=2)
    report = scan_dataset(root)
    broken = [root / "train" / "dog" / f"dog_{i}.png" for i in (1, 5, 8)]
    for path in broken:
        path.write_bytes(b"not a picture any more")
    events, progress = [], []
    real = prepare.decode_train
    monkeypatch.setattr(prepare, "decode_train", lambda path, side: (events.append(path), real(path, side))[1])
    status = train(streaming_config(root, epochs=2), tmp_path / "run", cache_dir=str(tmp_path / "cache"),
                   report=report, on_event=lambda e: e["kind"] == "batch" and (events.append("step"),
                                                                                progress.append(e["progress"])))
    assert status["state"] == "completed", status["message"]
    assert max(events.index(str(path)) for path in broken) > events.index("step")  # mid-stream
    log = RunDir(tmp_path / "run").file(LOG).read_text()
    assert all(f"skipped {path}: failed to decode" in log for path in broken)
    metrics = RunDir(tmp_path / "run").read_metrics()
    assert metrics[metrics["kind"] == "epoch"]["step"].tolist() == [3, 5]  # 17 images: 2 batches after the first epoch
    assert progress[3:] == [0.8, 1.0]  # once the skip is known, the schedule counts the steps left


def test_a_run_stopped_mid_stream_leaves_no_partial_file_and_resumes(tmp_path):
    from finetune_core.engine import train

    root = make_dataset(tmp_path / "d", per_class=16, test_per_class=2)
    config, cache = streaming_config(root, epochs=2), tmp_path / "cache"
    stop = threading.Event()
    status = train(config, tmp_path / "run", cache_dir=str(cache), stop_event=stop,
                   on_event=lambda e: e["kind"] == "batch" and e["step"] == 5 and stop.set())  # in epoch 2's view
    assert status["state"] == "stopped"
    assert not list(cache.glob("activations/.*")), "a partial view was left behind"
    assert len(list(cache.glob("activations/*.npy"))) == 2  # epoch 1's view and the test split
    status = train(config, tmp_path / "run", cache_dir=str(cache), resume=True)
    assert status["state"] == "completed" and status["epochs_done"] == 2


def test_the_time_left_counts_the_passes_still_to_come_at_their_own_rate():
    """Two steps into a streamed first epoch (80 images, 10 batches of 8, 4 epochs on 2 views, 16
    test images): each image's pass took 1 s and each step 1 s more. Left: 38 steps (38 s), the
    first view's other 64 images, the second view's 80 and the test split's 16 (160 s). The rate of
    the first steps alone (9 s each, passes included) would have said 342 s."""
    from types import SimpleNamespace

    from finetune_core.engine import time_left

    held = set()
    cache = SimpleNamespace(holds=lambda split, view=0, flip=False: (split, view, flip) in held,
                            pass_seconds=16.0, pass_images=16)
    ctx = SimpleNamespace(config=tiny_train_config(".", train_stages="1", feature_views=2, epochs=4, batch_size=8),
                          total_steps=40, step=2, batches_per_epoch=10, pass_seconds_at_start=0.0, test_decode_seconds=0.0,
                          caches={"1": cache}, train_idx=list(range(80)), val_idx=[],
                          data=SimpleNamespace(test_labels=torch.zeros(16)), selection_split="test")
    assert time_left(ctx, epoch=0, steps_here=2, seconds_here=18.0) == 38 + 160
    held.update({("train", 1, False), ("test", 0, False)})  # the second view and the test split kept from before
    assert time_left(ctx, epoch=0, steps_here=2, seconds_here=18.0) == 38 + 64
