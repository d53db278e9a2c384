""""Not sure" for photos of none of the classes: how far a photo's features are from the training photos'.

A threshold on the softmax cannot tell "none of my classes" from "surely the other class": a
hot-dog model calls a photo of an ant `not_hot_dog` with confidence (3.3% of the hymenoptera photos
were "not sure" at the seefood run's threshold). The penultimate features (the head's input) still
see that the ant is unlike every training photo. So a finished run keeps a bounded reference of its
training photos' features (L2-normalised, float16, at most MAX_REFERENCE_IMAGES spread evenly over
the classes, `reference.safetensors` in the run folder), and a photo whose distance to its K-th
nearest reference photo (Sun et al. 2022, "Out-of-distribution detection with deep nearest
neighbors") is above a threshold is "not sure: unlike the training photos".

The distance threshold is chosen on held-out in-class images (the validation split, else the test
split, as the temperature is) so that the COMBINED rule (low confidence OR unlike the training
photos) answers "not sure" to at most MAX_IN_CLASS_NOT_SURE of them: the confidence rule's share
is spent first, the distance rule gets what is left.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_FILE = "reference.safetensors"
# A full fine-tuning run pays one forward pass per kept photo at its end (ResNet-18: about 60 ms of CPU each):
# 2,000 is two minutes of CPU at most, 2 MB of float16 features (Lite2: 5 MB); 125 photos already reached 94%.
MAX_REFERENCE_IMAGES = 2000
NEIGHBOURS = 10                  # the distance to the K-th nearest reference photo (K = 10 reached 94% on seefood)
MAX_IN_CLASS_NOT_SURE = 0.05     # the combined rule answers "not sure" to at most this share of held-out photos
UNLIKE = "unlike the training photos"
LOW_CONFIDENCE = "low confidence"


@contextlib.contextmanager
def head_inputs(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects what `head` receives (flattened, fp32) on every forward pass inside the block: one
    tensor per classified view (the image, and its mirror with flip TTA), whose mean is the photo's
    features, as the mean of the views' logits is its logits. Only this thread's passes count: a
    model shared between page sessions may run another session's pass (a heatmap, a plain answer)
    while the hook is on."""
    seen: list[torch.Tensor] = []
    mine = threading.get_ident()

    def collect(_module, inputs):
        if threading.get_ident() == mine:
            seen.append(inputs[0].detach().float().flatten(1))

    handle = head.register_forward_pre_hook(collect)
    try:
        yield seen
    finally:
        handle.remove()


def normalised(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=1)


def spread_over_classes(labels: list[int], limit: int = MAX_REFERENCE_IMAGES) -> list[int]:
    """Positions of at most `limit` images, each class's share in proportion to its size (at least
    one image each), evenly spaced through the class (no random draw: the same run keeps the same)."""
    if len(labels) <= limit:
        return list(range(len(labels)))
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    chosen: list[int] = []
    for members in by_class.values():
        keep = max(1, math.floor(limit * len(members) / len(labels)))
        step = len(members) / keep
        chosen += [members[int(k * step)] for k in range(keep)]
    return sorted(chosen)


def neighbours_for(labels: list[int]) -> int:
    """K for a reference of these classes: NEIGHBOURS, but at most half the smallest class's photos, so
    that a photo's K-th neighbour can still be of its own class (18 reference photos of 2 classes: K = 4)."""
    counts = [labels.count(c) for c in set(labels)] or [0]
    return max(1, min(NEIGHBOURS, min(counts) // 2))


def distances(reference: torch.Tensor, features: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """Each photo's distance (normalised features) to its k-th nearest reference photo (the nearest
    when the reference holds fewer than k)."""
    if not len(features):
        return torch.empty(0)
    k = max(1, min(k, len(reference)))
    return torch.cdist(normalised(features), reference.float()).topk(k, dim=1, largest=False).values[:, -1]


def choose_distance_threshold(held_out_distances: torch.Tensor, low_confidence: torch.Tensor,
                              max_not_sure: float = MAX_IN_CLASS_NOT_SURE) -> float:
    """The lowest distance threshold at which (low confidence) OR (distance > threshold) flags at
    most `max_not_sure` of these held-out in-class photos. When the confidence rule alone already
    flags that many, the threshold is the largest held-out distance: the distance rule then flags
    none of them (only photos further from the training photos than every held-out one)."""
    if not len(held_out_distances):
        return math.inf
    allowed = math.floor(max_not_sure * len(held_out_distances) + 1e-9) - int(low_confidence.sum())
    sure = held_out_distances[~low_confidence].sort(descending=True).values
    if allowed <= 0 or not len(sure):
        return float(held_out_distances.max())
    if allowed >= len(sure):
        return 0.0
    return float(sure[allowed])  # strictly above it: at most `allowed` of the confidently answered photos


def cross_validated_share(held_out_distances: torch.Tensor, low_confidence: torch.Tensor, folds: list[torch.Tensor],
                          max_not_sure: float = MAX_IN_CLASS_NOT_SURE) -> float:
    """The share of these photos "not sure" under the combined rule, each fold judged with a distance
    threshold chosen on the other folds (the honest figure when the threshold is chosen on the test split)."""
    flagged = 0
    for fold in folds:
        rest = torch.ones(len(held_out_distances), dtype=torch.bool)
        rest[fold] = False
        threshold = choose_distance_threshold(held_out_distances[rest], low_confidence[rest], max_not_sure)
        flagged += int((low_confidence[fold] | (held_out_distances[fold] > threshold)).sum())
    return flagged / max(1, len(held_out_distances))


def save_reference(path: str | os.PathLike, features: torch.Tensor) -> None:
    """The training photos' normalised features, float16, in safetensors (loading it runs no code)."""
    from safetensors.torch import save_file

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    save_file({"features": normalised(features).half().contiguous()}, str(partial))
    with contextlib.suppress(OSError):  # safetensors writes it owner-only; the run folder's other files are not
        os.chmod(partial, 0o644)
    os.replace(partial, path)  # a reader never finds half a file


def load_reference(path: str | os.PathLike) -> torch.Tensor | None:
    """The reference of a run folder's file, float32 rows of unit length; None when there is none
    (a run from before, or one whose file cannot be read: the confidence rule alone then)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        return None
    try:
        return load_file(str(path))["features"].float()
    except Exception:  # noqa: BLE001 - damaged or foreign: the run predicts without it
        return None
