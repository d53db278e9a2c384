"""The frozen layers' pass (issue 22, the slowdown of the first epoch): it runs a copy of the frozen
bottom with each BatchNorm folded into its convolution, computing what the bottom computes."""
from __future__ import annotations

import torch
from conftest import tiny_train_config
from torch import nn

from finetune_core import activations
from finetune_core.prepare import center_view_batch, normalize_batch


def test_the_frozen_pass_runs_no_batchnorm_and_computes_what_the_bottom_does(tiny_dataset, tmp_path):
    from finetune_core.engine import Reporter, setup
    from finetune_core.models import split_model
    from finetune_core.runs import RunDir

    config = tiny_train_config(tiny_dataset, train_stages="1")
    reporter = Reporter(RunDir(tmp_path), None, None)
    ctx = setup(config, RunDir(tmp_path), reporter, cache_dir="")
    bottom, _ = split_model(ctx.model, config.backbone, "1")
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    norms = [m for m in bottom.modules() if isinstance(m, nn.BatchNorm2d)]
    cache = activations.FeatureCache(bottom, ctx, reporter, stages="1")
    assert cache.bottom is not bottom  # folded now (lazily, on first use): the fold's own check runs the original
    calls = []
    for norm in norms:
        norm.register_forward_hook(lambda *args: calls.append(1))
    features = cache.get("train", 0)
    assert norms and not calls, f"{len(calls)} BatchNorm calls in the frozen pass"
    bottom.eval()
    with torch.inference_mode():
        images = center_view_batch(ctx.data, ctx.train_idx, config.image_size, ctx.device)
        expected = bottom(normalize_batch(images, ctx.mean, ctx.std, config.channels_last))
    assert torch.allclose(features.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())  # the model's own layers


class NormFirst(nn.Module):
    """Declares a convolution, then a BatchNorm, but normalises first: its children are not in forward order."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.norm.running_mean.fill_(0.5)
        self.norm.running_var.fill_(4.0)

    def forward(self, x):
        return self.conv(self.norm(x))


def test_a_bottom_that_does_not_fold_exactly_is_kept_as_it_is():
    bottom = NormFirst().eval()
    assert activations.fold_batchnorm(bottom) is bottom
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in activations.fold_batchnorm(plain).modules())
