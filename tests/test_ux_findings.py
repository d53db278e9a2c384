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


def test_the_preset_names_the_backbone_and_size_in_force_and_a_replaced_backbone_brings_its_size():
    from finetune_core.config import native_image_size, preset_description, preset_for_machine

    text = preset_description("fast", "efficientnet_lite0", 224)
    assert "efficientnet_lite0 at 224 px" in text.lower().replace("efficientnet-lite0", "efficientnet_lite0")
    assert "Lite2 at 260" not in text
    assert native_image_size("efficientnet_lite2") == 260 and native_image_size("resnet18") == 224
    assert native_image_size("no_such_net") is None
    config, note = preset_for_machine("fast", ["efficientnet_lite0"])  # Lite2's weights are not here
    assert (config.backbone, config.image_size) == ("efficientnet_lite0", 224) and "224 px" in note


def test_changing_the_backbone_on_train_brings_its_native_size_and_the_preset_text_follows(dashboard_env):
    from conftest import page

    at = page("pages/1_Train.py").run()
    assert at.session_state["preset"] == "fast" and at.number_input(key="f_image_size").value == 260
    at.selectbox(key="f_backbone").set_value("efficientnet_lite0").run()
    assert at.number_input(key="f_image_size").value == 224
    assert any("EfficientNet-Lite0 at 224 px" in c.value for c in at.caption)
    assert not any("Lite2 at 260" in c.value for c in at.caption)
