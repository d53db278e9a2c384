"""Where the model looks: class-activation heatmaps with the `grad-cam` package (pytorch_grad_cam).

Method: Grad-CAM++ (Chattopadhyay et al. 2018). It is class-discriminative (a map for the predicted
class and for any chosen one, "why not hot dog?", which rules out class-agnostic EigenCAM), costs what
Grad-CAM costs (one forward and one backward pass of the batch), and weighs the feature maps by their
positive gradients only: for a class the model argues against, Grad-CAM's map (the ReLU of a sum
dominated by negative weights) often comes out blank, Grad-CAM++'s still shows the evidence for it.

Target layer: found from the model itself, whatever the backbone: a forward pass of one image at the
model's size with a hook on every module finds the global pooling (the last module that turns an
N x C x H x W map into N x C values) and the module that made its input map (ResNet's layer4,
torchvision's `features`, timm's bn2...): no list of layer names, so a backbone added to the registry
needs nothing here. A model without such a map (a vision transformer's tokens) gets a HeatmapError.
"""
from __future__ import annotations

import copy
import threading

import numpy as np
import torch
from PIL import Image
from torch import nn

from .prepare import normalize_batch

METHOD = "Grad-CAM++"
OVERLAY_WEIGHT = 0.5  # the photo's share of the overlay (the colour map's: the rest)


class HeatmapError(ValueError):
    """No feature map to explain (e.g. a transformer's tokens); the message says so."""


def _shape(value) -> tuple:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def feature_layer(model: nn.Module, image_size: int) -> tuple[str, nn.Module]:
    """(path, module) of the last spatial feature map before the pooled head (see the module docstring):
    the global pooling is the last module that takes an N x C x H x W map (H, W > 1) and gives N x C
    values (squeeze-excitation blocks pool too, but earlier); the target is the last module before
    it, outside it, whose output is that map, called once per pass."""
    calls: dict[str, int] = {}
    completed: list[tuple[str, tuple, tuple]] = []  # (path, input shape, output shape) as each ends
    handles = []

    def hook(name):
        def record(_module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            completed.append((name, _shape(inputs[0]) if inputs else (), _shape(output)))
        return record

    for name, module in model.named_modules():
        if name:  # not the model itself: its output is the logits
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    def is_global_pool(shape_in: tuple, shape_out: tuple) -> bool:
        return (len(shape_in) == 4 and shape_in[2] > 1 and shape_in[3] > 1 and bool(shape_out)
                and int(np.prod(shape_out)) == shape_in[0] * shape_in[1])

    pools = [i for i, (_, shape_in, shape_out) in enumerate(completed) if is_global_pool(shape_in, shape_out)]
    if pools:
        pool_name, feature_shape, _ = completed[pools[-1]]
        for name, _, shape_out in reversed(completed[:pools[-1]]):
            if shape_out == feature_shape and calls[name] == 1 and not name.startswith(pool_name + "."):
                return name, model.get_submodule(name)
    raise HeatmapError(f"{type(model).__name__} has no feature map (N x C x H x W) that a global pooling "
                       "turns into its head's input: heatmaps need a convolutional backbone")


class Heatmapper:
    """Heatmaps for a Predictor's model: on its own copy of the model (hooks on a model that the
    Predict page's sessions share would reach their passes too), one call at a time."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.model = copy.deepcopy(predictor.model).eval().float()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.layer_name, self.layer = feature_layer(self.model, predictor.image_size)
        self._lock = threading.Lock()

    def inputs(self, images: list[Image.Image]) -> tuple[torch.Tensor, np.ndarray]:
        """(the normalised batch, the centre crops as uint8 N x S x S x 3): what the model sees."""
        crops = torch.stack([self.predictor.preprocess(img) for img in images])
        x = normalize_batch(crops, self.predictor.mean, self.predictor.std, channels_last=False)
        return x, crops.permute(0, 2, 3, 1).numpy()

    def heatmaps(self, images: list[Image.Image], class_index: int | None = None) -> tuple[np.ndarray, list[int]]:
        """(maps N x S x S in [0, 1] over the centre crop, the class each explains): the predicted
        class of each image, or `class_index` for all."""
        from pytorch_grad_cam import GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        x, _ = self.inputs(images)
        with self._lock, torch.inference_mode(False), torch.enable_grad():
            if class_index is None:  # the answer as the Predictor gives it (its mirror averaged when the run did)
                explained = self.predictor.logits(images).argmax(1).tolist()
            else:
                explained = [int(class_index)] * len(images)
            with GradCAMPlusPlus(self.model, target_layers=[self.layer]) as cam:
                maps = cam(x.clone(), targets=[ClassifierOutputTarget(c) for c in explained])
        return np.clip(np.nan_to_num(maps.astype(np.float32)), 0.0, 1.0), explained

    def overlays(self, images: list[Image.Image], class_index: int | None = None,
                 framing: str = "crop") -> tuple[list[Image.Image], list[int]]:
        """The heatmaps laid over the images (the jet colour map, half and half): over the centre
        crops the model sees (`framing="crop"`), or over the whole photos (`"photo"`, photo_overlay),
        which is how a page shows the photo beside it."""
        from pytorch_grad_cam.utils.image import show_cam_on_image

        if framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, got {framing!r}")
        maps, explained = self.heatmaps(images, class_index)
        if framing == "photo":
            return [photo_overlay(img, m, self.predictor.image_size) for img, m in zip(images, maps)], explained
        _, crops = self.inputs(images)
        return [Image.fromarray(show_cam_on_image(crop.astype(np.float32) / 255, m, use_rgb=True,
                                                  image_weight=OVERLAY_WEIGHT))
                for crop, m in zip(crops, maps)], explained


FRAMINGS = ("crop", "photo")
PHOTO_PX = 512  # the long side of a whole-photo overlay (a camera's 4000 px photo is shown smaller anyway)
OUTSIDE_SHADE = 0.35  # what is left of the photo's contrast outside the part the model sees


def crop_box(width: int, height: int, image_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in a width x height photo of what the model sees: the test view
    (prepare.test_view) squeezes the photo to R x R and keeps the centre S x S, which is the same
    share of each side whatever the photo's shape (224 of 256: the centre 87.5%)."""
    from .data import resize_size_for

    resize = resize_size_for(image_size)
    start = int(round((resize - image_size) / 2.0))  # torchvision's center_crop
    return (round(start * width / resize), round(start * height / resize),
            round((start + image_size) * width / resize), round((start + image_size) * height / resize))


def photo_overlay(image: Image.Image, heatmap: np.ndarray, image_size: int) -> Image.Image:
    """A heatmap over the centre crop (S x S), laid over the whole photo instead: the map stretched
    back onto the part of the photo the model sees (crop_box), the rest of the photo shown faded
    (the model never sees it). Same framing as the photo itself, which the Predict page shows
    beside it (the crop's overlay beside the whole photo compared two different pictures)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    photo = image.convert("RGB")
    scale = min(PHOTO_PX, max(max(photo.size), image_size)) / max(photo.size)  # tiny photos up to the crop's size
    if scale != 1:
        photo = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))), Image.BILINEAR)
    left, top, right, bottom = crop_box(photo.width, photo.height, image_size)
    stretched = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F").resize(
        (max(1, right - left), max(1, bottom - top)), Image.BILINEAR)
    full = np.zeros((photo.height, photo.width), dtype=np.float32)
    full[top:bottom, left:right] = np.clip(np.asarray(stretched), 0.0, 1.0)[:bottom - top, :right - left]
    pixels = np.asarray(photo, dtype=np.float32)
    out = show_cam_on_image(pixels / 255, full, use_rgb=True, image_weight=OVERLAY_WEIGHT)
    outside = np.ones(full.shape, dtype=bool)
    outside[top:bottom, left:right] = False
    out[outside] = (pixels[outside] * OUTSIDE_SHADE + 255 * (1 - OUTSIDE_SHADE)).astype(np.uint8)
    return Image.fromarray(out)


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, column) of a heatmap's largest value."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(heatmap)), heatmap.shape))


def write_overlays(predictor, files: list, out_dir, class_name: str | None = None, batch_size: int = 16,
                   progress=None) -> tuple[list, list[str]]:
    """The overlay of every readable image in `files` as OUT_DIR/NNNNN_<name>_<class>.png (the class
    it explains: the predicted one, or `class_name`). Returns (the files written, the problems: one
    line naming each image that could not be read). `progress(done, total)` after every batch."""
    from pathlib import Path

    from .predict import PredictError, image_from_bytes

    if class_name is not None and class_name not in predictor.classes:
        raise PredictError(f"--heatmap-class {class_name!r} is not one of the run's classes: "
                           + ", ".join(predictor.classes))
    class_index = None if class_name is None else predictor.classes.index(class_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mapper = Heatmapper(predictor)
    written, problems = [], []
    for start in range(0, len(files), batch_size):
        batch = []
        for k, f in enumerate(files[start:start + batch_size], start):
            try:
                batch.append((k, Path(f), image_from_bytes(Path(f).read_bytes(), str(f))))
            except PredictError as exc:
                problems.append(str(exc))
            except OSError as exc:
                problems.append(f"{f}: cannot be read ({exc.strerror or exc})")
        if batch:
            overlays, explained = mapper.overlays([img for _, _, img in batch], class_index)
            for (k, path, _), overlay, c in zip(batch, overlays, explained):
                target = out_dir / f"{k:05d}_{path.stem}_{predictor.classes[c]}.png"
                overlay.save(target)
                written.append(target)
        if progress is not None:
            progress(min(len(files), start + batch_size), len(files))
    return written, problems
