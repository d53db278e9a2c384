"""Kept activations (activations/ in the cache folder) are reused only by a frozen part that
computes the same outputs: the same weights, whatever the settings that do not shape them."""
from __future__ import annotations

import torch
from torch import nn

from conftest import make_dataset, tiny_train_config
from finetune_core import activations
from finetune_core.engine import Reporter, setup
from finetune_core.runs import RunDir


def frozen_part(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(3, 4, 8, stride=8)


def test_kept_activations_are_reused_only_by_the_same_frozen_weights(tmp_path, monkeypatch):
    """A starting-weights file changed between runs (or a resumed run's checkpoint holding other
    weights for the frozen part) gives other activations: they are computed again, not read from
    the first run's file. Equal weights read it, also when `processes` was auto in the first (the
    LR finder) and resolved to 1 in the next (the run)."""
    root = make_dataset(tmp_path / "d", per_class=4, test_per_class=1, size=(32, 32))
    computed = []
    real = activations.FeatureCache._compute
    monkeypatch.setattr(activations.FeatureCache, "_compute",
                        lambda self, *key: (computed.append(key), real(self, *key))[1])

    def outputs(bottom: nn.Module, processes: int) -> torch.Tensor:
        config = tiny_train_config(root, train_stages="1", processes=processes)
        run = RunDir(tmp_path / "run")
        run.path.mkdir(exist_ok=True)
        reporter = Reporter(run, None, None)
        ctx = setup(config, run, reporter, cache_dir=str(tmp_path / "cache"))
        return activations.FeatureCache(bottom, ctx, reporter, stages="1").get("train", 0)

    first = outputs(frozen_part(0), processes=0)
    assert torch.equal(outputs(frozen_part(0), processes=1), first) and len(computed) == 1  # read, not computed
    other = outputs(frozen_part(1), processes=1)
    assert len(computed) == 2, "activations of other frozen weights were read from the cache"
    assert not torch.equal(other, first)
