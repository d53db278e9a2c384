"""Review fixes to the streamed first epoch and the BatchNorm-folded frozen pass."""
from __future__ import annotations

import pytest
import torch
from conftest import make_dataset, tiny_train_config
from torch import nn

from finetune_core import activations

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


class StemAndWideTop(nn.Module):
    """A stem (convolution + BatchNorm) under a wide classifier, to split as a traced model is."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.stem[1].running_var.fill_(3.0)
        self.fc = nn.Linear(4, 5000)

    def forward(self, x):
        return self.fc(self.stem(x))


def test_folding_a_traced_bottom_copies_the_bottom_only_not_the_whole_model():
    from finetune_core.models import _Until

    model = StemAndWideTop().eval()
    bottom = _Until(model, "fc", [model.stem], [])
    folded = activations.fold_batchnorm(bottom)
    assert folded is not bottom and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    originals = {id(t) for t in model.state_dict(keep_vars=True).values()}
    copied = sum(t.numel() for t in folded.model.state_dict(keep_vars=True).values() if id(t) not in originals)
    assert copied <= sum(t.numel() for t in bottom.state_dict().values()), f"{copied} values copied"
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(folded(x), bottom(x), atol=1e-5)


def test_a_cache_that_only_reads_kept_activations_never_folds(tmp_path, monkeypatch):
    from finetune_core.engine import Reporter, setup
    from finetune_core.models import split_model
    from finetune_core.runs import RunDir

    root = make_dataset(tmp_path / "d", per_class=2, test_per_class=1)
    reporter = Reporter(RunDir(tmp_path), None, None)
    ctx = setup(tiny_train_config(root, train_stages="1"), RunDir(tmp_path), reporter, cache_dir=str(tmp_path / "c"))
    bottom, _ = split_model(ctx.model, ctx.config.backbone, "1")
    expected = activations.FeatureCache(bottom, ctx, reporter, stages="1").get("train", 0)
    monkeypatch.setattr(activations, "fold_batchnorm", lambda module: pytest.fail("folded only to read a file"))
    assert torch.equal(activations.FeatureCache(bottom, ctx, reporter, stages="1").get("train", 0), expected)


def test_sweep_cells_differing_only_in_layer_decay_share_the_frozen_activations(tmp_path):
    config = tiny_train_config(tmp_path, train_stages="1")
    key = activations.shared_features_key(config, "1")
    assert activations.shared_features_key(config.replace(layer_decay=0.7), "1") == key
    assert activations.shared_features_key(config.replace(image_size=48), "1") != key  # one that shapes them


def test_the_view_count_during_a_run_is_the_one_resolved_at_its_start(tmp_path):
    """Images dropped mid-run (a streamed epoch's decode failures) must not change the epochs' views:
    the count is the resolved setting, and a count left to auto is refused rather than worked out
    again from the images left."""
    from finetune_core.engine import run_views

    config = tiny_train_config(tmp_path, train_stages="1", feature_views=3)
    assert run_views(config) == 3
    with pytest.raises(ValueError, match="feature_views"):
        run_views(config.replace(feature_views=0))
