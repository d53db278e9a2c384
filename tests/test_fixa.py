"""The reviewer's findings on the any-backbone work and the review's reuse of a run (round 2's
"fixa"): each test fails without its fix."""
from __future__ import annotations

import test_any_backbone
from conftest import make_dataset, tiny_train_config
from test_any_backbone import pretrained_like, put_in_hub

catalogue, hub = test_any_backbone.catalogue, test_any_backbone.hub  # its fixtures: tiny timm models, an offline hub


def test_a_review_after_a_traced_backbones_run_takes_the_features_its_head_sees(tmp_path, catalogue, hub, cache_dir):
    """A timm model split by tracing pools and normalises in forward_head, which no list of the
    top's children holds: the reused run's features are the head's input (a ViT's pooled token),
    not the flattened tokens."""
    from finetune_core import models, review
    from finetune_core.engine import train

    name = catalogue("vit")
    put_in_hub(hub, name, pretrained_like(name))
    data = make_dataset(tmp_path / "d", per_class=4, test_per_class=2)
    config = tiny_train_config(data, backbone=name, weights="auto", epochs=1, train_stages="1")
    train(config, tmp_path / "runs" / "run-1", cache_dir=cache_dir)
    pooled: dict = {}
    result = review.review_dataset(data, runs_dir=tmp_path / "runs", backbone=name, image_size=32, weights="auto",
                                   cache_dir=cache_dir, kept=set(), features_out=pooled, folds=2)
    assert result.method["backbone_images"] == 0 and "run-1" in result.method["features_from"]
    model = models.build_model(name, 2, "auto").eval()
    assert pooled["test"].shape == (4, model.get_submodule(models.backbone_spec(name).head).in_features)


def test_googlenet_is_refused_by_name_inception_v3_is_timms_and_a_model_without_stages_says_so():
    import pytest

    from finetune_core import models
    from finetune_core.config import TrainConfig

    with pytest.raises(models.UnknownBackbone, match="googlenet cannot be fine-tuned by Tuneboard: it returns"):
        models.backbone_spec("googlenet")
    assert "googlenet" not in models.torchvision_names()
    assert models.backbone_spec("inception_v3").source == "timm"  # no auxiliary outputs, its own normalisation
    # a torchvision model outside the four known layouts: head or all only, said so
    assert models.stage_names("mnasnet0_5") == []
    with pytest.raises(ValueError, match="mnasnet0_5 trains only its head or all its layers"):
        models.check_train_stages("mnasnet0_5", "1")
    errors = TrainConfig(data=".", backbone="mnasnet0_5", weights="none", train_stages="1").validate()
    assert "mnasnet0_5 trains only its head or all its layers" in str(errors)


def test_checking_a_regnet_name_leaves_the_processs_random_stream_alone_and_counts_its_parameters():
    """torchvision's RegNet cannot be built on the meta device: its structure build runs under
    seeded_init, so a page checking the name does not shift a running run's draws."""
    import torch

    from finetune_core import models

    models.forget_backbones()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.backbone_spec("regnet_y_400mf")
    assert torch.equal(torch.rand(3), expected)
    assert 4_000_000 < models.parameter_count("regnet_y_400mf") < 4_600_000  # 4.3 M with its ImageNet head
    models.forget_backbones()


def test_a_fixed_size_timm_model_at_another_image_size_is_refused_naming_the_size_it_needs():
    from finetune_core.config import TrainConfig

    errors = TrainConfig(data="d", backbone="vit_small_patch16_224", weights="none", image_size=160).validate()
    assert errors["image_size"] == ("Image size must be 224 for vit_small_patch16_224, which takes only 224 px "
                                    "images, got 160")
    assert "image_size" not in TrainConfig(data="d", backbone="vit_small_patch16_224", weights="none").validate()
    assert "image_size" not in TrainConfig(data="d", backbone="convnext_atto", weights="none",
                                           image_size=160).validate()  # any size


def test_the_backbone_settings_choices_are_the_pickers():
    """One source: models.backbone_choices (the registry, then torchvision's and timm's names)."""
    from finetune_core import config

    choices = config.settings()["backbone"].choice_list()
    assert choices[:2] == ["auto", "resnet18"] and {"regnet_y_400mf", "convnext_tiny.fb_in22k_ft_in1k"} <= set(choices)
