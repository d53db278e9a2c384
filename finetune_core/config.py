"""Every training setting, defined once: its type, default, allowed values, the label and help the
user sees, its unit and its section. The command line's flags, the dashboard's form, the
validation messages and the Compare table's columns are all derived from these definitions.

The defaults are the book's fine-tuning run ("Dive into Deep Learning", Fine-Tuning): ResNet-18
pretrained on ImageNet, a new head trained at 10x the learning rate (two SGD parameter groups),
lr 5e-5 on a SUMMED loss, weight decay 1e-3, batch 128, 5 epochs, 224 px.

Nothing here imports torch: listing runs and building the command line stay fast. Checks that
need the backbone registry import it when they run.
"""
from __future__ import annotations

import dataclasses
import math
import time
import typing
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

LOSS_REDUCTIONS = ("sum", "mean")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")

# The sections of the settings, in the order the Train page and the README present them.
SECTIONS: dict[str, str] = {
    "data": "Data",
    "model": "Model",
    "learning": "What trains, and how fast",
    "optimiser": "Optimiser and schedule",
    "selection": "Model selection and evaluation",
    "hardware": "Hardware",
    "run": "Run",
}


class ConfigError(ValueError):
    """One or more settings are invalid; `errors` maps each setting to what is wrong with it."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))


@dataclass(frozen=True)
class Setting:
    """What Tuneboard knows about one setting. Bounds: `minimum`/`maximum` are inclusive,
    `above`/`below` exclusive. `choices` is a tuple, or a function returning the choices (for
    those that need the backbone registry). `flag`: the command line's flag ("" = from the name,
    None = no flag); `shorthands`: extra flags that set a fixed value, as (flag, value, help)."""

    label: str
    help: str = ""
    unit: str = ""                     # short, shown after the label: "Image size (px)"
    section: str = "run"
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    choices: tuple | Callable[[], Sequence[str]] | None = None
    step: float | None = None          # the form's step for whole numbers
    metavar: str = ""                  # the command line's name for the value ("" = from the type)
    flag: str | None = ""
    shorthands: tuple = ()
    required: bool = False             # a flag the command line requires
    form: bool = True                  # drawn in the Train page's recipe form
    compare: bool = True               # a column of the Compare table
    # Filled in from the dataclass field when the settings are built (at import):
    name: str = ""
    kind: type = str                   # bool, int, float, str, or tuple (three numbers or None)
    default: Any = None

    def choice_list(self) -> list | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    @property
    def display_label(self) -> str:
        """The label with its unit, as a form shows it: "Image size (px)"."""
        return f"{self.label} ({self.unit})" if self.unit else self.label

    @property
    def flag_name(self) -> str | None:
        return None if self.flag is None else (self.flag or "--" + self.name.replace("_", "-"))


def setting(default, label: str, **meta) -> Any:
    """A TrainConfig field with its Setting in the field's metadata."""
    return field(default=default, metadata={"setting": Setting(label=label, **meta)})


def _backbone_choices() -> list[str]:
    """Every backbone name, as the Train page's picker offers them (models.backbone_choices: the
    one list of what a backbone may be)."""
    from .models import backbone_choices, offline_backbones

    return backbone_choices(offline_backbones())


@dataclass
class TrainConfig:
    # --- data
    data: str = setting("", "Dataset folder", section="data", required=True, metavar="DIR", form=False, compare=False,
                        help="a folder of class folders, with or without train/test splits")
    test_fraction: float = setting(0.2, "Test fraction", section="data", above=0, below=1, form=False,
                                   help="of each class, held out for testing when the folder has no test split")
    # --- model
    backbone: str = setting("resnet18", "Backbone", section="model", choices=_backbone_choices, metavar="NAME",
                            help="auto: the best backbone whose ImageNet weights are on this machine; or any "
                                 "timm model (convnext_tiny.fb_in22k_ft_in1k) or torchvision classifier by name")
    weights: str = setting("auto", "Weights", section="model", metavar="auto|none|PATH",
                           help="auto (ImageNet), none (random init) or the path of a .pt/.pth/.safetensors "
                                "state_dict, loaded without running code")
    image_size: int = setting(224, "Image size", section="model", minimum=16, maximum=1024, step=16, unit="px")
    mean: tuple[float, float, float] | None = setting(None, "Normalisation mean", section="model", flag=None,
                                                      form=False, compare=False,
                                                      help="None: the backbone's own normalisation")
    std: tuple[float, float, float] | None = setting(None, "Normalisation std", section="model", flag=None,
                                                     form=False, compare=False, above=0,
                                                     help="None: the backbone's own normalisation")
    # --- what trains, and how fast
    lr: float = setting(5e-5, "Learning rate", section="learning", above=0,
                        help="of the pretrained layers (and of everything with one group)")
    head_lr_mult: float = setting(10.0, "Head learning-rate multiplier", section="learning", above=0,
                                  help="the new head trains at lr × this")
    layer_decay: float = setting(1.0, "Layer-wise learning-rate decay", section="learning", above=0, maximum=1,
                                 help="each stage below the last trains at lr × this^depth (BEiT/ViT fine-tuning, "
                                      "timm's layer decay); 1: off, every pretrained layer at lr")
    param_groups: bool = setting(True, "Parameter groups (head at lr × multiplier)", section="learning",
                                 help="off: one group at lr for every layer (the book's param_group=False)")
    train_stages: str = setting("all", "Trainable part", section="learning", metavar="head|N|all",
                                shorthands=(("--freeze-backbone", "head", "train the new head only "
                                             "(the same as --train-stages head)"),),
                                help="head: only the new head (the backbone frozen); N: the last N stages of the "
                                     "backbone and the head, on cached activations of the frozen part; "
                                     "all: every layer (the book)")
    feature_views: int = setting(1, "Cached augmented views per image", section="learning", minimum=0, step=1,
                                 help="when part of the network is frozen: its output is computed once for each of "
                                      "this many views of every training image (the first is the centre crop, the "
                                      "others the book's random crops), cycled over the epochs; 0: auto, 4 "
                                      "views up to 2,500 training images, fewer beyond (about 10,000 image passes "
                                      "in all, at least 2 views)")
    crop_scale: float = setting(0.08, "Smallest random crop", section="learning", above=0, maximum=1,
                                help="RandomResizedCrop's smallest area, as a fraction of the image (the book: "
                                     "0.08); larger keeps more of each photo in every augmented view")
    loss_reduction: str = setting("sum", "Loss over a batch", section="learning", choices=LOSS_REDUCTIONS,
                                  help="the book sums the loss (lr 5e-5 with sum ≈ 6.4e-3 with mean at batch 128)")
    label_smoothing: float = setting(0.0, "Label smoothing", section="learning", minimum=0, below=1,
                                     help="0: the book's plain cross-entropy")
    # --- optimiser and schedule
    batch_size: int = setting(128, "Batch size", section="optimiser", minimum=1, maximum=4096, step=8)
    epochs: int = setting(5, "Epochs", section="optimiser", minimum=0, maximum=1000, step=1,
                          help="0: auto, when part of the network is frozen: 30 up to 2,500 training images, fewer "
                               "beyond (about 75,000 training images seen in all, at least 15 epochs); with every "
                               "layer training, 5")
    weight_decay: float = setting(1e-3, "Weight decay", section="optimiser", minimum=0)
    momentum: float = setting(0.0, "Momentum", section="optimiser", minimum=0, below=1,
                              help="SGD momentum; the book uses none")
    schedule: str = setting("constant", "Learning-rate schedule", section="optimiser", choices=SCHEDULES)
    warmup_epochs: int = setting(0, "Warm-up epochs", section="optimiser", minimum=0, maximum=100, step=1,
                                 help="epochs of head-only training on cached features before the rest unfreezes")
    ema_decay: float = setting(0.0, "Weight averaging (EMA decay)", section="optimiser", minimum=0, below=1,
                               help="evaluate, select and keep an exponential moving average of the weights over "
                                    "the training steps instead of the last weights; 0.99 averages about the last "
                                    "100 steps (shorter at the start of a run); 0: off (the book)")
    # --- model selection and evaluation
    val_fraction: float = setting(0.0, "Validation fraction", section="selection", minimum=0, below=0.9,
                                  help="the part of the training images held out (stratified, the same files every "
                                       "time) to choose the best checkpoint and stop early; 0: the book's way, "
                                       "testing every epoch")
    patience: int = setting(0, "Early-stopping patience", section="selection", minimum=0, step=1, unit="epochs",
                            help="stop after this many epochs without improvement on the validation split (the test "
                                 "split without one); 0: off")
    tta_flip: bool = setting(False, "Flip test-time augmentation", section="selection",
                             help="average the predictions of each image and its mirror image, in evaluation "
                                  "and prediction")
    eval_batch_size: int = setting(256, "Evaluation batch size", section="selection", minimum=1, form=False,
                                   compare=False)
    # --- hardware
    device: str = setting("auto", "Device", section="hardware", metavar="D",
                          help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    processes: int = setting(0, "Processes", section="hardware", minimum=0, maximum=64, step=1, flag=None,
                             help="train with DistributedDataParallel in this many processes, started by torchrun "
                                  "(one per GPU; on a CPU they share its cores); 0: auto, one per GPU when the run "
                                  "is on CUDA and the machine has several, else 1. On the command line: "
                                  "torchrun --nproc_per_node=N -m finetune_core train ...")
    precision: str = setting("auto", "Precision", section="hardware", choices=PRECISIONS,
                             help="auto: bf16 autocast on a GPU, fp32 on the CPU (the book); bf16: also on a CPU "
                                  "that runs it natively (AVX-512 BF16 / AMX), else fp32")
    channels_last: bool = setting(True, "Channels-last memory layout", section="hardware", form=False,
                                  compare=False)
    seed: int = setting(0, "Seed", section="hardware", minimum=0, step=1)
    # --- run
    name: str = setting("", "Run name", section="run", compare=False, metavar="NAME",
                       help="optional; the run folder's name ends with it")
    preset: str = setting("", "Preset", section="run", flag=None, form=False,
                          help="which preset these settings came from, for display only")
    group: str = setting("", "Group", section="run", flag=None, form=False, compare=False,
                         help="runs launched together (a run and its comparison runs), for display")

    @property
    def freeze_backbone(self) -> bool:
        """Deprecated spelling of train_stages == "head" (read-only; not a setting)."""
        return self.train_stages == "head"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("mean", "std"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Settings as saved in a run's config.json. Older runs' settings are upgraded
        (`freeze_backbone: true` is `train_stages: "head"`); unknown settings are refused."""
        values = upgrade_settings(values)
        unknown = sorted(set(values) - set(settings()))
        if unknown:
            raise ConfigError({k: "unknown setting" for k in unknown})
        for key in ("mean", "std"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, check_paths: bool = False) -> dict[str, str]:
        """Every problem with these settings, as {setting: message that starts with its label};
        empty when valid. A value of the wrong type is reported, never raised."""
        errors: dict[str, str] = {}
        for s in settings().values():
            problem = check_value(s, getattr(self, s.name))
            if problem:
                errors[s.name] = f"{s.label} {problem}"

        def report(name: str, problem: str) -> None:
            if name not in errors:
                errors[name] = f"{settings()[name].label} {problem}"

        if not {"warmup_epochs", "epochs"} & set(errors) and self.epochs and self.warmup_epochs > self.epochs:
            report("warmup_epochs", f"must not exceed the epochs ({self.epochs}), got {self.warmup_epochs}")
        if "train_stages" not in errors and "backbone" not in errors:
            problem = _train_stages_problem(self.backbone, self.train_stages)
            if problem:
                report("train_stages", problem)
        if not {"image_size", "backbone"} & set(errors):
            from .models import image_size_problem

            problem = image_size_problem(self.backbone, self.image_size)
            if problem:
                report("image_size", problem)
        if not {"processes", "batch_size"} & set(errors) and self.processes > 1 \
                and self.batch_size < 2 * self.processes:
            report("processes", f"need a batch size of at least {2 * self.processes} (2 images per process), "
                                f"got {self.processes} processes with batch size {self.batch_size}")
        if not self.weights and "weights" not in errors:
            report("weights", "must be 'auto', 'none' or the path of a weights file")
        if not self.data and "data" not in errors:
            report("data", "must be given")
        if check_paths:
            from pathlib import Path

            if "data" not in errors and not Path(self.data).expanduser().is_dir():
                report("data", f"{self.data}: no such folder")
            if "weights" not in errors and self.weights not in ("auto", "none") \
                    and not Path(self.weights).expanduser().is_file():
                report("weights", f"{self.weights}: no such weights file")
            if "device" not in errors:
                problem = _device_problem(self.device)
                if problem:
                    report("device", problem)
            if not {"backbone", "weights"} & set(errors):
                from .models import weights_problem

                problem = weights_problem(self.backbone, self.weights)
                if problem:
                    report("weights", problem)
        return errors

    def check(self, check_paths: bool = False) -> "TrainConfig":
        errors = self.validate(check_paths=check_paths)
        if errors:
            raise ConfigError(errors)
        return self


# --------------------------------------------------------------------------------------------
# The settings, as data


def _kind(hint) -> type:
    if hint in (bool, int, float, str):
        return hint
    return tuple  # tuple[float, float, float] | None


def _build_settings() -> dict[str, Setting]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: dataclasses.replace(f.metadata["setting"], name=f.name, kind=_kind(hints[f.name]),
                                        default=f.default)
            for f in dataclasses.fields(TrainConfig)}


# Built once, at import: the dashboard's script threads only ever read it (a dict filled on first
# use could be seen half-filled by a second thread).
_SETTINGS: dict[str, Setting] = _build_settings()


def settings() -> dict[str, Setting]:
    """{name: Setting} for every field of TrainConfig, in the order they are defined."""
    return _SETTINGS


def _number(x: float) -> str:
    return "zero" if x == 0 else f"{x:g}"


def _shown(value) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _check_number(s: Setting, value) -> str | None:
    if s.above is not None and value <= s.above:
        return f"must be greater than {_number(s.above)}, got {_shown(value)}"
    if s.minimum is not None and value < s.minimum:
        wording = "zero or more" if s.minimum == 0 else f"at least {s.minimum:g}"
        return f"must be {wording}, got {_shown(value)}"
    if s.below is not None and value >= s.below:
        return f"must be below {s.below:g}, got {_shown(value)}"
    if s.maximum is not None and value > s.maximum:
        return f"must be at most {s.maximum:g}, got {_shown(value)}"
    return None


def check_value(s: Setting, value) -> str | None:
    """What is wrong with one value of one setting, worded to follow its label; None when fine."""
    if s.kind is bool:
        return None if isinstance(value, bool) else f"must be on or off (true or false), got {value!r}"
    if s.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be a whole number, got {value!r}"
        return _check_number(s, value)
    if s.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"must be finite, got {value}"
        return _check_number(s, value)
    if s.kind is tuple:
        if value is None:
            return None
        if not isinstance(value, (tuple, list)) or len(value) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            return f"must be three numbers, got {value!r}"
        problems = [_check_number(s, v) for v in value]
        return next((f"{p} (in {list(value)})" for p in problems if p), None)
    if not isinstance(value, str):
        return f"must be text, got {value!r}"
    if s.name == "backbone":
        from .models import backbone_problem

        problem = backbone_problem(value)
        return None if problem is None else f"must be auto, a registered backbone or a timm or torchvision " \
            f"model's name: {problem}"
    if s.name == "device":
        ok = value in DEVICES or (value.startswith("cuda:") and value[5:].isdigit())
        return None if ok else f"must be auto, cpu, cuda, cuda:N or mps, got {value!r}"
    if s.name == "train_stages":
        ok = value in ("head", "all") or (value.isascii() and value.isdigit() and value == str(int(value))
                                          and int(value) >= 1)
        return None if ok else f"must be head, all or a number of stages (1, 2, ...), got {value!r}"
    choices = s.choice_list()
    if choices is not None and value not in choices:
        quoted = [repr(c) for c in choices]
        wording = " or ".join(quoted) if len(quoted) == 2 else "one of " + ", ".join(quoted)
        return f"must be {wording}, got {value!r}"
    return None


def _train_stages_problem(backbone: str, train_stages: str) -> str | None:
    """A stage count the backbone does not have; "auto" is checked against the backbone it
    resolves to on this machine (as the run will resolve it)."""
    if not train_stages.isdigit():
        return None
    from . import models

    resolved = models.resolve_backbone(backbone)[0]
    try:
        n = len(models.stage_names(resolved))
    except Exception:  # noqa: BLE001 - a backbone without a known split: the engine says so
        return None
    if int(train_stages) > n:
        shown = f"auto ({resolved} on this machine)" if backbone == "auto" else backbone
        if not n:
            return f"must be head or all: {shown} trains only its head or all its layers, got {train_stages!r}"
        return f"must be head, all or a number of stages from 1 to {n} for {shown}, got {train_stages!r}"
    return None


def _device_problem(device: str) -> str | None:
    """A device this machine does not have: cuda without a GPU, cuda:N beyond the GPU count, mps
    without Apple's GPU."""
    import torch

    from . import models

    available = models.available_devices()
    if device in available:
        return None
    if device.startswith("cuda:") and "cuda" in available and int(device[5:]) < torch.cuda.device_count():
        return None
    return f"{device} is not on this machine; available: {', '.join(available)}"


# Settings that older run folders saved and that are now spelled differently.
def upgrade_settings(values: dict) -> dict:
    """A copy of saved settings in today's spelling: `freeze_backbone` (removed) becomes
    train_stages="head" when it was on, and is dropped when it was off."""
    values = dict(values)
    if "freeze_backbone" in values:
        frozen = values.pop("freeze_backbone")
        if frozen is True and "train_stages" not in values:
            values["train_stages"] = "head"
    return values


def saved_settings(values: dict) -> dict:
    """Every setting of a saved config (from config.json), today's defaults filling in those that
    an older run did not have. Lenient: for display, never raises."""
    defaults = {name: s.default for name, s in settings().items()}
    return {**defaults, **{k: v for k, v in upgrade_settings(values or {}).items() if k in defaults}}


def compare_settings() -> list[str]:
    """The settings the Compare table shows, in definition order."""
    return [name for name, s in settings().items() if s.compare]


def form_settings() -> list[str]:
    """The settings the Train page's recipe form draws, in definition order."""
    return [name for name, s in settings().items() if s.form]


# --------------------------------------------------------------------------------------------
# What has no effect for a given config


def inactive_settings(config: TrainConfig) -> dict[str, str]:
    """{setting: why it has no effect} for the settings that do nothing with this config, in the
    words the dashboard shows next to a greyed-out control. Wrong-typed values count as unknown."""
    inactive: dict[str, str] = {}
    stages = config.train_stages if isinstance(config.train_stages, str) else None
    groups = config.param_groups if isinstance(config.param_groups, bool) else None

    def whole(value) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    # With train_stages="head" the one group is the head's: at lr × multiplier with parameter groups,
    # at lr without. So parameter groups still act there (they switch the multiplier on), and the
    # multiplier is inert only without them, as with any other depth.
    if groups is False:
        inactive["head_lr_mult"] = "one group at the learning rate: the multiplier has no effect"
    warmup, epochs, patience = whole(config.warmup_epochs), whole(config.epochs), whole(config.patience)
    if stages == "head":
        inactive["warmup_epochs"] = "only the head trains from the start: there is nothing to unfreeze later"
    if stages in ("head", "1"):  # the last stage (and what follows it) is at depth 0: lr itself
        inactive["layer_decay"] = ("only the head trains: no pretrained layer to decay" if stages == "head" else
                                   "only the last stage trains, at the learning rate itself: nothing below it to decay")
    if stages == "all" and warmup == 0:
        inactive["feature_views"] = ("the whole network trains on fresh augmented crops every epoch: nothing is "
                                     "cached (views are used only when part of it is frozen, or in warm-up)")
    # With part of the network frozen, training sees only the cached views: view 0 is the centre
    # crop, the others random crops. One view: no random crop is ever taken.
    if stages is not None and stages != "all" and whole(config.feature_views) == 1:
        inactive["crop_scale"] = "only the centre view of each image is cached (1 view): no random crops are taken"
    # Early stopping watches the validation split, or the test split without one (setting_notes
    # says so); it can only act when it could stop before the last epoch.
    if patience and epochs and patience >= epochs - 1:  # epochs 0 is auto: known only after the scan
        inactive["patience"] = (f"with {epochs} epoch{'s' if epochs > 1 else ''}, {patience} without improvement "
                                "can only come at the end: training always runs every epoch")
    return inactive


def setting_notes(config: TrainConfig) -> dict[str, str]:
    """{setting: a remark the dashboard shows under an active control}: how the settings combine."""
    notes: dict[str, str] = {}
    if config.train_stages == "head" and config.param_groups is True:
        notes["param_groups"] = "only the head trains: one group, at lr × multiplier"
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (config.lr, config.head_lr_mult)):
            notes["head_lr_mult"] = (f"only the head trains: lr and the multiplier act only as their product, "
                                     f"{config.lr * config.head_lr_mult:g}")
    elif config.train_stages == "head" and config.param_groups is False:
        notes["param_groups"] = "only the head trains: one group, at lr"
    if config.val_fraction == 0:
        notes["val_fraction"] = "no validation split: the best checkpoint is chosen on the test split (the book's way)"
        if isinstance(config.patience, int) and not isinstance(config.patience, bool) and config.patience > 0:
            notes["patience"] = "no validation split: early stopping watches the test split"
    return notes


def auto_notes(config: "TrainConfig", resolved: "TrainConfig") -> dict[str, str]:
    """{setting: remark} for the settings left at 0 (auto): what they come to for this dataset
    (`resolved`: engine.resolve_auto of `config` with the dataset's scan), so that a control
    holding 0 does not read as zero epochs."""
    notes = {}
    if config.epochs == 0 and resolved.epochs:
        notes["epochs"] = f"0 = auto: {resolved.epochs} epochs for this dataset and trainable part"
    if config.feature_views == 0 and resolved.feature_views:
        n = resolved.feature_views
        notes["feature_views"] = f"0 = auto: {n} view{'s' if n != 1 else ''} per image for this dataset"
    return notes


# --------------------------------------------------------------------------------------------
# Warnings before a launch

# SGD fine-tuning rates, as the step they take on a MEAN-reduced loss without momentum: the book's
# fine-tuning run is 5e-5 x batch 128 = 6.4e-3 (its head 6.4e-2), its scratch run 6.4e-2, the fast
# preset 3e-3 / 3e-2 with momentum 0.9 (x10). "Far outside" is ten times beyond this usual range:
# above it training usually blows up (lr 100 logged a loss near 25,000), below it barely moves.
USUAL_STEP_RANGE = (1e-4, 0.1)
FAR_OUTSIDE = 10.0
# The step a warning's suggestion aims at: where the presets step (the book's fine-tuning 6.4e-3 and
# scratch 6.4e-2, the fast preset's 3e-2), their geometric mean; the head at the presets' multiplier
# (x10). The middle of USUAL_STEP_RANGE (3.2e-3) suggested 0.00032 for the fast preset, ten times
# below its own 3e-3 and the learning-rate finder's 0.0036.
PRESET_STEP = 2e-2
PRESET_HEAD_MULT = 10.0


def launch_warnings(config: TrainConfig) -> list[str]:
    """Sentences the Train page shows before a launch when a learning rate (the pretrained layers'
    lr, the head's lr x multiplier) is far outside the usual range for the loss reduction, batch
    size and momentum in force. Valid settings only; an empty list when nothing is unusual."""
    return [sentence for sentences in setting_warnings(config).values() for sentence in sentences]


def setting_warnings(config: TrainConfig) -> dict[str, list[str]]:
    """launch_warnings by the setting each is about ("lr", "head_lr_mult"): the Train page shows
    each under its field."""
    low, high = USUAL_STEP_RANGE[0] / FAR_OUTSIDE, USUAL_STEP_RANGE[1] * FAR_OUTSIDE
    scale = (config.batch_size if config.loss_reduction == "sum" else 1) / (1.0 - config.momentum)
    how = ([f"summed over batches of {config.batch_size}"] if config.loss_reduction == "sum" else []) + \
          ([f"momentum {config.momentum:g}"] if config.momentum else [])
    rates = []  # (what the rate is, its value, the step a preset takes with it, what to set to fix it)
    if config.train_stages != "head":
        rates.append(("Learning rate" if config.param_groups else "Learning rate (one group for every layer)",
                      config.lr, PRESET_STEP, "Learning rate"))
    if config.param_groups:
        rates.append(("Head learning rate (lr × multiplier)", config.lr * config.head_lr_mult,
                      PRESET_STEP * PRESET_HEAD_MULT, "Head learning-rate multiplier"))
    elif config.train_stages == "head":
        rates.append(("Learning rate (of the head, the only part that trains)", config.lr, PRESET_STEP,
                      "Learning rate"))
    warnings: dict[str, list[str]] = {}
    usual = f"{USUAL_STEP_RANGE[0]:g} to {USUAL_STEP_RANGE[1]:g} is usual"
    lr = config.lr  # the learning rate a head multiplier is suggested for: the suggested one if lr is off too
    for label, rate, preset_step, setting in rates:
        step = rate * scale
        if low * (1 - 1e-9) <= step <= high * (1 + 1e-9):  # the bounds themselves are in range
            continue
        if setting == "Learning rate":
            lr = rate * preset_step / step
        where = (f"{' and '.join(how)}, it steps like {step:.3g} would on a mean loss without momentum, where {usual}"
                 if how else f"on a mean loss without momentum {usual}")
        field = warnings.setdefault("lr" if setting == "Learning rate" else "head_lr_mult", [])
        suggested = rate * preset_step / step
        if setting != "Learning rate" and lr != config.lr and abs(suggested / lr / config.head_lr_mult - 1) < 0.25:
            # the head is off only through the learning rate: the multiplier it would suggest is the one set
            field.append(f"{label} {rate:.3g} is far {'above' if step > high else 'below'} the usual range because "
                         f"the learning rate is; the multiplier ({config.head_lr_mult:g}) is fine: change the "
                         f"learning rate (about {lr:.2g}).")
            continue
        if step > high:
            field.append(f"{label} {rate:.3g} is far above the usual range: {where}. Training will likely blow up "
                            f"(the run then ends diverged); try the learning-rate finder, or "
                            f"{_suggestion(rate * preset_step / step, setting, lr)}.")
        else:
            field.append(f"{label} {rate:.3g} is far below the usual range: {where}. The weights will barely "
                            f"move; try the learning-rate finder, or "
                            f"{_suggestion(rate * preset_step / step, setting, lr)}.")
    return warnings


def _suggestion(rate: float, setting: str, lr: float) -> str:
    """What to type where for a rate that steps as the presets do with these settings (a head's
    rate is set by its multiplier, at learning rate `lr`)."""
    if setting == "Learning rate":
        return f"set {setting} to about {rate:.2g}, the step the presets take with these settings"
    return (f"set {setting} to about {rate / lr:.2g} (a head rate of {rate:.2g} at learning rate {lr:.2g}, "
            f"the step the presets' heads take)")


# --------------------------------------------------------------------------------------------
# Presets

# The book's two runs, and the fastest way to the book's accuracy measured on this project's
# machines (see benchmarks/ and the README). A preset is a set of changes to TrainConfig.
PRESETS: dict[str, dict] = {
    "book-finetune": dict(backbone="resnet18", weights="auto", train_stages="all", lr=5e-5, head_lr_mult=10.0,
                          param_groups=True, loss_reduction="sum", batch_size=128, epochs=5, weight_decay=1e-3,
                          momentum=0.0, schedule="constant", warmup_epochs=0, image_size=224, precision="auto"),
    "book-scratch": dict(backbone="resnet18", weights="none", train_stages="all", lr=5e-4, head_lr_mult=10.0,
                         param_groups=False, loss_reduction="sum", batch_size=128, epochs=5, weight_decay=1e-3,
                         momentum=0.0, schedule="constant", warmup_epochs=0, image_size=224, precision="auto"),
    # Partial fine-tuning on cached activations: the last two stages and the new head train on
    # augmented views of the frozen bottom's output, with an ImageNet backbone that works offline.
    "fast": dict(backbone="efficientnet_lite2", weights="auto", train_stages="1", feature_views=0, lr=0.003,
                 head_lr_mult=10.0, param_groups=True, loss_reduction="mean", label_smoothing=0.1,
                 batch_size=64, epochs=0, weight_decay=1e-3, momentum=0.9, schedule="cosine", warmup_epochs=0,
                 val_fraction=0.0, tta_flip=True, image_size=260, precision="bf16", crop_scale=0.25, ema_decay=0.99),
}

PRESET_LABELS = {"book-finetune": "The book: fine-tune", "book-scratch": "The book: from scratch", "fast": "Fast"}

# What each preset does, in words; {backbone} and {size} are the form's, which may differ from the
# preset's own (preset_description).
PRESET_DESCRIPTIONS = {
    "book-finetune": "The book's fine-tuning run: {backbone} with ImageNet weights at {size} px, head at 10x lr "
                     "5e-5, summed loss, 5 epochs.",
    "book-scratch": "The book's scratch run: {backbone} from random init at {size} px, one group at lr 5e-4, "
                    "summed loss, 5 epochs.",
    "fast": "Partial fine-tuning: {backbone} at {size} px; its last stage trains at lr "
            "3e-3 and a new head at 10x, on cached outputs of the frozen layers for several views per image "
            "(random crops of at least a quarter of the photo), epochs and views set for the dataset's size (30 "
            "epochs and 4 views up to 2,500 photos, fewer for larger sets but at least 15 and 2), with momentum, a "
            "cosine schedule, label smoothing, a moving average of the weights and flip test-time augmentation (bf16 where the hardware "
            "has it). The preset's own backbone, EfficientNet-Lite2, takes about a minute for 500 photos on a "
            "2-core CPU (at 260 px).",
}
BACKBONE_TITLES = {"resnet18": "ResNet-18", "efficientnet_lite0": "EfficientNet-Lite0",
                   "efficientnet_lite1": "EfficientNet-Lite1", "efficientnet_lite2": "EfficientNet-Lite2"}


def preset_description(preset: str, backbone: str, image_size: int) -> str:
    """The preset in words, naming the backbone and image size the form holds (a backbone changed
    after the preset was chosen is the one named, not the preset's)."""
    return PRESET_DESCRIPTIONS[preset].format(backbone=BACKBONE_TITLES.get(backbone, backbone), size=image_size)


def preset_config(preset: str, **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ConfigError({"preset": f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}"})
    values = {**PRESETS[preset], "preset": preset, **overrides}
    return TrainConfig(**values)


def default_preset(device_type: str) -> str:
    """The preset a new user starts from: the book's recipe on a GPU (seconds an epoch), the fast
    preset elsewhere."""
    return "book-finetune" if device_type in ("cuda", "mps") else "fast"


def offline_backbone(preferred: str, offline: Sequence[str]) -> str:
    """`preferred` if its ImageNet weights are on this machine (or it is "auto"), else the one
    that works offline out of the box (EfficientNet-Lite0), else any offline one, else `preferred`."""
    if preferred == "auto" or preferred in offline or not offline:
        return preferred
    return "efficientnet_lite0" if "efficientnet_lite0" in offline else offline[0]


def preset_for_machine(preset: str, offline: Sequence[str], **overrides) -> tuple[TrainConfig, str]:
    """The preset's settings with a backbone whose weights are on this machine, and a sentence
    saying so when the preset's own backbone had to be replaced ("" otherwise)."""
    config = preset_config(preset, **overrides)
    if config.weights != "auto":
        return config, ""
    backbone = offline_backbone(config.backbone, offline)
    if backbone == config.backbone:
        return config, ""
    replaced = config.replace(backbone=backbone)
    if "image_size" not in overrides:  # the preset's size is its backbone's native size: follow the new one
        replaced = replaced.replace(image_size=native_image_size(backbone) or config.image_size)
    return (replaced, f"{config.backbone}'s ImageNet weights are not on this machine: using {backbone}, whose "
                      f"weights are, at its native {replaced.image_size} px.")


def native_image_size(backbone: str) -> int | None:
    """The image size a backbone's ImageNet weights were trained at ("auto": the backbone this
    machine would use), the size the form takes when the backbone changes; None for a name that
    is no backbone (its setting says so)."""
    from .models import backbone_spec, resolve_backbone

    try:
        return backbone_spec(resolve_backbone(backbone)[0]).native_size
    except ValueError:
        return None


def quick_start_config(data: str, offline: Sequence[str]) -> TrainConfig:
    """The home page's one-click example: the fast preset on the built-in digits, small images,
    a backbone whose weights are here (from scratch, all layers, if none is). Each call is a group
    of its own: two clicks an hour apart are two runs to follow, not one group (a double click is
    still queued once: JobManager compares settings without their group)."""
    config, _ = preset_for_machine("fast", offline, data=data, image_size=128, epochs=8, name="digits quick start",
                                   group=f"quick-start-{uuid.uuid4().hex[:8]}")  # each click its own group
    if config.backbone not in offline:
        config = config.replace(weights="none", train_stages="all")
    return config


# --------------------------------------------------------------------------------------------
# What the dashboard's form sends: strings and numbers, parsed with errors named by setting.


def parse_form(values: dict) -> tuple[dict, dict[str, str]]:
    """The form's values with numbers that arrived as text (e.g. "5e-5") parsed by each setting's
    type: (parsed values, {setting: message}) for those that could not be read."""
    errors: dict[str, str] = {}
    parsed = {}
    for key, value in values.items():
        s = settings().get(key)
        if s is not None and s.kind is float and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                errors[key] = f"{s.label} must be a number, got {value!r}"
                continue
        elif s is not None and s.kind is int and isinstance(value, (str, float)):
            try:
                as_float = float(str(value).strip())
            except ValueError:
                as_float = math.nan
            if not as_float.is_integer():
                errors[key] = f"{s.label} must be a whole number, got {value!r}"
                continue
            value = int(as_float)
        parsed[key] = value
    return parsed, errors


def config_from_form(values: dict) -> tuple[TrainConfig | None, dict[str, str]]:
    """Parse a form's values into a validated config (paths checked too).
    Returns (config, {}) or (None, {setting: message})."""
    parsed, errors = parse_form(values)
    try:
        config = TrainConfig.from_dict(parsed)
    except ConfigError as exc:
        return None, {**exc.errors, **errors}
    errors = {**config.validate(check_paths=True), **errors}
    return (None, errors) if errors else (config, {})


def default_run_name(config: TrainConfig, when: time.struct_time | None = None) -> str:
    """A name for a run the user did not name that tells it from the others: backbone, preset and
    the time it was queued ("efficientnet_lite2 · fast · 14:05"); the backbone alone named every
    run of a day alike."""
    return f"{config.backbone} · {config.preset or 'custom'} · {time.strftime('%H:%M', when or time.localtime())}"


def comparison_configs(config: TrainConfig, also_scratch: bool = False, also_single_group: bool = False,
                       group: str = "") -> list[TrainConfig]:
    """The run and the book's comparisons on the same data: the scratch run and the same recipe
    without parameter groups. All share one group.

    The scratch run is the book's (the book-scratch preset: random init, every layer, one group at
    lr 5e-4 on a SUMMED loss, batch 128): its rate only means what the book meant with its own loss
    reduction and batch size, so only what makes it the same experiment comes from this run: the
    data and its splits (test and validation fractions), the backbone, image size, epochs, device,
    seed and precision."""
    base_name = config.name or default_run_name(config)
    runs = [config.replace(group=group, name=base_name)]
    keep = dict(data=config.data, backbone=config.backbone, image_size=config.image_size, epochs=config.epochs,
                device=config.device, seed=config.seed, precision=config.precision,
                test_fraction=config.test_fraction, val_fraction=config.val_fraction, group=group)
    if also_scratch:
        runs.append(preset_config("book-scratch", **keep, name=f"{base_name} (scratch)"))
    if also_single_group:
        runs.append(config.replace(param_groups=False, group=group, name=f"{base_name} (one group)"))
    return runs
