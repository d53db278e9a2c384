"""The data review's speed work: one pass over the images with the BatchNorms folded, the mirrored
pHash without a second DCT, and a review after a run that reads the run's cached activations
instead of running the backbone."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from conftest import make_dataset, tiny_train_config


def test_the_mirrored_hash_equals_the_hash_of_the_mirror_image():
    from finetune_core.review import perceptual_hashes

    rng = np.random.default_rng(0)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(rng.uniform(0, 255, (3, 3, 8, 8))).float(), size=64,
                                             mode="bilinear").to(torch.uint8)
    plain, mirrored, _ = perceptual_hashes(smooth)
    of_mirror, _, _ = perceptual_hashes(smooth.flip(-1))
    assert (mirrored == of_mirror).mean() > 0.95 and (mirrored != plain).any()


def test_a_review_after_a_run_reads_its_cached_activations_and_runs_no_backbone(tmp_path, monkeypatch, cache_dir):
    from finetune_core import prepare, review
    from finetune_core.engine import train
    from finetune_core.models import build_model, seeded_init, split_model
    from finetune_core.prepare import decode_test, normalize_batch

    runs = tmp_path / "runs"
    data = make_dataset(tmp_path / "d", per_class=8, test_per_class=3)
    with seeded_init(7):  # stands in for ImageNet weights: a run from "none" is never reused
        pretrained = build_model("tiny_lite", 2, "none")
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pt")
    config = tiny_train_config(data, epochs=1, train_stages="1", weights=str(tmp_path / "pretrained.pt"))
    train(config, runs / "run-1", cache_dir=cache_dir)
    train(config.replace(weights="none"), runs / "run-2", cache_dir=cache_dir)  # newer, random features

    ask = dict(runs_dir=runs, backbone="tiny_lite", image_size=32, weights=config.weights, cache_dir=cache_dir,
               kept=set())
    pooled: dict = {}
    result = review.review_dataset(data, features_out=pooled, **ask)
    assert result.method["backbone_images"] == 0
    assert "run-1" in result.method["features_from"] and result.method["backbone"] == "tiny_lite"
    assert result.images == {"train": 16, "test": 6}

    # the features are the pretrained bottom's pooled output of each test image's centre view
    bottom, _ = split_model(pretrained, "tiny_lite", "head")
    views = torch.from_numpy(np.stack([decode_test(p, 32) for p in pooled["test_paths"]]))
    with torch.inference_mode():
        expected = bottom.eval()(normalize_batch(views, (0.5,) * 3, (0.5,) * 3, False)).flatten(1).numpy()
    assert np.allclose(pooled["test"], expected, rtol=2e-2, atol=2e-2)

    # another image size than the run's: the review's own pass
    assert review.reusable_run(review.scan_dataset(data), runs, "tiny_lite", 48) is None
    # none asked for (the Review page, the command line's default): the newest reusable run, whatever its backbone
    assert Path(review.reusable_run(review.scan_dataset(data), runs)).name == "run-1"
    # the run's activations evicted: nothing decoded before the review's own pass (once per image)
    for entry in (Path(cache_dir) / "activations").iterdir():
        entry.unlink()
    shutil.rmtree(Path(cache_dir) / "images")
    decoded = []
    make_entry = prepare.make_entry
    monkeypatch.setattr(prepare, "make_entry", lambda *a: decoded.append(a) or make_entry(*a))
    cold = review.review_dataset(data, **ask)
    assert cold.method["backbone_images"] == 22 and decoded == []  # every image through the backbone once
