"""Every training setting in one dataclass, its validation, and the presets.

The defaults are the book's fine-tuning run ("Dive into Deep Learning", Fine-Tuning): ResNet-18
pretrained on ImageNet, a new head trained at 10x the learning rate (two SGD parameter groups),
lr 5e-5 on a SUMMED loss, weight decay 1e-3, batch 128, 5 epochs, 224 px.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

LOSS_REDUCTIONS = ("sum", "mean")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")


class ConfigError(ValueError):
    """One or more settings are invalid; `errors` maps each setting to what is wrong with it."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))


@dataclass
class TrainConfig:
    data: str = ""                 # dataset folder (see data.scan_dataset)
    backbone: str = "resnet18"
    weights: str = "auto"          # auto | none | path to a local state_dict
    lr: float = 5e-5
    head_lr_mult: float = 10.0     # the new head trains at lr * head_lr_mult
    param_groups: bool = True      # False: one group at lr for everything (the book's param_group=False)
    freeze_backbone: bool = False  # train the head only
    loss_reduction: str = "sum"    # the book sums the loss over the batch
    batch_size: int = 128
    epochs: int = 5
    weight_decay: float = 1e-3
    momentum: float = 0.0
    schedule: str = "constant"     # constant | cosine
    warmup_epochs: int = 0         # epochs of head-only training (backbone frozen) before unfreezing
    feature_views: int = 1         # frozen epochs: views of each training image whose features are cached
    image_size: int = 224
    mean: tuple[float, float, float] | None = None  # None: the backbone's own normalisation
    std: tuple[float, float, float] | None = None
    test_fraction: float = 0.2     # for datasets without a test split
    device: str = "auto"           # auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps
    precision: str = "auto"        # auto: bf16 autocast on CUDA, fp32 elsewhere | fp32 | bf16 (where native)
    channels_last: bool = True
    eval_batch_size: int = 256
    seed: int = 0
    name: str = ""
    preset: str = ""               # which preset these settings came from, for display only
    group: str = ""                # runs launched together (a run and its comparison runs), for display

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("mean", "std"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError({k: "unknown setting" for k in unknown})
        values = dict(values)
        for key in ("mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, check_paths: bool = False) -> dict[str, str]:
        """Every problem with these settings, as {setting: message}; empty when valid."""
        from .models import BACKBONES

        errors: dict[str, str] = {}

        def positive_finite(name, allow_zero=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                errors[name] = f"must be a number, got {value!r}"
            elif not math.isfinite(value):
                errors[name] = f"must be finite, got {value}"
            elif value < 0 or (value == 0 and not allow_zero):
                errors[name] = f"must be {'zero or more' if allow_zero else 'greater than zero'}, got {value}"

        def int_at_least(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                errors[name] = f"must be a whole number, got {value!r}"
            elif value < low:
                errors[name] = f"must be at least {low}, got {value}"

        positive_finite("lr")
        positive_finite("head_lr_mult")
        positive_finite("weight_decay", allow_zero=True)
        positive_finite("momentum", allow_zero=True)
        if "momentum" not in errors and self.momentum >= 1:
            errors["momentum"] = f"must be below 1, got {self.momentum}"
        int_at_least("batch_size", 1)
        int_at_least("eval_batch_size", 1)
        int_at_least("epochs", 1)
        int_at_least("warmup_epochs", 0)
        int_at_least("feature_views", 1)
        int_at_least("image_size", 16)
        int_at_least("seed", 0)
        if "warmup_epochs" not in errors and "epochs" not in errors and self.warmup_epochs > self.epochs:
            errors["warmup_epochs"] = f"must not exceed epochs ({self.epochs}), got {self.warmup_epochs}"
        if "image_size" not in errors and self.image_size > 1024:
            errors["image_size"] = f"must be at most 1024, got {self.image_size}"
        if self.backbone not in BACKBONES:
            errors["backbone"] = f"unknown backbone '{self.backbone}'; choose one of {', '.join(BACKBONES)}"
        if self.loss_reduction not in LOSS_REDUCTIONS:
            errors["loss_reduction"] = f"must be 'sum' or 'mean', got {self.loss_reduction!r}"
        if self.schedule not in SCHEDULES:
            errors["schedule"] = f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
        if self.precision not in PRECISIONS:
            errors["precision"] = f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
        if not (self.device in DEVICES or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            errors["device"] = f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}"
        if not isinstance(self.test_fraction, (int, float)) or not 0 < self.test_fraction < 1:
            errors["test_fraction"] = f"must be between 0 and 1, got {self.test_fraction!r}"
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and (len(value) != 3 or not all(isinstance(v, (int, float)) for v in value)):
                errors[key] = f"must be three numbers, got {value!r}"
        if self.std is not None and "std" not in errors and any(v <= 0 for v in self.std):
            errors["std"] = f"must be positive, got {self.std!r}"
        if not self.weights:
            errors["weights"] = "must be 'auto', 'none' or the path of a weights file"
        if not self.data:
            errors["data"] = "no dataset folder given"
        if check_paths:
            from pathlib import Path

            if self.data and not Path(self.data).expanduser().is_dir():
                errors["data"] = f"{self.data}: no such folder"
            if self.weights not in ("auto", "none") and not Path(self.weights).expanduser().is_file():
                errors["weights"] = f"{self.weights}: no such weights file"
        return errors

    def check(self, check_paths: bool = False) -> "TrainConfig":
        errors = self.validate(check_paths=check_paths)
        if errors:
            raise ConfigError(errors)
        return self


# The book's two runs, and the fastest way to the book's accuracy measured on this project's
# machines (see benchmarks/ and the README). A preset is a set of changes to TrainConfig.
PRESETS: dict[str, dict] = {
    "book-finetune": dict(lr=5e-5, head_lr_mult=10.0, param_groups=True, freeze_backbone=False,
                          weights="auto", loss_reduction="sum", batch_size=128, epochs=5,
                          weight_decay=1e-3, momentum=0.0, schedule="constant", warmup_epochs=0,
                          image_size=224, precision="auto"),
    "book-scratch": dict(lr=5e-4, head_lr_mult=10.0, param_groups=False, freeze_backbone=False,
                         weights="none", loss_reduction="sum", batch_size=128, epochs=5,
                         weight_decay=1e-3, momentum=0.0, schedule="constant", warmup_epochs=0,
                         image_size=224, precision="auto"),
    # Head-only training on cached backbone features, then nothing else: the cheapest run that
    # matches the book's fine-tuned accuracy on seefood/hymenoptera (benchmarks/bench_train.py).
    "fast": dict(lr=0.02, head_lr_mult=10.0, param_groups=True, freeze_backbone=True,
                 weights="auto", loss_reduction="mean", batch_size=64, epochs=10,
                 weight_decay=1e-3, momentum=0.9, schedule="cosine", warmup_epochs=0,
                 feature_views=1, image_size=224, precision="bf16"),
}

PRESET_DESCRIPTIONS = {
    "book-finetune": "The book's fine-tuning run: pretrained weights, head at 10x lr 5e-5, summed loss, 5 epochs.",
    "book-scratch": "The book's scratch run: random init, one group at lr 5e-4, summed loss, 5 epochs.",
    "fast": "Fastest to the book's accuracy: frozen pretrained backbone, features computed once (bf16 where "
            "the hardware has it), head trained with momentum and a cosine schedule.",
}


def preset_config(preset: str, **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ConfigError({"preset": f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}"})
    values = {**PRESETS[preset], "preset": preset, **overrides}
    return TrainConfig(**values)


# --------------------------------------------------------------------------------------------
# What the dashboard's form sends: strings and numbers, parsed with errors named by setting.

FLOAT_FIELDS = ("lr", "head_lr_mult", "weight_decay", "momentum", "test_fraction")
INT_FIELDS = ("batch_size", "epochs", "image_size", "seed", "warmup_epochs", "feature_views", "eval_batch_size")


def config_from_form(values: dict) -> tuple[TrainConfig | None, dict[str, str]]:
    """Parse a form's values (numbers may arrive as text, e.g. "5e-5") into a validated config.
    Returns (config, {}) or (None, {setting: message})."""
    errors: dict[str, str] = {}
    parsed = {}
    for key, value in values.items():
        if key in FLOAT_FIELDS and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                errors[key] = f"must be a number, got {value!r}"
                continue
        elif key in INT_FIELDS and isinstance(value, (str, float)) and not isinstance(value, bool):
            try:
                as_float = float(str(value).strip())
            except ValueError:
                errors[key] = f"must be a whole number, got {value!r}"
                continue
            if not as_float.is_integer():
                errors[key] = f"must be a whole number, got {value!r}"
                continue
            value = int(as_float)
        parsed[key] = value
    try:
        config = TrainConfig.from_dict(parsed)
    except ConfigError as exc:
        return None, {**exc.errors, **errors}
    errors = {**config.validate(check_paths=True), **errors}
    return (None, errors) if errors else (config, {})


def comparison_configs(config: TrainConfig, also_scratch: bool = False, also_single_group: bool = False,
                       group: str = "") -> list[TrainConfig]:
    """The run and the book's comparisons on the same data: the scratch run (random init, one
    group, lr 5e-4) and the same recipe without parameter groups. All share one group name."""
    base_name = config.name or config.backbone
    runs = [config.replace(group=group, name=base_name)]
    keep = dict(data=config.data, backbone=config.backbone, batch_size=config.batch_size, epochs=config.epochs,
                image_size=config.image_size, device=config.device, seed=config.seed, precision=config.precision,
                test_fraction=config.test_fraction, loss_reduction=config.loss_reduction, group=group)
    if also_scratch:
        runs.append(preset_config("book-scratch", **keep, name=f"{base_name} (scratch)"))
    if also_single_group:
        runs.append(config.replace(param_groups=False, group=group, name=f"{base_name} (one group)"))
    return runs
