"""Backbones, weight sources, heads and parameter groups."""
from __future__ import annotations

import math
import os

import pytest
import torch
from PIL import Image
from torch import nn

from finetune_core import models
from finetune_core.config import ConfigError, TrainConfig, preset_config
from finetune_core.models import (BACKBONES, WeightsError, WeightsUnavailable, build_model, get_head,
                                  head_parameter_names, parameter_groups)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_builds_with_a_new_xavier_head(name):
    torch.manual_seed(0)
    model = build_model(name, n_classes=3, weights="none").eval()
    head = get_head(model, name)
    assert isinstance(head, nn.Linear) and head.out_features == 3
    bound = math.sqrt(6.0 / (head.in_features + head.out_features))  # Xavier-uniform's range
    assert head.weight.abs().max() <= bound and head.weight.abs().max() > 0.5 * bound
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3)


def sample_photo(name: str) -> Image.Image:
    import sklearn.datasets

    return Image.open(os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", name)).convert("RGB")


def test_bundled_lite0_weights_classify_real_photos():
    """The pip package's weights, mapped onto timm's Lite0, still know ImageNet: scikit-learn ships
    two real photos, a daisy and the Summer Palace."""
    from finetune_core.predict import Predictor

    model = BACKBONES["efficientnet_lite0"].build()
    model.load_state_dict(models.pretrained_state_dict("efficientnet_lite0"), strict=True)
    predictor = Predictor(model, [str(i) for i in range(1000)], 224, (0.5,) * 3, (0.5,) * 3)
    daisy, palace = predictor.probabilities([sample_photo("flower.jpg"), sample_photo("china.jpg")])
    assert int(daisy.argmax()) == 985  # ImageNet 985: daisy
    assert 698 in palace.topk(5).indices.tolist()  # ImageNet 698: palace


def test_auto_weights_work_offline_for_lite0():
    assert "efficientnet_lite0" in models.offline_backbones()
    torch.manual_seed(0)
    a = build_model("efficientnet_lite0", 2, "auto")
    b = build_model("efficientnet_lite0", 2, "none")
    assert not torch.equal(a.conv_stem.weight, b.conv_stem.weight)


def test_torchvision_weights_offline_give_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dest, timeout):
        raise OSError("network is unreachable")

    monkeypatch.setattr(models, "_download", offline)
    with pytest.raises(WeightsUnavailable) as info:
        build_model("resnet18", 2, "auto")
    text = str(info.value)
    assert "resnet18-f37072fd.pth" in text and str(tmp_path / "hub" / "checkpoints") in text
    assert "efficientnet_lite0" in text and "'none'" in text


def test_torchvision_weights_are_taken_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(models, "_download", lambda *a: pytest.fail("must not download a cached file"))
    reference = BACKBONES["resnet18"].build()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert "resnet18" in models.offline_backbones()
    model = build_model("resnet18", 2, "auto")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 2


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_file_loads(tmp_path, suffix):
    reference = BACKBONES["resnet18"].build()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(reference.state_dict(), str(path))
    else:
        torch.save({"model": reference.state_dict()}, path)
    model = build_model("resnet18", 5, str(path))
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert model.fc.out_features == 5


def test_local_weights_that_do_not_fit_are_reported_by_name(tmp_path):
    state = BACKBONES["resnet18"].build().state_dict()
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsError) as info:
        build_model("resnet18", 2, str(tmp_path / "bad.pt"))
    text = str(info.value)
    assert "layer4.1.bn2.weight" in text and "extra.weight" in text and "conv1.weight" in text


def test_a_checkpoint_that_could_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="cannot be loaded"):
        build_model("resnet18", 2, str(tmp_path / "evil.pt"))


def test_parameter_groups_hold_exactly_the_expected_tensors():
    model = build_model("resnet18", 2, "none")
    head_ids = {id(model.fc.weight), id(model.fc.bias)}
    all_ids = {id(p) for p in model.parameters()}

    groups = parameter_groups(model, "resnet18", lr=1e-3, head_lr_mult=10)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert {id(p) for p in groups[1]["params"]} == head_ids
    assert {id(p) for p in groups[0]["params"]} == all_ids - head_ids
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] == pytest.approx(1e-2)

    single = parameter_groups(model, "resnet18", lr=1e-3, param_groups=False)
    assert len(single) == 1 and {id(p) for p in single[0]["params"]} == all_ids and single[0]["lr"] == 1e-3

    frozen = parameter_groups(model, "resnet18", lr=1e-3, freeze_backbone=True)
    assert len(frozen) == 1 and {id(p) for p in frozen[0]["params"]} == head_ids
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in head_parameter_names("resnet18"))


def test_summed_loss_gradient_is_batch_size_times_the_mean():
    from finetune_core.engine import batch_loss

    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    grads = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(1)
        lin = nn.Linear(8, 3)
        total, per_example = batch_loss(lin(x), y, reduction)
        total.backward()
        grads[reduction] = lin.weight.grad
        assert per_example.shape == (16,)
    assert torch.allclose(grads["sum"], 16 * grads["mean"], atol=1e-5)


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,text", [
    ("lr", 0.0, "greater than zero"), ("lr", -1.0, "greater than zero"), ("lr", float("nan"), "finite"),
    ("lr", float("inf"), "finite"), ("batch_size", 0, "at least 1"), ("epochs", 0, "at least 1"),
    ("head_lr_mult", -2.0, "greater than zero"), ("backbone", "vgg99", "unknown backbone 'vgg99'"),
    ("loss_reduction", "max", "'sum' or 'mean'"), ("momentum", 1.5, "below 1"), ("image_size", 8, "at least 16"),
    ("weight_decay", -0.1, "zero or more"), ("device", "tpu", "auto, cpu"), ("batch_size", 2.5, "whole number"),
])
def test_invalid_settings_are_refused_by_name(field, value, text):
    errors = TrainConfig(data="x", **{field: value}).validate()
    assert field in errors and text in errors[field], errors
    with pytest.raises(ConfigError, match=field):
        TrainConfig(data="x", **{field: value}).check()


def test_defaults_are_the_books_fine_tuning_run():
    c = TrainConfig(data="x")
    assert (c.backbone, c.lr, c.head_lr_mult, c.param_groups, c.loss_reduction, c.weight_decay, c.batch_size,
            c.epochs, c.image_size, c.momentum) == ("resnet18", 5e-5, 10.0, True, "sum", 1e-3, 128, 5, 224, 0.0)
    scratch = preset_config("book-scratch", data="x")
    assert (scratch.weights, scratch.lr, scratch.param_groups) == ("none", 5e-4, False)
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown setting"):
        TrainConfig.from_dict({"data": "x", "learning_rate": 1})


def test_a_runs_checkpoint_as_weights_keeps_its_trained_head(tmp_path):
    torch.manual_seed(3)
    trained = build_model("resnet18", 4, "none")
    torch.save({"model": trained.state_dict(), "epoch": 2}, tmp_path / "checkpoint_last.pt")
    again = build_model("resnet18", 4, str(tmp_path / "checkpoint_last.pt"))
    assert torch.equal(again.fc.weight, trained.fc.weight) and torch.equal(again.layer2[0].conv1.weight,
                                                                           trained.layer2[0].conv1.weight)
    other = build_model("resnet18", 3, str(tmp_path / "checkpoint_last.pt"))  # another class count: new head
    assert other.fc.out_features == 3 and torch.equal(other.conv1.weight, trained.conv1.weight)
