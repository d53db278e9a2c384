"""Heatmaps (issue 24): where the model looks, for every backbone family Tuneboard offers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_BACKBONE
from finetune_core.heatmaps import Heatmapper, feature_layer, peak
from finetune_core.models import BACKBONES, build_model
from finetune_core.predict import Predictor

SIDE = 64


def corner_images(n: int, seed: int = 0) -> tuple[list[Image.Image], torch.Tensor]:
    """Noise photos; class 1 has a bright square in the top-left corner, class 0 none: the corner alone
    decides the class."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k in range(n):
        arr = rng.integers(0, 120, (SIDE, SIDE, 3), dtype=np.uint8)
        if k % 2:
            arr[4:26, 4:26] = 250
        images.append(Image.fromarray(arr))
        labels.append(k % 2)
    return images, torch.tensor(labels)


def tiny_predictor(backbone: str = TINY_BACKBONE, model: torch.nn.Module | None = None) -> Predictor:
    torch.manual_seed(0)
    spec = BACKBONES[backbone]
    model = model if model is not None else build_model(backbone, 2, weights="none")
    return Predictor(model, ["plain", "corner"], SIDE, spec.mean, spec.std, backbone)


def small_family_member(family: str) -> torch.nn.Module:
    """A cut-down member of each backbone family Tuneboard offers (the same classes, fewer and
    narrower blocks): the layer search sees the structure, not the size."""
    import torchvision.models as tvm
    from torchvision.models.convnext import CNBlockConfig
    from torchvision.models.resnet import BasicBlock

    if family == "resnet":
        return tvm.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=2)
    if family == "mobilenet_v3":
        return tvm.mobilenet_v3_small(num_classes=2)
    if family == "efficientnet":
        return tvm.efficientnet_b0(num_classes=2)
    if family == "convnext":
        return tvm.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)],
                            num_classes=2)
    return build_model(TINY_BACKBONE, 2, weights="none")  # timm's EfficientNet(-Lite)


@pytest.mark.parametrize("family", ["resnet", "mobilenet_v3", "efficientnet", "convnext", "timm_lite"])
def test_the_heatmap_covers_the_crop_in_0_to_1_for_each_backbone_family(family):
    """One of each family (torchvision ResNet, MobileNet-V3, EfficientNet and ConvNeXt, timm
    EfficientNet-Lite), at random init: the layer is found from the model's structure."""
    predictor = tiny_predictor(model=small_family_member(family))
    maps, explained = Heatmapper(predictor).heatmaps(corner_images(2)[0], class_index=1)
    assert maps.shape == (2, SIDE, SIDE) and maps.dtype == np.float32 and explained == [1, 1]
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and np.isfinite(maps).all()


def test_the_target_layer_is_the_last_feature_map_before_the_pooling():
    assert feature_layer(small_family_member("resnet"), SIDE)[0] == "layer4"
    assert feature_layer(build_model(TINY_BACKBONE, 2, weights="none"), SIDE)[0] == "bn2"


def test_a_model_without_a_feature_map_is_refused_with_a_message():
    from finetune_core.heatmaps import HeatmapError

    tokens = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(HeatmapError, match="no feature map"):
        feature_layer(tokens, 8)


@pytest.mark.slow
def test_the_heatmap_of_an_image_decided_by_one_corner_peaks_in_that_corner():
    predictor = tiny_predictor()
    images, labels = corner_images(64)
    x, _ = Heatmapper(predictor).inputs(images)
    model = predictor.model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(60):
        idx = torch.arange(step * 16, step * 16 + 16) % len(images)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test_images, test_labels = corner_images(8, seed=1)
    assert [p.top[0][0] for p in (predictor.predict_bytes(png(i), "i") for i in test_images)] == \
        ["plain", "corner"] * 4  # it learnt the corner
    maps, explained = Heatmapper(predictor).heatmaps(test_images[1::2])
    assert explained == [1] * 4
    for m in maps:
        row, col = peak(m)
        assert row < SIDE // 2 and col < SIDE // 2, (row, col)  # the top-left quarter


def png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_predict_writes_a_heatmap_per_image_for_the_answer_or_a_chosen_class(tmp_path, capsys):
    """`predict --run R DIR --heatmaps OUT [--heatmap-class C]` on a tiny run's test folder."""
    from conftest import make_tiny_dataset, tiny_train_config
    from finetune_core.__main__ import main as cli_main
    from finetune_core.engine import train

    data = make_tiny_dataset(tmp_path / "tiny")
    train(tiny_train_config(data, epochs=1), tmp_path / "run", cache_dir="")
    code = cli_main(["predict", "--run", str(tmp_path / "run"), str(data / "test"), "--heatmaps", str(tmp_path / "h"),
                     "--heatmap-class", "dog"])
    assert code == 0, capsys.readouterr().err
    written = sorted((tmp_path / "h").iterdir())
    assert len(written) == 8 and all(p.name.endswith("_dog.png") for p in written)
    assert Image.open(written[0]).size == (32, 32)  # the centre crop the model sees
    assert cli_main(["predict", "--run", str(tmp_path / "run"), str(data / "test"), "--heatmaps", str(tmp_path / "x"),
                     "--heatmap-class", "hot dog"]) == 2
    assert "not one of the run's classes: cat, dog" in capsys.readouterr().err
