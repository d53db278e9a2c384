"""The data review's speed work: one pass over the images with the BatchNorms folded, the mirrored
pHash without a second DCT, and a review after a run that reads the run's cached activations
instead of running the backbone."""
from __future__ import annotations

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
    from finetune_core import review
    from finetune_core.activations import FeatureCache
    from finetune_core.engine import train
    from finetune_core.models import build_model, seeded_init, split_model
    from finetune_core.prepare import normalize_batch

    runs = tmp_path / "runs"
    data = make_dataset(tmp_path / "d", per_class=8, test_per_class=3)
    config = tiny_train_config(data, epochs=1, train_stages="1")
    train(config, runs / "run-1", cache_dir=cache_dir)

    passes = []  # every batch the frozen bottom computes, the run's cache or the review's own pass
    compute = FeatureCache._compute
    monkeypatch.setattr(FeatureCache, "_compute", lambda self, *a: passes.append(a) or compute(self, *a))
    pooled: dict = {}
    result = review.review_dataset(data, runs_dir=runs, cache_dir=cache_dir, features_out=pooled, kept=set())
    assert passes == [] and result.method["backbone_images"] == 0
    assert "run-1" in result.method["features_from"] and result.method["backbone"] == "tiny_lite"
    assert result.images == {"train": 16, "test": 6}

    # the features are the pretrained bottom's pooled output of each test image's centre view
    with seeded_init(config.seed):
        bottom, _ = split_model(build_model("tiny_lite", 2, "none"), "tiny_lite", "head")
    from finetune_core.prepare import decode_test

    views = torch.from_numpy(np.stack([decode_test(p, 32) for p in pooled["test_paths"]]))
    with torch.inference_mode():
        expected = bottom.eval()(normalize_batch(views, (0.5,) * 3, (0.5,) * 3, False)).flatten(1).numpy()
    assert np.allclose(pooled["test"], expected, rtol=2e-2, atol=2e-2)

    cold = review.review_dataset(data, backbone="tiny_lite", weights="none", image_size=32, cache_dir=cache_dir,
                                 kept=set())
    assert cold.method["backbone_images"] == 22  # without a run: every image through the backbone once
