"""A first user's findings on the Home, Train and Compare pages, fixed in the library."""
from __future__ import annotations

from finetune_core import models


def test_the_backbones_line_and_what_trains_count_the_same_parameters():
    """The Train page showed the backbone with its ImageNet head (1000 classes) beside what trains
    with the dataset's head: two totals for one model. Both now count the model a run fine-tunes."""
    for backbone, n_classes in (("tiny_lite", 3), ("efficientnet_lite0", 10)):
        total = models.trainable_summary(backbone, "all", n_classes=n_classes).split(": ")[1].split(" parameters")[0]
        assert models.backbone_details(backbone, n_classes).startswith(f"{total} parameters with a {n_classes}-class")
    assert models.parameter_count("efficientnet_lite0") - models.parameter_count("efficientnet_lite0", 2) == 1281 * 998
