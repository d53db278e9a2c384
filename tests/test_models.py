"""Backbones, weight sources, heads, stage splits and parameter groups."""
from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import urllib.request

import pytest
import torch
from PIL import Image
from torch import nn

from finetune_core import models
from finetune_core.config import ConfigError, TrainConfig, preset_config
from finetune_core.models import (BACKBONES, WeightsError, WeightsUnavailable, build_model, get_head,
                                  head_parameter_names, parameter_groups, split_model, stage_names,
                                  train_stages_choices, trainable_parameters, trainable_summary)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty $TORCH_HOME, so that tests see no cached torchvision weights whatever this machine has
    in ~/.cache/torch (a developer's machine usually holds resnet18-f37072fd.pth)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert models.torch_hub_checkpoints() == tmp_path / "torch" / "hub" / "checkpoints"
    return tmp_path / "torch" / "hub" / "checkpoints"


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


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_bundled_lite_weights_load_strictly_and_know_imagenet(name):
    """The pip packages' weights, mapped onto timm's Lite models, fill every tensor and still know
    ImageNet: scikit-learn ships two real photos, the Summer Palace and a daisy."""
    from finetune_core.predict import Predictor

    spec = BACKBONES[name]
    model = spec.build()
    state = models.pretrained_state_dict(name)
    model.load_state_dict(state, strict=True)
    assert len(state) == len(model.state_dict())
    predictor = Predictor(model, [str(i) for i in range(1000)], spec.native_size, spec.mean, spec.std)
    daisy, palace = predictor.probabilities([sample_photo("flower.jpg"), sample_photo("china.jpg")])
    assert 698 in palace.topk(5).indices.tolist()  # ImageNet 698: palace
    assert palace.max() > 10 / 1000 and daisy.max() > 10 / 1000  # confident, far from uniform
    if name == "efficientnet_lite0":
        assert int(daisy.argmax()) == 985  # ImageNet 985: daisy


def test_lite_stage_repeats_are_read_from_timm():
    assert models.lite_stage_repeats("efficientnet_lite0") == (1, 2, 2, 3, 3, 4, 1)
    assert models.lite_stage_repeats("efficientnet_lite1") == (1, 3, 3, 4, 4, 5, 1)
    assert models.lite_stage_repeats("efficientnet_lite2") == (1, 3, 3, 4, 4, 5, 1)
    assert [BACKBONES[f"efficientnet_lite{i}"].native_size for i in range(3)] == [224, 240, 260]
    assert BACKBONES["resnet18"].native_size == 224


def test_auto_weights_work_offline_for_the_lite_models():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(models.offline_backbones())
    torch.manual_seed(0)
    a = build_model("efficientnet_lite0", 2, "auto")
    b = build_model("efficientnet_lite0", 2, "none")
    assert not torch.equal(a.conv_stem.weight, b.conv_stem.weight)


def test_torchvision_weights_offline_give_a_clear_message(torch_home, monkeypatch):
    def offline(url, dest, timeout):
        raise OSError("network is unreachable")

    monkeypatch.setattr(models, "_download", offline)
    with pytest.raises(WeightsUnavailable) as info:
        build_model("resnet18", 2, "auto")
    text = str(info.value)
    assert "resnet18-f37072fd.pth" in text and str(torch_home) in text
    assert "efficientnet_lite0" in text and "efficientnet_lite2" in text and "'none'" in text


def test_torchvision_weights_are_taken_from_the_torch_hub_cache(torch_home, monkeypatch):
    monkeypatch.setattr(models, "_download", lambda *a: pytest.fail("must not download a cached file"))
    reference = BACKBONES["resnet18"].build()
    torch_home.mkdir(parents=True)
    torch.save(reference.state_dict(), torch_home / "resnet18-f37072fd.pth")
    assert "resnet18" in models.offline_backbones()
    model = build_model("resnet18", 2, "auto")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 2


class FakeResponse(io.BytesIO):
    """What urlopen returns, with a read that can fail part-way (a dropped connection)."""

    def __init__(self, data: bytes, fail_after: int | None = None):
        super().__init__(data)
        self.fail_after = fail_after

    def read(self, size=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise OSError("connection reset")
        return super().read(min(size, 100) if size and size > 0 else size)


def fake_urlopen(monkeypatch, data: bytes, fail_after: int | None = None) -> list:
    calls = []

    def urlopen(request, timeout=None):
        calls.append((request.full_url, timeout))
        return FakeResponse(data, fail_after)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return calls


def test_a_download_is_checked_against_the_hash_in_its_name(tmp_path, monkeypatch):
    data = b"weights" * 100
    prefix = hashlib.sha256(data).hexdigest()[:8]
    calls = fake_urlopen(monkeypatch, data)
    dest = tmp_path / "hub" / "checkpoints" / f"net-{prefix}.pth"
    models._download(f"https://example.invalid/net-{prefix}.pth", dest, timeout=10.0)
    assert dest.read_bytes() == data and calls == [(f"https://example.invalid/net-{prefix}.pth", 10.0)]
    assert os.listdir(dest.parent) == [dest.name]

    bad = tmp_path / "hub" / "checkpoints" / "net-00000000.pth"
    with pytest.raises(WeightsError, match="corrupt"):
        models._download("https://example.invalid/net-00000000.pth", bad, timeout=10.0)
    assert os.listdir(dest.parent) == [dest.name]  # no .part file, no corrupt file


def test_a_failed_download_leaves_nothing_behind_and_says_what_to_place(torch_home, monkeypatch):
    fake_urlopen(monkeypatch, b"x" * 1000, fail_after=300)
    with pytest.raises(WeightsUnavailable, match="connection reset") as info:
        models.pretrained_state_dict("resnet18")
    assert "resnet18-f37072fd.pth" in str(info.value) and str(torch_home) in str(info.value)
    assert os.listdir(torch_home) == []


def test_auto_backbone_prefers_resnet18_only_when_its_weights_are_cached(torch_home):
    assert models.AUTO_BACKBONE_ORDER[:2] == ("resnet18", "efficientnet_lite0")
    name, reason = models.resolve_backbone("auto")
    assert name == "efficientnet_lite0"
    assert reason == "efficientnet_lite0: the first backbone whose weights are on this machine"
    torch_home.mkdir(parents=True)
    (torch_home / "resnet18-f37072fd.pth").write_bytes(b"")
    assert models.resolve_backbone("auto")[0] == "resnet18"
    assert models.resolve_backbone("convnext_tiny") == ("convnext_tiny", "")


def test_the_device_choices_match_this_machine():
    auto = models.resolve_device("auto")
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert auto.type in {d.split(":")[0] for d in models.available_devices()}
    assert (auto.type == "cuda") == torch.cuda.is_available()
    assert models.device_description(auto).startswith("GPU" if auto.type == "cuda" else ("Apple" if auto.type == "mps"
                                                                                            else "CPU"))


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


@functools.lru_cache(maxsize=None)
def small_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, n_classes=3, weights="none").eval()


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_split_computes_the_model_from_its_own_modules(name):
    """For every depth, top(bottom(x)) is model(x), and bottom and top share the model's parameters
    (none copied, none lost): the frozen bottom's output is what the cache will hold."""
    model = small_model(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model_ids = [id(p) for p in model.parameters()]
    head_ids = {id(p) for p in get_head(model, name).parameters()}
    with torch.no_grad():
        expected = model(x)
        assert train_stages_choices(name) == ["head"] + [str(k) for k in range(1, len(stage_names(name)) + 1)] + ["all"]
        for train_stages in train_stages_choices(name):
            bottom, top = split_model(model, name, train_stages)
            assert torch.allclose(top(bottom(x)), expected, atol=1e-5), train_stages
            bottom_ids, top_ids = [id(p) for p in bottom.parameters()], [id(p) for p in top.parameters()]
            assert sorted(bottom_ids + top_ids) == sorted(model_ids), train_stages
            assert head_ids <= set(top_ids)
            if train_stages == "head":
                assert set(top_ids) == head_ids and bottom(x).dim() == 2  # the pooled features
            if train_stages == "all":
                assert isinstance(bottom, nn.Identity) and top is model


def test_stages_run_bottom_to_top():
    assert stage_names("resnet18") == ["layer1", "layer2", "layer3", "layer4"]
    assert stage_names("efficientnet_lite0") == [f"blocks.{i}" for i in range(7)] + ["conv_head"]
    assert stage_names("efficientnet_b0") == [f"features.{i}" for i in range(1, 9)]
    assert stage_names("mobilenet_v3_large")[-2:] == ["features.16", "classifier.0"]
    with pytest.raises(ValueError, match="from 1 to 4"):
        split_model(small_model("resnet18"), "resnet18", "5")


def test_a_split_top_trains_with_its_dropout_and_batchnorm():
    model = small_model("mobilenet_v3_large")
    _, top = split_model(model, "mobilenet_v3_large", "head")
    assert [type(m) for m in top] == [nn.Dropout, nn.Linear]
    _, top = split_model(small_model("resnet18"), "resnet18", "1")
    top.train()
    assert all(m.training for m in top.modules()) and small_model("resnet18").layer4[0].bn1.training
    small_model("resnet18").eval()


def test_trainable_summary_says_what_trains():
    assert trainable_summary("efficientnet_lite0", "head") == "head only: 2.6 k of 3.4 M parameters"
    assert trainable_summary("efficientnet_lite0", "all") == "all layers: 3.4 M parameters"
    assert trainable_summary("efficientnet_lite0", "1") == "last 1 stage + head: 414.7 k of 3.4 M parameters"
    model = build_model("efficientnet_lite0", 2, "none")
    n = sum(p.numel() for p in trainable_parameters(model, "efficientnet_lite0", "2"))
    assert trainable_summary("efficientnet_lite0", "2") == f"last 2 stages + head: {n / 1e6:.1f} M of 3.4 M parameters"
    assert trainable_summary("resnet18", "head", n_classes=10) == "head only: 5.1 k of 11.2 M parameters"


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "mobilenet_v3_large", "convnext_tiny"])
def test_parameter_groups_hold_exactly_the_trainable_parameters_at_every_depth(name):
    model = build_model(name, 2, "none")
    head_ids = {id(p) for p in get_head(model, name).parameters()}
    for train_stages in train_stages_choices(name):
        bottom, top = split_model(model, name, train_stages)
        top_ids = {id(p) for p in top.parameters()}
        body_ids = top_ids - head_ids
        for param_groups in (True, False):
            groups = parameter_groups(model, name, lr=1e-3, head_lr_mult=10, param_groups=param_groups,
                                      train_stages=train_stages)
            grouped = [id(p) for g in groups for p in g["params"]]
            assert sorted(grouped) == sorted(top_ids), (train_stages, param_groups)  # each once
            assert all(p.requires_grad == (id(p) in top_ids) for p in model.parameters())
            assert not any(p.requires_grad for p in bottom.parameters())
            by_name = {g["name"]: g for g in groups}
            if train_stages == "head":
                assert list(by_name) == ["head"]
                assert by_name["head"]["lr"] == pytest.approx(1e-2 if param_groups else 1e-3)
            elif param_groups:
                assert list(by_name) == ["backbone", "head"]
                assert {id(p) for p in by_name["backbone"]["params"]} == body_ids
                assert {id(p) for p in by_name["head"]["params"]} == head_ids
                assert by_name["backbone"]["lr"] == 1e-3 and by_name["head"]["lr"] == pytest.approx(1e-2)
            else:
                assert list(by_name) == ["all"] and by_name["all"]["lr"] == 1e-3


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


def test_freeze_backbone_is_a_deprecated_spelling_of_train_stages_head():
    model = build_model("resnet18", 2, "none")
    head_ids = {id(model.fc.weight), id(model.fc.bias)}
    with pytest.warns(DeprecationWarning):
        frozen = parameter_groups(model, "resnet18", lr=1e-3, freeze_backbone=True)
    assert len(frozen) == 1 and {id(p) for p in frozen[0]["params"]} == head_ids
    assert frozen[0]["lr"] == pytest.approx(1e-2)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in head_parameter_names("resnet18"))
    with pytest.warns(DeprecationWarning):  # the engine's old positional call
        again = parameter_groups(model, "resnet18", 1e-3, 10.0, True, False)
    assert [g["name"] for g in again] == ["backbone", "head"] and all(p.requires_grad for p in model.parameters())


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
    ("lr", float("inf"), "finite"), ("batch_size", 0, "at least 1"), ("epochs", -1, "zero or more"),
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
