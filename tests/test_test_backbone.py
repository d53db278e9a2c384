"""The test suite's tiny backbone: known to the tests and the processes they start, never to users."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_BACKBONE
from finetune_core import models

LISTS = ("import json; from finetune_core import config, models; "
         "print(json.dumps([list(models.BACKBONES), config.settings()['backbone'].choice_list()]))")


def backbone_lists(environ: dict) -> tuple[list[str], list[str]]:
    """(the registry, the backbone setting's choices) as a fresh interpreter with `environ` sees them."""
    done = subprocess.run([sys.executable, "-c", LISTS], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=120, check=True)
    return tuple(json.loads(done.stdout))


@pytest.mark.slow
def test_the_tiny_backbone_is_registered_only_where_the_tests_ask_for_it():
    """A user's dashboard or command line (no TUNEBOARD_TEST_BACKBONE) lists only real backbones.
    The processes the tests start inherit the variable and know it: the command-line, torchrun and
    dashboard tests that train it would fail otherwise."""
    assert models.TEST_BACKBONE == TINY_BACKBONE and TINY_BACKBONE in models.BACKBONES
    user = {k: v for k, v in os.environ.items() if k != models.TEST_BACKBONE_VARIABLE}
    registry, choices = backbone_lists(user)
    assert TINY_BACKBONE not in registry and TINY_BACKBONE not in choices
    assert "resnet18" in registry and "resnet18" in choices


def test_the_tiny_backbone_has_no_imagenet_weights_to_offer():
    """It never counts as available offline, and asking for its ImageNet weights says why not."""
    assert TINY_BACKBONE not in models.offline_backbones() and models.cached_weights_path(TINY_BACKBONE) is None
    with pytest.raises(models.WeightsUnavailable, match="tiny_lite has no ImageNet weights: train it with weights 'none'"):
        models.build_model(TINY_BACKBONE, 2, "auto")
