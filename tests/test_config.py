"""The settings: one definition per setting (TrainConfig's field metadata), and what is derived
from it: validation worded with the label the user sees, form parsing, presets, what has no
effect for a given config, and the library's decisions the pages used to make."""
from __future__ import annotations

import dataclasses

import pytest

from finetune_core import analysis
from finetune_core.config import (PRESETS, SECTIONS, ConfigError, TrainConfig, compare_settings, comparison_configs,
                                  config_from_form, default_preset, form_settings, inactive_settings, preset_config,
                                  preset_for_machine, quick_start_config, saved_settings, setting_notes, settings)


def test_every_setting_is_defined_once_with_its_label_type_and_section():
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(settings()) == fields
    for name, s in settings().items():
        assert s.name == name and s.label and s.section in SECTIONS, name
        assert s.kind in (bool, int, float, str, tuple), name
        assert s.default == TrainConfig.__dataclass_fields__[name].default
    assert settings()["lr"].label == "Learning rate" and settings()["lr"].kind is float
    assert settings()["image_size"].display_label == "Image size (px)"
    assert "freeze_backbone" not in settings()


def test_the_defaults_are_the_books_fine_tuning_run_and_valid():
    c = TrainConfig(data="x")
    assert (c.backbone, c.train_stages, c.lr, c.head_lr_mult, c.param_groups, c.loss_reduction) == \
        ("resnet18", "all", 5e-5, 10.0, True, "sum")
    assert (c.val_fraction, c.patience, c.label_smoothing, c.tta_flip) == (0.0, 0, 0.0, False)
    assert c.validate() == {}


@pytest.mark.parametrize("changes,field,message", [
    (dict(lr=-1.0), "lr", "Learning rate must be greater than zero, got -1"),
    (dict(lr="abc"), "lr", "Learning rate must be a number, got 'abc'"),
    (dict(epochs=2.5), "epochs", "Epochs must be a whole number, got 2.5"),
    (dict(param_groups="yes"), "param_groups", "must be on or off"),
    (dict(momentum=1.0), "momentum", "Momentum must be below 1, got 1"),
    (dict(weight_decay=-0.1), "weight_decay", "Weight decay must be zero or more"),
    (dict(image_size=2048), "image_size", "Image size must be at most 1024"),
    (dict(label_smoothing=1.0), "label_smoothing", "Label smoothing must be below 1"),
    (dict(val_fraction=0.9), "val_fraction", "Validation fraction must be below 0.9"),
    (dict(val_fraction=-0.1), "val_fraction", "Validation fraction must be zero or more"),
    (dict(patience=-1), "patience", "Early-stopping patience must be zero or more"),
    (dict(tta_flip=1), "tta_flip", "must be on or off"),
    (dict(train_stages="some"), "train_stages", "Trainable part must be head, all or a number of stages"),
    (dict(train_stages="0"), "train_stages", "Trainable part must be head, all or a number of stages"),
    (dict(train_stages=2), "train_stages", "Trainable part must be text"),
    (dict(backbone="vgg99"), "backbone", "unknown backbone 'vgg99'"),
    (dict(loss_reduction="max"), "loss_reduction", "Loss over a batch must be 'sum' or 'mean', got 'max'"),
    (dict(device="tpu"), "device", "Device must be auto, cpu, cuda, cuda:N or mps"),
    (dict(warmup_epochs=9, epochs=5), "warmup_epochs", "Warm-up epochs must not exceed the epochs (5)"),
    (dict(mean=(0.5, 0.5)), "mean", "Normalisation mean must be three numbers"),
    (dict(std=(0.5, 0.0, 0.5)), "std", "Normalisation std must be greater than zero"),
    (dict(data=""), "data", "Dataset folder must be given"),
])
def test_a_wrong_value_is_reported_with_the_label_the_user_sees(changes, field, message):
    config = TrainConfig(**{"data": "x", **changes})
    errors = config.validate()  # reports, never raises, whatever the type
    assert message in errors[field], errors
    with pytest.raises(ConfigError, match=field):
        config.check()


@pytest.mark.parametrize("value", [None, "text", 1.5, 2, True, [1], {"a": 1}, object(), float("nan"), ""])
def test_every_setting_reports_a_value_of_the_wrong_type_instead_of_raising(tmp_path, value):
    from finetune_core.config import check_value, settings

    for name, s in settings().items():
        config = TrainConfig(data=str(tmp_path), weights="none").replace(**{name: value})
        for check_paths in (False, True):
            errors = config.validate(check_paths=check_paths)  # never raises, whatever the type
            if check_value(s, value) is not None:
                assert errors.get(name, "").startswith(s.label), (name, value, errors)


def test_train_stages_is_checked_against_the_backbones_stages():
    from finetune_core import models

    n = len(models.stage_names("resnet18"))
    assert TrainConfig(data="x", train_stages=str(n)).validate() == {}
    assert TrainConfig(data="x", train_stages="head").validate() == {}
    too_deep = TrainConfig(data="x", train_stages=str(n + 1)).validate()
    assert f"from 1 to {n} for resnet18" in too_deep["train_stages"]


def test_train_stages_with_auto_is_checked_against_the_backbone_auto_resolves_to(monkeypatch):
    from finetune_core import models

    monkeypatch.setattr(models, "resolve_backbone", lambda name: ("resnet18", "") if name == "auto" else (name, ""))
    n = len(models.stage_names("resnet18"))
    assert TrainConfig(data="x", backbone="auto", train_stages=str(n)).validate() == {}
    too_deep = TrainConfig(data="x", backbone="auto", train_stages=str(n + 1)).validate()
    assert f"from 1 to {n} for auto (resnet18 on this machine), got '{n + 1}'" in too_deep["train_stages"], too_deep
    assert TrainConfig(data="x", backbone="auto", train_stages="head").validate() == {}


def test_paths_are_checked_when_asked(tmp_path):
    config = TrainConfig(data=str(tmp_path / "missing"), weights=str(tmp_path / "w.pt"))
    assert config.validate() == {}
    errors = config.validate(check_paths=True)
    assert "no such folder" in errors["data"] and "no such weights file" in errors["weights"]


def test_a_device_this_machine_lacks_is_refused_when_paths_are_checked(tmp_path, monkeypatch):
    import torch

    from finetune_core import models

    monkeypatch.setattr(models, "available_devices", lambda: ["auto", "cpu"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for device in ("cuda", "cuda:0", "mps"):
        config = TrainConfig(data=str(tmp_path), device=device)
        assert config.validate() == {}  # the value is well formed: only this machine lacks it
        assert config.validate(check_paths=True)["device"] == \
            f"Device {device} is not on this machine; available: auto, cpu", device
    assert TrainConfig(data=str(tmp_path), device="cpu").validate(check_paths=True) == {}

    monkeypatch.setattr(models, "available_devices", lambda: ["auto", "cpu", "cuda", "cuda:0", "cuda:1"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device in ("cuda", "cuda:0", "cuda:1"):
        assert TrainConfig(data=str(tmp_path), device=device).validate(check_paths=True) == {}, device
    beyond = TrainConfig(data=str(tmp_path), device="cuda:2").validate(check_paths=True)
    assert beyond["device"] == "Device cuda:2 is not on this machine; available: auto, cpu, cuda, cuda:0, cuda:1"

    monkeypatch.setattr(models, "available_devices", lambda: ["auto", "cpu", "cuda"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU: cuda:0 is it, cuda:1 is not
    assert TrainConfig(data=str(tmp_path), device="cuda:0").validate(check_paths=True) == {}
    assert "cuda:1 is not on this machine" in TrainConfig(data=str(tmp_path), device="cuda:1").validate(
        check_paths=True)["device"]


def test_old_run_folders_still_load_and_unknown_settings_are_refused():
    old = {"data": "x", "lr": 0.01, "freeze_backbone": True}
    assert TrainConfig.from_dict(old).train_stages == "head"
    assert TrainConfig.from_dict({**old, "freeze_backbone": False}).train_stages == "all"
    assert TrainConfig.from_dict(old).freeze_backbone  # the read-only old spelling
    c = preset_config("fast", data="x", mean=(0.5, 0.5, 0.5))
    assert TrainConfig.from_dict(c.to_dict()) == c and c.to_dict()["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match="unknown setting"):
        TrainConfig.from_dict({"data": "x", "learning_rate": 1})
    assert saved_settings({"lr": 0.1, "freeze_backbone": True, "gone": 1}) == {
        **TrainConfig().to_dict(), "lr": 0.1, "train_stages": "head", "mean": None, "std": None}


def test_the_form_sends_text_and_gets_numbers_or_labelled_errors(tmp_path):
    config, errors = config_from_form({"data": str(tmp_path), "lr": " 5e-5 ", "epochs": "3", "batch_size": 16.0,
                                       "label_smoothing": "0.1", "param_groups": False})
    assert errors == {} and (config.lr, config.epochs, config.batch_size, config.label_smoothing) == (5e-5, 3, 16, 0.1)
    config, errors = config_from_form({"data": str(tmp_path), "lr": "fast", "epochs": "2.5", "patience": "x"})
    assert config is None
    assert errors == {"lr": "Learning rate must be a number, got 'fast'",
                      "epochs": "Epochs must be a whole number, got '2.5'",
                      "patience": "Early-stopping patience must be a whole number, got 'x'"}
    assert "unknown setting" in config_from_form({"data": str(tmp_path), "freeze": True})[1]["freeze"]


def test_presets_are_valid_settings_and_name_their_backbone():
    for name, values in PRESETS.items():
        assert set(values) <= set(settings()), name
        assert preset_config(name, data="x").validate() == {}, name
    for name in ("book-finetune", "book-scratch"):
        assert (PRESETS[name]["backbone"], PRESETS[name]["train_stages"]) == ("resnet18", "all")
    assert PRESETS["fast"]["backbone"] != "auto"  # a preset names its backbone (tests/test_finetune.py checks it)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_config("slow")


def test_the_default_preset_is_the_book_on_a_gpu_and_fast_elsewhere():
    assert default_preset("cuda") == "book-finetune" and default_preset("mps") == "book-finetune"
    assert default_preset("cpu") == "fast"


def test_a_preset_uses_a_backbone_whose_weights_are_here():
    config, note = preset_for_machine("book-finetune", ["efficientnet_lite0"])
    assert config.backbone == "efficientnet_lite0" and "resnet18" in note
    config, note = preset_for_machine("book-finetune", ["resnet18", "efficientnet_lite0"])
    assert config.backbone == "resnet18" and note == ""
    config, note = preset_for_machine("book-scratch", [])  # random init needs no weights
    assert config.backbone == "resnet18" and note == ""


def test_the_quick_start_recipe():
    config = quick_start_config("/data/digits", ["efficientnet_lite0"])
    assert (config.preset, config.backbone, config.weights, config.image_size, config.data) == \
        ("fast", "efficientnet_lite0", "auto", 128, "/data/digits")
    assert config.validate() == {}
    nothing_offline = quick_start_config("/data/digits", [])
    assert (nothing_offline.weights, nothing_offline.train_stages) == ("none", "all")


def test_what_has_no_effect_says_why():
    book = TrainConfig(data="x")
    assert set(inactive_settings(book)) == {"feature_views"}  # every layer trains on fresh crops
    assert "feature_views" not in inactive_settings(book.replace(warmup_epochs=1))  # warm-up uses cached views

    one_group = inactive_settings(book.replace(param_groups=False))
    assert one_group["head_lr_mult"] == "one group at the learning rate: the multiplier has no effect"

    head = book.replace(train_stages="head")
    assert "param_groups" not in inactive_settings(head) and "head_lr_mult" not in inactive_settings(head)
    assert setting_notes(head)["param_groups"] == "only the head trains: one group, at lr × multiplier"
    assert setting_notes(head)["head_lr_mult"].endswith("act only as their product, 0.0005")  # 5e-5 × 10
    assert "warmup_epochs" in inactive_settings(head) and "feature_views" not in inactive_settings(head)
    assert "head_lr_mult" in inactive_settings(head.replace(param_groups=False))

    assert "patience" not in inactive_settings(book.replace(patience=2, epochs=10))
    assert "patience" in inactive_settings(book.replace(patience=4, epochs=5))  # cannot stop before the end
    assert "test split" in setting_notes(book.replace(patience=2, epochs=10))["patience"]
    assert set(inactive_settings(book.replace(param_groups="yes", patience="x"))) == {"feature_views"}  # no raise


def test_crop_scale_has_no_effect_when_only_the_centre_view_is_cached():
    book = TrainConfig(data="x")
    why = "only the centre view of each image is cached (1 view): no random crops are taken"
    for stages in ("head", "1", "2"):
        assert inactive_settings(book.replace(train_stages=stages, feature_views=1))["crop_scale"] == why, stages
        assert "crop_scale" not in inactive_settings(book.replace(train_stages=stages, feature_views=2))
        assert "crop_scale" not in inactive_settings(book.replace(train_stages=stages, feature_views=0))  # auto: 2-4
    # every layer trains on fresh random crops after any warm-up
    assert "crop_scale" not in inactive_settings(book.replace(train_stages="all", feature_views=1))
    assert "crop_scale" not in inactive_settings(book.replace(train_stages="all", feature_views=1, warmup_epochs=1))
    assert "crop_scale" not in inactive_settings(book.replace(train_stages="head", feature_views="1"))  # no raise


def test_the_scratch_comparison_is_the_books_scratch_run_on_the_same_data():
    fast = preset_config("fast", data="/d", device="cpu", seed=3, test_fraction=0.3, val_fraction=0.1, epochs=12,
                         name="mine")
    run, scratch = comparison_configs(fast, also_scratch=True, group="g")
    assert run == fast.replace(group="g")
    book = preset_config("book-scratch")
    # the book's scratch recipe: summed loss, batch 128, one group at lr 5e-4, random init, every layer
    for name in ("loss_reduction", "batch_size", "lr", "param_groups", "weights", "train_stages", "momentum",
                 "schedule", "label_smoothing", "weight_decay", "feature_views", "crop_scale", "tta_flip"):
        assert getattr(scratch, name) == getattr(book, name), name
    assert (scratch.loss_reduction, scratch.batch_size, scratch.lr, scratch.param_groups) == ("sum", 128, 5e-4, False)
    # ...on this run's data, model, hardware and split
    assert (scratch.data, scratch.backbone, scratch.image_size, scratch.epochs, scratch.device, scratch.seed,
            scratch.precision, scratch.test_fraction, scratch.val_fraction, scratch.group) == \
        ("/d", "efficientnet_lite2", 260, 12, "cpu", 3, "bf16", 0.3, 0.1, "g")
    assert (scratch.preset, scratch.name) == ("book-scratch", "mine (scratch)")
    assert scratch.validate() == {}


def test_the_settings_are_complete_at_import_and_safe_to_read_from_threads():
    """A fresh interpreter: the dashboard's script threads call settings() at once, and a dict
    filled lazily could be seen half-filled by one of them."""
    import subprocess
    import sys

    from conftest import ROOT

    probe = ("import dataclasses, sys, threading; sys.setswitchinterval(1e-6)\n"
             "from finetune_core import config\n"
             "n = len(dataclasses.fields(config.TrainConfig))\n"
             "complete = len(config._SETTINGS) == n\n"
             "seen = []\n"
             "threads = [threading.Thread(target=lambda: seen.append(len(config.settings()))) for _ in range(8)]\n"
             "[t.start() for t in threads]; [t.join() for t in threads]\n"
             "print(complete, seen == [n] * 8)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "True True", out.stdout + out.stderr


def test_the_config_has_no_guards_for_functions_the_model_registry_always_has():
    import inspect

    from finetune_core import config

    assert "getattr(models" not in inspect.getsource(config)


def test_the_form_the_command_line_and_the_compare_table_come_from_the_definitions():
    from finetune_core.__main__ import subcommand_flags

    flags = subcommand_flags("train")
    for name, s in settings().items():
        if s.flag_name:
            assert s.flag_name in flags, name
    assert {"--no-param-groups", "--freeze-backbone", "--head-lr-mult", "--runs-dir", "--json", "--quiet"} <= flags
    assert form_settings() == [n for n, s in settings().items() if s.form]
    assert "train_stages" in form_settings() and "data" not in form_settings()
    assert analysis.COMPARE_SETTINGS == compare_settings()
    assert {"lr", "head_lr_mult", "param_groups", "train_stages", "val_fraction", "tta_flip"} <= set(compare_settings())


def test_launch_warnings_flag_rates_far_outside_the_usual_range_for_the_loss_reduction():
    from finetune_core.config import PRESETS, launch_warnings, preset_config

    for preset in PRESETS:  # the recipes Tuneboard offers are all in range
        assert launch_warnings(preset_config(preset, data="x")) == [], preset
    assert launch_warnings(TrainConfig(data="x", lr=0.01, loss_reduction="mean", batch_size=8)) == []
    blow_up = launch_warnings(TrainConfig(data="x", lr=100, loss_reduction="mean"))  # the lr 100
    assert len(blow_up) == 2 and blow_up[0].startswith("Learning rate 100 is far above the usual range")
    assert blow_up[1].startswith("Head learning rate (lr × multiplier) 1e+03 is far above")
    assert "ends diverged" in blow_up[0]
    # The same lr 0.01 is fine on a mean loss and far too high summed over 128 images (x128).
    summed = launch_warnings(TrainConfig(data="x", lr=0.01, loss_reduction="sum", batch_size=128))
    assert summed and "summed over batches of 128, it steps like 1.28" in summed[0]
    only_head = launch_warnings(TrainConfig(data="x", lr=0.2, head_lr_mult=10, loss_reduction="mean"))
    assert len(only_head) == 1 and only_head[0].startswith("Head learning rate")  # lr 0.2 is fine, 2 is not
    frozen = launch_warnings(TrainConfig(data="x", lr=1e-7, loss_reduction="mean", train_stages="head",
                                         param_groups=False))
    assert len(frozen) == 1 and "of the head, the only part that trains" in frozen[0] and "far below" in frozen[0]
