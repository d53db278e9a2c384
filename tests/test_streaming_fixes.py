"""Review fixes to the streamed first epoch and the BatchNorm-folded frozen pass."""
from __future__ import annotations

from conftest import make_dataset, tiny_train_config

from finetune_core.data import scan_dataset


def streaming_config(root, **changes):
    return tiny_train_config(root, train_stages="1", feature_views=2, batch_size=2, **changes)


def break_after_scan(root, names):
    """Scan the dataset, then overwrite `names` (under train/) so they fail only when decoded."""
    report = scan_dataset(root)
    for name in names:
        (root / "train" / name).write_bytes(b"not a picture any more")
    return report


def test_a_stream_where_every_training_image_fails_stops_as_the_decoding_before_a_run_does(tmp_path):
    from finetune_core.engine import train
    from finetune_core.runs import RunDir

    root = make_dataset(tmp_path / "d", per_class=2, test_per_class=1)
    report = break_after_scan(root, [f"{c}/{c}_{i}.png" for c in ("cat", "dog") for i in range(2)])
    status = train(streaming_config(root, epochs=2), tmp_path / "run", cache_dir="", report=report)
    assert status["state"] == "failed"
    assert "no image of the train split could be decoded" in status["message"]
    metrics = RunDir(tmp_path / "run").read_metrics()
    assert metrics is None or not (metrics["kind"] == "epoch").any()  # no epoch row for an epoch never trained


def test_a_streamed_batch_left_with_one_image_never_trains_alone(tmp_path):
    """6 training images in batches of 2, one unreadable after the scan: its batch keeps one image,
    which BatchNorm in train mode cannot take; it joins the next batch instead."""
    from finetune_core.engine import Reporter, setup, split_for, training_batches
    from finetune_core.runs import RunDir

    root = make_dataset(tmp_path / "d", per_class=3, test_per_class=1)
    report = break_after_scan(root, ["dog/dog_1.png"])
    (tmp_path / "run").mkdir()
    ctx = setup(streaming_config(root), RunDir(tmp_path / "run"), Reporter(RunDir(tmp_path), None, None),
                cache_dir="", stream=True, report=report)
    _, cache = split_for(ctx, "1", Reporter(ctx.run, None, None))
    sizes = [len(y) for _, y in training_batches(ctx, 0, cache)]
    assert min(sizes) > 1 and sum(sizes) >= 4, sizes
    assert len(ctx.train_idx) == 5
