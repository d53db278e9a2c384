"""Training and evaluation: the book's recipe, with the production concerns added.

Read it top to bottom. `train(config, run_dir)` does what the book's `train_fine_tuning` does:

    net = pretrained backbone with a new Xavier-initialised head
    trainer = SGD([{body, lr}, {head, lr * 10}], weight_decay=1e-3)
    for epoch in range(num_epochs):
        for X, y in train_iter:  l = loss(net(X), y); l.sum().backward(); trainer.step()
        test accuracy

`train_one_epoch` is that inner loop and `evaluate` the test accuracy; both are free functions
over an iterator of (inputs, labels) batches. What the engine adds around them:

- Partial fine-tuning (`train_stages`): the network is split into a frozen bottom and a
  trainable top (models.split_model). With `all` the bottom is empty and the batches are
  augmented images, as in the book. Otherwise the frozen bottom runs once per augmented view
  of each image (eval mode, inference_mode) and its output activations are cached
  (activations.FeatureCache); the batches are then those activations, and only the top (the last stages
  and the head) runs forward and backward each step. The same loop trains both. A view is
  computed by the first epoch that trains on it, a batch at a time just before its step (and a
  run's training images are decoded then too): the first step comes after one batch, not after
  the whole set (streamed_batches).
- Speed: every image is decoded once (prepare.py), the book's augmentation runs on batches of
  uint8 tensors, channels_last, bf16 autocast where it is native, evaluation in large batches.
- Model selection: `val_fraction` holds out a stratified validation split of the training
  images; the best checkpoint and early stopping (`patience`) then use it, and the test split is
  evaluated once at the end. Without it (the book's way) the test split is evaluated every epoch.
- Safety: a cooperative stop checked before every batch; a non-finite loss ends the run as
  `diverged`; any exception ends it as `failed` with the message (traceback in log.txt);
  metrics logged so far are always kept; checkpoints are written atomically.
- Reproducibility: every random choice of epoch e is seeded from (seed, e), and cached views
  from (seed, view), so a run resumed from its epoch-end checkpoint continues exactly as it
  would have without the interruption. Nothing seeds a process-wide generator: the crops and
  the order come from the run's own `random.Random`s, the new model's initial weights from a
  private fork of torch's CPU generator (`seeded_init`), and dropout from the generator of the
  run's own GPU (`seed_device`; one run at a time per device) or, on the CPU, from a generator
  state of the run's own put in place around each training forward pass (`RunGenerator`), so
  neither a second run nor the learning-rate finder in the same process changes a run's draws.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import math
import os
import platform
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .activations import FeatureCache, shared_features_key
from .cachestore import default_cache_dir
from .calibration import Calibration, calibrate, folds_of
from .config import ConfigError, TrainConfig
from .data import WARNING, DatasetError, Problem, ScanReport, scan_dataset
from .distributed import STOP_FILE, Distributed
from .memory import describe as describe_memory
from .memory import release_memory
from .checkpoints import (CheckpointError, ResumeRefused, class_change, keep_as_best, load_checkpoint,  # noqa: F401
                          restore, save_checkpoint)
from .models import (CPU_GENERATOR_LOCK, backbone_problem, backbone_spec, build_model, classified_views, get_head,
                     mean_logits, parameter_groups, resolve_backbone, resolve_device, seeded_init, split_model)
from .novelty import (REFERENCE_FILE, choose_distance_threshold, cross_validated_share, distances, head_inputs,
                      neighbours_for, normalised, save_reference, spread_over_classes)
from .prepare import (PreparedData, augment_batch, center_view_batch, normalize_batch, prepare_data,
                      validation_split)
from .runs import (CHECKPOINT_BEST, CHECKPOINT_LAST, PREDICTIONS, RunDir, atomic_write_file, claim_run, now_iso,
                   resume_clause,
                   release_run, run_score, status_before_resume, status_put_back, without_before_resume)

Event = dict
EventCallback = Callable[[Event], None]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]



class StopRequested(Exception):
    """The user asked the run to stop."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


@dataclass
class EpochResult:
    loss: float      # mean per-example training loss over the epoch (the book's animator)
    train_acc: float
    images: int
    seconds: float


# --------------------------------------------------------------------------------------------
# Small pieces of the recipe


def library_versions() -> dict:
    """The versions a run records. timm's is read from its installed metadata: importing timm
    (every architecture it has: about a second, 0.5 s of CPU) only to read its version made every
    run pay for it, a ResNet-18 run that never uses timm included."""
    from importlib import metadata

    import torchvision

    versions = {"tuneboard": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                "python": platform.python_version()}
    try:
        versions["timm"] = metadata.version("timm")
    except metadata.PackageNotFoundError:
        pass
    return versions


def normalisation(config: TrainConfig) -> tuple[tuple, tuple]:
    spec = backbone_spec(config.backbone)
    return tuple(config.mean or spec.mean), tuple(config.std or spec.std)


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: 'auto' uses it on CUDA only (the book's fp32 elsewhere); 'bf16' asks for it
    wherever the hardware runs it natively (CUDA, or a CPU with AVX-512 BF16 / AMX), else fp32."""
    if device.type == "cuda":
        return config.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return config.precision == "bf16" and cpu_has_native_bf16()
    return False


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + salt) % (2**31)


class RunGenerator:
    """A run's own stream of random numbers for the CPU's dropout (nn.Dropout and timm's drop
    path take no generator: they draw from the process's). `active()` puts the run's state into
    the process's CPU generator for a forward pass and takes it back out afterwards, under
    CPU_GENERATOR_LOCK: another user of that generator (the learning-rate finder, a second run, a
    model being built) holds the same lock, so it neither draws the run's numbers nor has its own
    drawn by the run; the process's stream is left as it was."""

    def __init__(self, seed: int):
        self.state = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with CPU_GENERATOR_LOCK, torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.state)
            try:
                yield
            finally:
                self.state = torch.get_rng_state()


def seed_device(device: torch.device, seed: int) -> RunGenerator | None:
    """Seed the dropout of a run on `device`: on the CPU a generator of the run's own (returned),
    elsewhere the generator of that device only (torch.manual_seed would reseed every GPU and the
    CPU, under the runs of other devices; one run at a time per device)."""
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None
                                      else torch.cuda.current_device()].manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)
    else:
        return RunGenerator(seed)
    return None


def lr_factor(config: TrainConfig, step: int, total_steps: int) -> float:
    if config.schedule == "cosine" and total_steps > 0:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return 1.0


DIVERGED_LOSS_FACTOR = 100  # a mean loss per image this many times a uniform guess's (ln classes) has blown up


def diverged_loss(n_classes: int) -> float:
    """The per-image training loss above which a run has blown up: a uniform guess scores ln(n);
    lr 100 on the tiny test set logged 2e5 at its second step, lr 1 4e2, sound runs stay under ~10."""
    return DIVERGED_LOSS_FACTOR * max(1.0, math.log(n_classes))


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, per-example losses): summed over the batch as in the book, or averaged."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=label_smoothing)
    return (losses.sum() if reduction == "sum" else losses.mean()), losses


# The automatic schedule (epochs 0, feature_views 0, part of the network frozen), chosen by 3-fold
# cross-validation on trashnet6's training split (benchmarks/results/kfold_schedule.md, read with the
# README's "automatic schedule" section): at 2,024 images the old budgets (7 epochs, 2 views) scored
# no better than a linear probe of the same backbone (0.886 vs 0.883) and below 30 epochs and 4 views
# (0.893), as 6 epochs and 2 views scored below a probe on a 5-class set of 2,569 (issue 22), where 30
# epochs and 4 views scored 2 points above.
# Both knobs cost time in proportion to the set (a view is one frozen pass over it, about 8-11 epochs
# of the top on cached outputs in CPU time), so the schedule keeps the small sets' 30 epochs and 4 views
# up to AUTO_FULL_SCHEDULE_IMAGES and shrinks only beyond, never below the floors.
AUTO_MAX_EPOCHS, AUTO_MAX_VIEWS = 30, 4  # small sets: unchanged (kfold_fast.md, seefood, hymenoptera, four)
AUTO_FULL_SCHEDULE_IMAGES = 2_500  # the full schedule up to here: trashnet6 (the 5-class set: 29 and 3)
AUTO_TRAIN_IMAGES = AUTO_MAX_EPOCHS * AUTO_FULL_SCHEDULE_IMAGES  # beyond: about this many images seen...
AUTO_MIN_EPOCHS = 15  # ...in at least 15 epochs: from 5,000 images on, more steps and images than any measured set got
AUTO_VIEW_PASSES = AUTO_MAX_VIEWS * AUTO_FULL_SCHEDULE_IMAGES  # views: about this many frozen image passes...
AUTO_MIN_VIEWS = 2  # ...but always the centre view and at least one augmented view
AUTO_EPOCHS_ALL_LAYERS = 5  # epochs 0 with every layer training: the book's 5


def auto_schedule(n_train: int) -> tuple[int, int]:
    """(epochs, views per image) for `n_train` training images with part of the network frozen: 30
    and 4 up to AUTO_FULL_SCHEDULE_IMAGES, then fewer, so that the images seen stay near
    AUTO_TRAIN_IMAGES and the frozen passes near AUTO_VIEW_PASSES, but never below 15 epochs and 2
    views: the time grows with the set instead of the accuracy falling with it."""
    n = max(1, n_train)
    epochs = min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, round(AUTO_TRAIN_IMAGES / n)))
    views = min(AUTO_MAX_VIEWS, max(AUTO_MIN_VIEWS, AUTO_VIEW_PASSES // n))
    return epochs, views


def views_per_image(config: TrainConfig, n_train: int) -> int:
    """How many cached views of each training image: the setting, or with 0 (auto) auto_schedule's."""
    if config.feature_views:
        return config.feature_views
    return auto_schedule(n_train)[1]


def run_views(config: TrainConfig) -> int:
    """The cached views of each training image during a run: feature_views as setup resolved it
    (resolve_auto, from the scan), never worked out again from the training images left, which
    drop_training_images shrinks mid-run: the epochs' views would shift under a run."""
    if not config.feature_views:
        raise ValueError("feature_views is still 0 (auto): resolve_auto makes it a number before a run")
    return config.feature_views


def training_images(config: TrainConfig, report: ScanReport) -> int:
    """The images a run trains on: the scan's training split less the validation split it holds out."""
    return round(len(report.samples.get("train", [])) * (1 - config.val_fraction))


def resolve_auto(config: TrainConfig, report: ScanReport | None = None) -> TrainConfig:
    """The settings with every `auto` made concrete: the backbone ("auto": the best one whose
    weights are here), and, once the dataset's size is known from its scan, epochs 0 and
    feature_views 0. config.json, the pages and a resumed run then see the numbers in force."""
    if config.backbone == "auto":
        config = config.replace(backbone=resolve_backbone("auto")[0])
    if report is None or not report.usable:
        return config
    n_train = max(1, training_images(config, report))
    if config.epochs == 0:
        if config.train_stages == "all":
            epochs = AUTO_EPOCHS_ALL_LAYERS
        else:
            epochs = auto_schedule(n_train)[0]
        config = config.replace(epochs=max(epochs, config.warmup_epochs))
    if config.feature_views == 0:
        config = config.replace(feature_views=views_per_image(config, n_train))
    return config


def stages_of_epoch(config: TrainConfig, epoch: int) -> str:
    """What trains in this epoch: the head alone during warm-up epochs, then `train_stages`."""
    return "head" if epoch < config.warmup_epochs else config.train_stages


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each parameter group's current learning rate by its name (backbone, head or all)."""
    return {g.get("name", f"group{k}"): g["lr"] for k, g in enumerate(optimizer.param_groups)}


def failure_message(exc: BaseException) -> str:
    """What status.json says about an exception that ended a run; a full disk in plain words."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        where = f" writing {exc.filename}" if exc.filename else ""
        return (f"the disk is full{where} ({exc.strerror or exc}): free some space, then resume the run "
                "from its last checkpoint; the metrics logged so far are kept")
    return f"{type(exc).__name__}: {exc}"


def update_average(ctx: "Setup") -> None:
    """After an optimiser step: average ← decay·average + (1 − decay)·weights, with the usual
    warm-up of the decay, (1 + t) / (10 + t) over the first steps t, so that a short run's average
    is not held at its first weights."""
    state = ctx.model.state_dict()
    if ctx.average is None:
        ctx.average = {k: v.detach().clone() for k, v in state.items()}
        return
    decay = min(ctx.config.ema_decay, (1 + ctx.step) / (10 + ctx.step))
    floats = [k for k, v in state.items() if v.is_floating_point()]
    with torch.no_grad():
        torch._foreach_lerp_([ctx.average[k] for k in floats], [state[k].detach() for k in floats], 1.0 - decay)
        for k, v in state.items():
            if not v.is_floating_point():
                ctx.average[k].copy_(v)


def swap_in_average(ctx: "Setup") -> dict[str, torch.Tensor] | None:
    """Put the averaged weights into the model (for evaluation and checkpoints) and return the
    training weights to put back with swap_back; None, and nothing changed, without averaging."""
    if ctx.average is None:
        return None
    training = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
    ctx.model.load_state_dict(ctx.average)
    return training


def swap_back(ctx: "Setup", training: dict[str, torch.Tensor] | None) -> None:
    if training is not None:
        ctx.model.load_state_dict(training)


def config_record(config: TrainConfig, report: ScanReport | None = None, data: PreparedData | None = None,
                  device: torch.device | None = None, bf16: bool | None = None,
                  validation_copies: dict | None = None) -> dict:
    """config.json: every setting and what the run was made of. Written when a run is queued
    (what is known then) and again when it starts; the format is the same."""
    record: dict = {"config": config.to_dict(), "classes": report.classes if report else [],
                    "dataset": {"root": report.root if report else config.data}}
    if report is not None:
        record["dataset"].update(layout=report.layout, splits=report.splits,
                                 test_split_name=report.test_split_name,
                                 skipped_files=len(report.warnings) + (len(data.skipped) if data else 0),
                                 fixes=report.fixes.to_dict() if report.fixes is not None else None)
    if validation_copies:
        record["dataset"]["validation_split"] = validation_copies
    if backbone_problem(config.backbone) is None and config.backbone != "auto":
        spec = backbone_spec(config.backbone)
        mean, std = normalisation(config)
        record["backbone"] = {"name": config.backbone, "head": spec.head, "description": spec.description,
                              "source": spec.source or "registry", "model": spec.model_name or config.backbone,
                              "native_size": spec.native_size, "interpolation": spec.interpolation}
        record["normalisation"] = {"mean": list(mean), "std": list(std)}
    record["weights"] = config.weights
    if data is not None:
        record["preprocessing"] = {
            "image_size": config.image_size, "resize": data.resize,
            "test_transform": f"Resize([{data.resize}, {data.resize}]), CenterCrop({config.image_size}), "
                              "ToTensor(), Normalize(mean, std)" + (", averaged with its mirror image"
                                                                   if config.tta_flip else "")}
    record["loss_reduction"] = config.loss_reduction
    if device is not None:
        record["device"] = str(device)
        record["precision"] = "bf16 autocast" if bf16 else "fp32"
    record["versions"] = library_versions()
    record["created_at"] = now_iso()
    return record


# --------------------------------------------------------------------------------------------
# Events: progress for the page and the command line, status.json, the stop request


class Reporter:
    """Sends events to the caller, keeps status.json current (at most twice a second) and
    raises StopRequested when the user asked to stop."""

    def __init__(self, run: RunDir, on_event: EventCallback | None, stop_event: threading.Event | None):
        self.run = run
        self.on_event = on_event
        self.stop_event = stop_event or threading.Event()
        self.t_start = time.perf_counter()
        self._last_status_write = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def check_stop(self) -> None:
        if self.stop_event.is_set():
            raise StopRequested()

    def emit(self, event: Event, force_status: bool = False) -> None:
        event.setdefault("elapsed_s", round(self.elapsed(), 3))
        if self.on_event is not None:
            self.on_event(event)
        now = time.perf_counter()
        if force_status or now - self._last_status_write > 0.5:
            self._last_status_write = now
            fields = {k: event[k] for k in ("progress", "epoch", "step", "eta_s", "images_per_s", "message")
                      if k in event}
            self.run.write_status(**fields)

    def prepare(self, message: str, progress: float = 0.0, force_status: bool = False) -> None:
        """A setup step (scan, weights, decoding, cached activations): checks for a stop first."""
        self.check_stop()
        self.emit({"kind": "prepare", "message": message, "progress": round(progress, 4)}, force_status)


@contextlib.contextmanager
def stop_checks(model: nn.Module, check: Callable[[], None]) -> Iterator[None]:
    """`check` (which raises StopRequested once the user asked) before every layer of `model` runs,
    while inside: a stop lands within one layer's work in every phase (training steps, the frozen
    layers' pass over a large batch, evaluation), not at the end of a batch of hundreds of images."""
    handles = [m.register_forward_pre_hook(lambda *_: check()) for m in model.modules()
               if next(m.children(), None) is None]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------
# The two loops


def train_one_epoch(model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer, batches: Batches,
                    before_step: Callable[[], None], after_step: Callable[[float, int, int], None],
                    autocast: Callable[[], contextlib.AbstractContextManager],
                    max_loss: float = math.inf) -> EpochResult:
    """The book's train_batch for every batch of one epoch. `before_step` sets the learning rates
    and checks for a stop; `after_step(loss_sum, correct, seen)` logs the running averages.
    Raises Diverged when a batch's loss is not finite or its mean per image exceeds `max_loss`."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    for inputs, labels in batches:
        before_step()
        with autocast():
            logits = model(inputs)
        loss, losses = loss_fn(logits, labels)
        batch_sum = losses.detach().sum().item()
        if not math.isfinite(batch_sum):
            raise Diverged(f"the loss became {batch_sum}")
        if batch_sum / len(labels) > max_loss:
            raise Diverged(f"the loss reached {batch_sum / len(labels):.4g} per image, over the limit of "
                           f"{max_loss:.3g} ({DIVERGED_LOSS_FACTOR:g} x ln(classes), at least "
                           f"{DIVERGED_LOSS_FACTOR:g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += batch_sum
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        after_step(loss_sum, correct, seen)
    return EpochResult(loss_sum / max(seen, 1), correct / max(seen, 1), seen, time.perf_counter() - t0)


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[tuple[list[torch.Tensor], torch.Tensor]],
             autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a whole split. Each batch holds one or more views of the same images
    (the image and its mirror with test-time augmentation): their logits are averaged."""
    model.eval()
    all_logits, all_labels = [], []
    for views, labels in batches:
        with autocast():
            logits = mean_logits(model, views)
        all_logits.append(logits)
        all_labels.append(labels)
    return torch.cat(all_logits).cpu(), torch.cat(all_labels).cpu()


def accuracy_and_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a split's logits."""
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


# --------------------------------------------------------------------------------------------
# Batches: augmented images, or cached activations of the frozen bottom


def batch_slices(n: int, batch_size: int, world_size: int = 1) -> list[slice]:
    """Consecutive batches of `batch_size`; a last batch of a single image (fewer than 2 per process
    under DDP) joins the one before (BatchNorm in training mode cannot normalise one value per channel)."""
    slices = [slice(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]
    if len(slices) > 1 and slices[-1].stop - slices[-1].start < 2 * world_size:
        slices[-2:] = [slice(slices[-2].start, n)]
    return slices


def image_batches(data: PreparedData, order: list[int], config: TrainConfig, rng: random.Random,
                  device: torch.device, mean, std, shard: tuple[int, int] = (0, 1)
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The book's training batches: RandomResizedCrop + flip of each image, normalised. `shard`
    (rank, world size): under DDP, this rank's share (every world-size-th image) of each batch."""
    rank, world = shard
    for part in batch_slices(len(order), config.batch_size, world):
        idx = order[part][rank::world]
        images = augment_batch(data, idx, config.image_size, rng, device, config.crop_scale)
        x = normalize_batch(images, mean, std, config.channels_last)
        yield x, data.train_labels[idx].to(device, non_blocking=True)


def tensor_batches(inputs: torch.Tensor, labels: torch.Tensor, order: list[int], batch_size: int,
                   device: torch.device, channels_last: bool, shard: tuple[int, int] = (0, 1)
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of cached activations in the given order, as float32 on the device (this rank's
    share of each under DDP, as image_batches)."""
    rank, world = shard
    for part in batch_slices(len(order), batch_size, world):
        idx = torch.as_tensor(order[part][rank::world])
        x = inputs[idx].to(device, non_blocking=True).float()
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, labels[idx].to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# Setup: everything a run holds, created in one place


@dataclass
class Setup:
    config: TrainConfig
    run: RunDir
    device: torch.device
    bf16: bool
    mean: tuple
    std: tuple
    report: ScanReport
    data: PreparedData
    classes: list[str]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_idx: list[int]
    val_idx: list[int]
    batches_per_epoch: int
    total_steps: int
    validation_copies: dict = field(default_factory=dict)  # how exact copies were split (config.json)
    cache_dir: str | None = None
    start_epoch: int = 0
    step: int = 0
    best_score: float = -1.0
    epochs_without_gain: int = 0
    elapsed_at_start: float = 0.0     # wall time before this process took over (resume)
    last_logits: torch.Tensor | None = None  # the latest test-split logits, for predictions.csv
    train_seconds: float = 0.0
    train_images: int = 0
    pass_seconds_at_start: float = 0.0  # the frozen layers' passes' seconds when this process's training began (fit)
    test_decode_seconds: float = 0.0  # decoding the test split at its first evaluation (decode_test_split)
    stream: bool = False  # views are computed by the epoch that first trains on them (a run's; not the LR finder's)
    caches: dict[str, FeatureCache] = field(default_factory=dict)
    average: dict[str, torch.Tensor] | None = None  # ema_decay: the moving average of the weights
    shared_features: dict | None = None  # {shared_features_key: outputs} kept across runs (a sweep)
    dist: Distributed = field(default_factory=Distributed)  # DDP under torchrun; one process otherwise
    generator: RunGenerator | None = None  # on the CPU: the run's own stream for dropout (seed_device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @contextlib.contextmanager
    def training_forward(self) -> Iterator[None]:
        """A training step's forward pass: autocast and, on the CPU, the run's own generator."""
        with self.generator.active() if self.generator is not None else contextlib.nullcontext(), self.autocast():
            yield

    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    @property
    def selection_split(self) -> str:
        """Where the best checkpoint and early stopping look: validation if held out, else test."""
        return "val" if self.val_idx else "test"


def report_fits(report: ScanReport | None, config: TrainConfig) -> bool:
    """Whether a scan the caller made can stand for the run's own: the same folder and, for a
    folder that Tuneboard splits itself, the same test fraction."""
    if report is None or not report.usable:
        return False
    same_folder = Path(config.data).expanduser().resolve() in (Path(report.root).resolve(),
                                                                Path(report.root).resolve().parent)
    return same_folder and (report.layout == "splits" or report.test_fraction == config.test_fraction)


def setup(config: TrainConfig, run: RunDir, reporter: Reporter, report: ScanReport | None = None,
          cache_dir: str | None = None, distributed: Distributed | None = None,
          from_checkpoint: bool = False, stream: bool = False) -> Setup:
    """Scan (unless the caller already did), build the model and optimiser, decode the images.
    `from_checkpoint`: the weights will come from the run's checkpoint (a resume), so the model is
    built without its starting weights (which may be gone, or need a download). `stream`: leave
    the training images that are not in the decode cache to the first epoch (streams_first_epoch)."""
    distributed = distributed or Distributed()
    device = distributed.device_for(resolve_device(config.device))
    if not report_fits(report, config):
        reporter.prepare("scanning the dataset", force_status=True)
        report = scan_dataset(config.data, test_fraction=config.test_fraction,
                              scan_cache=default_cache_dir() if cache_dir is None else cache_dir or None)
    if not report.usable:
        raise DatasetError(f"dataset not usable: {report.reason()}")
    config = resolve_auto(config, report)
    if device.type == "cpu":
        run.log(describe_memory())
    weights = "none" if from_checkpoint else config.weights
    reporter.prepare(f"building {config.backbone} for its checkpoint" if from_checkpoint
                     else f"loading {config.backbone} weights ({config.weights})", force_status=True)
    with seeded_init(config.seed):
        model = build_model(config.backbone, len(report.classes), weights)
    model = model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    groups = parameter_groups(model, config.backbone, config.lr, config.head_lr_mult, config.param_groups,
                              train_stages=config.train_stages, layer_decay=config.layer_decay)
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)

    def decoding(done, total):
        reporter.prepare(f"decoding images ({done}/{total})")

    lazy = stream and streams_first_epoch(config, distributed)
    data = prepare_data(report, config.image_size, cache_dir=cache_dir, device=device, progress=decoding,
                        lazy_train=lazy, lazy_test=stream and not distributed.enabled)
    if data.pending:
        run.log(f"{len(data.pending)} training images are decoded as the first epoch streams them")
    for problem in data.skipped:
        run.log(f"skipped {problem.path}: {problem.problem}")
    split = validation_split(data, config.val_fraction)
    if split.describe():
        run.log(split.describe())
    train_idx, val_idx = split.train, split.val
    distributed.check_sizes(config.batch_size, len(train_idx))
    batches_per_epoch = len(batch_slices(len(train_idx), config.batch_size, distributed.world_size))
    mean, std = normalisation(config)
    return Setup(config=config, run=run, device=device, bf16=use_bf16(config, device), mean=mean, std=std,
                 report=report, data=data, classes=report.classes, model=model, optimizer=optimizer,
                 train_idx=train_idx, val_idx=val_idx, validation_copies=split.record() if val_idx else {},
                 batches_per_epoch=batches_per_epoch,
                 total_steps=batches_per_epoch * config.epochs, cache_dir=cache_dir, dist=distributed,
                 generator=RunGenerator(epoch_seed(config.seed, 0, 2 + 1000 * distributed.rank))
                 if device.type == "cpu" else None, stream=lazy)  # the LR finder's steps too never draw the process's


# --------------------------------------------------------------------------------------------
# One epoch of the run: pick the batches, train, evaluate, log, checkpoint


def streams_first_epoch(config: TrainConfig, distributed: Distributed) -> bool:
    """Whether the first epoch decodes the training images and computes their frozen-layer
    outputs as it trains on them (issue 22: training starts in seconds at any size), instead of
    decoding every image before the first step: with part of the network frozen, in one process,
    and no validation split (whose images are read at the end of the first epoch)."""
    return config.train_stages != "all" and not config.val_fraction and not distributed.enabled


def drop_training_images(ctx: Setup, failed: dict[int, str]) -> None:
    """Take training images that failed to decode while streaming (positions in ctx.train_idx ->
    why) out of the run, naming each in the log, as the decoding before a run skips them."""
    for position, why in sorted(failed.items()):
        path = ctx.data.train_paths[ctx.train_idx[position]]
        ctx.data.skipped.append(Problem(path, why, WARNING))
        ctx.run.log(f"skipped {path}: {why}")
    epochs_begun = math.ceil(ctx.step / ctx.batches_per_epoch)  # the streaming epoch's steps are all done
    ctx.train_idx = [row for position, row in enumerate(ctx.train_idx) if position not in failed]
    ctx.batches_per_epoch = len(batch_slices(len(ctx.train_idx), ctx.config.batch_size, ctx.dist.world_size))
    ctx.total_steps = ctx.step + ctx.batches_per_epoch * (ctx.config.epochs - epochs_begun)


def pass_totals(ctx: Setup) -> tuple[float, int]:
    """(seconds, images) of the frozen layers' passes so far in this process, decoding included."""
    caches = ctx.caches.values()
    return sum(c.pass_seconds for c in caches), sum(c.pass_images for c in caches)


def time_left(ctx: Setup, epoch: int, steps_here: int, seconds_here: float) -> float:
    """Seconds left in the run: the training steps left at the rate of those done, plus the frozen
    layers' passes left (views not computed yet, the test split) at the pass's own rate. An epoch
    that computes its view as it trains takes several times one that reads it, so the rate of the
    first steps alone would promise the first epoch's pace to the end."""
    cfg = ctx.config
    steps_left = ctx.total_steps - ctx.step
    pass_seconds, pass_images = pass_totals(ctx)
    if not pass_images or cfg.train_stages == "all":
        return steps_left * seconds_here / max(1, steps_here)
    pass_rate = pass_seconds / pass_images
    passes_here = pass_seconds - ctx.pass_seconds_at_start + ctx.test_decode_seconds
    step_rate = max(0.0, seconds_here - passes_here) / max(1, steps_here)
    cache = ctx.caches.get(stages_of_epoch(cfg, epoch))
    views = run_views(cfg)
    images_left = 0
    if cache is not None:
        if not cache.holds("train", epoch % views):  # the view streaming now: its batches not done yet
            images_left += (ctx.batches_per_epoch - (ctx.step - epoch * ctx.batches_per_epoch)) * cfg.batch_size
        later = {e % views for e in range(epoch + 1, cfg.epochs)} - {epoch % views}
        images_left += len(ctx.train_idx) * sum(not cache.holds("train", v) for v in later)
        split = ctx.selection_split
        n_split = len(ctx.val_idx) if split == "val" else len(ctx.data.test_labels)
        for flip in ([False, True] if cfg.tta_flip else [False]):
            images_left += n_split * (not cache.holds(split, 0, flip))
    return steps_left * step_rate + images_left * pass_rate


def split_for(ctx: Setup, stages: str, reporter: Reporter) -> tuple[nn.Module, FeatureCache | None]:
    """(the part that trains, the cache of the frozen part's outputs or None when all trains)."""
    bottom, top = split_model(ctx.model, ctx.config.backbone, stages)
    if stages == "all":
        return top, None
    if stages not in ctx.caches:
        store = None if ctx.shared_features is None else \
            ctx.shared_features.setdefault(shared_features_key(ctx.config, stages), {})
        ctx.caches[stages] = FeatureCache(bottom, ctx, reporter, store, stages)
    return top, ctx.caches[stages]


def training_batches(ctx: Setup, epoch: int, cache: FeatureCache | None) -> Iterator:
    cfg = ctx.config
    gen = random.Random(epoch_seed(cfg.seed, epoch, 1))
    order = list(range(len(ctx.train_idx)))
    gen.shuffle(order)  # the same order on every DDP rank; each takes its share of every batch
    shard = (ctx.dist.rank, ctx.dist.world_size)
    if cache is None:
        indices = [ctx.train_idx[i] for i in order]
        crops = gen if ctx.dist.rank == 0 else random.Random(epoch_seed(cfg.seed, epoch, 1000 + ctx.dist.rank))
        return image_batches(ctx.data, indices, cfg, crops, ctx.device, ctx.mean, ctx.std, shard)
    view = epoch % run_views(cfg)
    labels = ctx.data.train_labels[torch.as_tensor(ctx.train_idx)]
    if ctx.stream and cache.missing("train", view):
        return streamed_batches(ctx, cache, view, order, labels)
    inputs = cache.get("train", view=view)
    return tensor_batches(inputs, labels, order, cfg.batch_size, ctx.device, cfg.channels_last, shard)


def streamed_batches(ctx: Setup, cache: FeatureCache, view: int, order: list[int], labels: torch.Tensor) -> Iterator:
    """The batches of an epoch whose view is not computed yet: each batch's activations are
    computed (and its images decoded, the first time) just before the step that trains on them
    (FeatureCache.stream), so the first step comes after one batch, not after the whole set. The
    batches are tensor_batches' for the same order, less any image that fails to decode. A batch
    left with one image (BatchNorm in train mode cannot take one) waits to join the next; a lone
    image left at the end is not trained on in this epoch (it is in the view for the later ones)."""
    cfg = ctx.config
    parts = [order[part] for part in batch_slices(len(order), cfg.batch_size)]
    waiting: list[int] = []
    for kept in cache.stream(view, parts, lambda failed: drop_training_images(ctx, failed)):
        waiting += kept
        if len(waiting) > 1:
            yield next(tensor_batches(cache.streaming, labels, waiting, len(waiting), ctx.device, cfg.channels_last))
            waiting = []


def evaluation_batches(ctx: Setup, split: str, cache: FeatureCache | None) -> Iterator:
    """Batches of [view, mirrored view] (or [view]) and labels for the validation or test split."""
    cfg, data = ctx.config, ctx.data
    if split == "val":
        labels = data.train_labels[torch.as_tensor(ctx.val_idx)]
    else:
        labels = data.test_labels
    first, last = ctx.dist.rows(len(labels))  # this rank's block under DDP; the whole split otherwise
    if cache is not None:
        views = [cache.get(split, 0, False)] + ([cache.get(split, 0, True)] if cfg.tta_flip else [])
    for start in range(first, last, cfg.eval_batch_size):
        end = min(last, start + cfg.eval_batch_size)
        ctx_labels = labels[start:end].to(ctx.device)
        if cache is not None:
            xs = [v[start:end].to(ctx.device).float() for v in views]
            if cfg.channels_last:
                xs = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in xs]
        else:
            if split == "val":
                idx = ctx.val_idx[start:end]
                u8 = center_view_batch(data, idx, cfg.image_size, ctx.device)
            else:
                u8 = data.test_images[start:end].to(ctx.device)
            x = normalize_batch(u8, ctx.mean, ctx.std, cfg.channels_last)
            xs = classified_views(x, cfg.tta_flip)
        yield xs, ctx_labels


def decode_test_split(ctx: Setup, reporter: Reporter) -> None:
    """A run's test images are decoded when first evaluated (prepare_data's lazy_test: at the first
    epoch's end, not before the first step); the files that fail then are named in the log and
    left out of the test split, as the decoding before a run leaves them out."""
    if not ctx.data.test_pending:
        return
    t0 = time.perf_counter()
    for problem in ctx.data.decode_test_split(
            lambda done, total: reporter.prepare(f"decoding the test images ({done}/{total})", ctx.progress())):
        ctx.run.log(f"skipped {problem.path}: {problem.problem}")
    ctx.test_decode_seconds += time.perf_counter() - t0  # not a training step's time (time_left)


def evaluate_split(ctx: Setup, split: str, stages: str, reporter: Reporter) -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy, logits) of the current model on `val` or `test`."""
    if split == "test":
        decode_test_split(ctx, reporter)
    top, cache = split_for(ctx, stages, reporter)
    if ctx.dist.enabled:  # each rank its block of the split, gathered: the whole split, once
        n = len(ctx.val_idx) if split == "val" else len(ctx.data.test_labels)
        first, last = ctx.dist.rows(n)
        logits, labels = evaluate(top, evaluation_batches(ctx, split, cache), ctx.autocast) if last > first \
            else (torch.empty(0, len(ctx.classes)), torch.empty(0, dtype=torch.long))
        logits, labels = ctx.dist.gather_rows(logits, n), ctx.dist.gather_rows(labels, n)
    else:
        logits, labels = evaluate(top, evaluation_batches(ctx, split, cache), ctx.autocast)
    loss, acc = accuracy_and_loss(logits, labels)
    return loss, acc, logits


def run_epoch(ctx: Setup, epoch: int, reporter: Reporter) -> dict:
    """Train one epoch, evaluate, log the epoch row and write the checkpoints. Returns the row."""
    cfg = ctx.config
    stages = stages_of_epoch(cfg, epoch)
    top, cache = split_for(ctx, stages, reporter)
    ctx.generator = seed_device(ctx.device, epoch_seed(cfg.seed, epoch, 2 + 1000 * ctx.dist.rank))  # dropout, per rank
    batches = training_batches(ctx, epoch, cache)  # may compute this epoch's cached view
    loss_fn = lambda logits, y: batch_loss(logits, y, cfg.loss_reduction, cfg.label_smoothing)  # noqa: E731
    loss_fn = ctx.dist.scaled_loss(loss_fn, cfg.loss_reduction, [s.stop - s.start for s in batch_slices(
        len(ctx.train_idx), cfg.batch_size, ctx.dist.world_size)])  # DDP: each rank's share, the global meaning
    totals: list = []  # DDP: every rank's running sums after the latest step
    epoch_start_step = ctx.step
    t_epoch = time.perf_counter()

    def before_step() -> None:
        if not ctx.dist.enabled:  # under DDP the ranks agree on a stop after each step (after_step)
            reporter.check_stop()
        factor = lr_factor(cfg, ctx.step, ctx.total_steps)
        for g in ctx.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor

    def after_step(loss_sum: float, correct: int, seen: int) -> None:
        stop = False
        if ctx.dist.enabled:
            stop, loss_sum, correct, seen = ctx.dist.step_totals(reporter.stop_event.is_set(), loss_sum, correct, seen)
            totals[:] = [loss_sum, correct, seen]
        ctx.step += 1
        if cfg.ema_decay:
            update_average(ctx)
        seconds = ctx.train_seconds + (time.perf_counter() - t_epoch)
        steps_here = ctx.step - ctx.start_epoch * ctx.batches_per_epoch
        b = ctx.step - epoch_start_step
        event = {"kind": "batch", "epoch": round(ctx.step / ctx.batches_per_epoch, 4), "step": ctx.step,
                 "batch": b, "batches_per_epoch": ctx.batches_per_epoch, "loss": loss_sum / seen,
                 "train_acc": correct / seen, **lr_columns(ctx, stages),
                 "images_per_s": round((ctx.train_images + seen) / seconds, 2) if seconds > 0 else 0.0,
                 "progress": round(ctx.progress(), 4),
                 "eta_s": round(time_left(ctx, epoch, steps_here, reporter.elapsed() - ctx.elapsed_at_start), 1),
                 "message": f"epoch {epoch + 1}/{cfg.epochs}, batch {b}/{ctx.batches_per_epoch}"}
        event["elapsed_s"] = round(reporter.elapsed(), 3)
        ctx.run.append_metrics(event)
        reporter.emit(event)
        if stop:
            raise StopRequested()

    try:
        try:
            result = train_one_epoch(ctx.dist.wrap(top, stages), loss_fn, ctx.optimizer, batches, before_step,
                                     after_step, ctx.training_forward, max_loss=diverged_loss(len(ctx.classes)))
        finally:
            getattr(batches, "close", lambda: None)()  # a streamed view stopped mid-way leaves no file behind
        if ctx.dist.enabled:  # every rank's images
            result = EpochResult(totals[0] / totals[2], totals[1] / totals[2], totals[2], result.seconds)
    except Diverged as exc:
        lrs = group_lrs(ctx.optimizer)
        raise Diverged(f"{exc} at step {ctx.step + 1} (epoch {epoch + 1}) with learning rate "
                       + ", ".join(f"{name} {lr:g}" for name, lr in lrs.items())
                       + "; try a lower learning rate") from None
    ctx.train_seconds += result.seconds
    ctx.train_images += result.images
    split = ctx.selection_split
    training_weights = swap_in_average(ctx)  # evaluation, selection and checkpoints use the average
    sel_loss, sel_acc, logits = evaluate_split(ctx, split, stages, reporter)
    ctx.last_logits = logits if split == "test" else None
    ips = ctx.train_images / ctx.train_seconds if ctx.train_seconds else 0.0
    row = {"kind": "epoch", "epoch": epoch + 1, "step": ctx.step, "loss": result.loss,
           "train_acc": result.train_acc, f"{split}_loss": sel_loss, f"{split}_acc": sel_acc,
           **lr_columns(ctx, stages), "images_per_s": round(ips, 2), "progress": round(ctx.progress(), 4),
           "message": f"epoch {epoch + 1}/{cfg.epochs}: loss {result.loss:.3f}, train acc "
                      f"{result.train_acc:.3f}, {'validation' if split == 'val' else 'test'} acc {sel_acc:.3f}"}
    row["elapsed_s"] = round(reporter.elapsed(), 3)
    ctx.run.append_metrics(row)
    reporter.emit(row, force_status=True)
    improved = sel_acc > ctx.best_score
    ctx.epochs_without_gain = 0 if improved else ctx.epochs_without_gain + 1
    ctx.best_score = max(ctx.best_score, sel_acc)
    status = {"loss": result.loss, "train_acc": result.train_acc, "epochs_done": epoch + 1,
              "selection_split": split}
    if split == "test":
        status.update(test_acc=sel_acc, test_loss=sel_loss, best_test_acc=ctx.best_score)
    else:
        status.update(val_acc=sel_acc, val_loss=sel_loss, best_val_acc=ctx.best_score)
    ctx.run.write_status(**status)
    if ctx.dist.is_main:  # only rank 0 writes the run directory
        save_checkpoint(ctx.run.file(CHECKPOINT_LAST), ctx.model, ctx.optimizer, epoch + 1, ctx.best_score,
                        cfg.to_dict(), ctx.classes, ctx.epochs_without_gain, training_weights)
        if improved:  # the same state: a link to the file rather than a second one
            keep_as_best(ctx.run)
    swap_back(ctx, training_weights)  # every rank trains on from its training weights
    return row


def lr_columns(ctx: Setup, stages: str) -> dict:
    """metrics.csv's `lr` (the pretrained layers', or the one group's) and `head_lr` (the head's).
    When only the head trains, the pretrained layers have no rate: `lr` stays empty."""
    lrs = group_lrs(ctx.optimizer)
    head = lrs.get("head", lrs.get("all"))
    body = lrs.get("backbone", lrs.get("all"))
    return {"lr": None if stages == "head" else body, "head_lr": head}


def final_test(ctx: Setup, reporter: Reporter) -> tuple[float, float, torch.Tensor]:
    """The test split, once, with the model the run selected (its best validation checkpoint
    when a validation split was held out; the final model otherwise)."""
    stages = stages_of_epoch(ctx.config, ctx.config.epochs - 1)
    training_weights = None
    if ctx.val_idx and ctx.dist.from_main(ctx.run.file(CHECKPOINT_BEST).exists):  # rank 0's, under DDP
        ctx.model.load_state_dict(ctx.dist.from_main(lambda: load_checkpoint(ctx.run.file(CHECKPOINT_BEST))["model"]))
    elif ctx.last_logits is not None:
        loss, acc = accuracy_and_loss(ctx.last_logits, ctx.data.test_labels)
        return loss, acc, ctx.last_logits
    else:  # the final model: with weight averaging, the average (a resume past the last epoch lands here)
        training_weights = swap_in_average(ctx)
    reporter.prepare("evaluating on the test split", ctx.progress(), force_status=True)
    try:
        return evaluate_split(ctx, "test", stages, reporter)
    finally:
        swap_back(ctx, training_weights)


def calibration_of(ctx: Setup, test_logits: torch.Tensor, reporter: Reporter) -> Calibration:
    """Temperature and "not sure" threshold of the selected model (calibration.py): on the validation
    split when one is held out (final_test has put the selected model in place), else cross-validated
    on the test split."""
    val_logits = val_labels = None
    if ctx.val_idx:
        reporter.prepare("calibrating on the validation split", ctx.progress(), force_status=True)
        stages = stages_of_epoch(ctx.config, ctx.config.epochs - 1)
        selected = ctx.dist.from_main(ctx.run.file(CHECKPOINT_BEST).exists)  # final_test loaded it
        training_weights = None if selected else swap_in_average(ctx)
        try:
            _, _, val_logits = evaluate_split(ctx, "val", stages, reporter)
        finally:
            swap_back(ctx, training_weights)
        val_labels = ctx.data.train_labels[torch.as_tensor(ctx.val_idx)]
    return calibrate(test_logits, ctx.data.test_labels, val_logits, val_labels)


def features_and_logits(model: nn.Module, head: nn.Module, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of every batch of views, in fp32 as the Predictor computes them: the
    features are the head's input averaged over the views (novelty.head_inputs)."""
    model.eval()
    logits, features = [], []
    with torch.inference_mode(), head_inputs(head) as seen:
        for views, _ in batches:
            seen.clear()
            logits.append(mean_logits(model, views).cpu())
            features.append(torch.stack(seen).mean(0).cpu())
    return torch.cat(logits), torch.cat(features)


def reference_batches(ctx: Setup, rows: list[int], cache: FeatureCache | None, top: nn.Module
                      ) -> tuple[nn.Module, Iterator]:
    """(the model to run, batches of [the centre view]) of these training images (positions in
    ctx.train_idx): a frozen-bottom run's cached activations of the centre view (training view 0)
    when it has them, so only the top runs; the decoded images through the whole model otherwise."""
    cfg = ctx.config
    cached = cache.get("train", 0, False) if cache is not None and not cache.missing("train", 0, False) else None

    def batches() -> Iterator:
        for start in range(0, len(rows), cfg.eval_batch_size):
            part = rows[start:start + cfg.eval_batch_size]
            if cached is not None:
                x = cached[torch.as_tensor(part)].to(ctx.device).float()
                if cfg.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
            else:
                u8 = center_view_batch(ctx.data, [ctx.train_idx[p] for p in part], cfg.image_size, ctx.device)
                x = normalize_batch(u8, ctx.mean, ctx.std, cfg.channels_last)
            yield [x], None

    return (top if cached is not None else ctx.model), batches()


def reference_of(ctx: Setup, calibration: Calibration, reporter: Reporter) -> dict:
    """"Not sure" for photos unlike the training photos (novelty.py): keeps the selected model's
    features of at most MAX_REFERENCE_IMAGES training photos in the run folder and chooses the
    distance threshold on the held-out images the temperature was fitted on, so that the combined
    rule (low confidence or unlike) leaves at most 5% of them "not sure". Returns the fields it adds
    to status.json's `calibration`; {} (the confidence rule alone) for an uncalibrated run and under
    DDP (not built there yet)."""
    if ctx.dist.enabled or calibration.fitted_on not in ("val", "test"):
        return {}
    cfg = ctx.config
    reporter.prepare("keeping the training photos' features (\"not sure\" for photos unlike them)", ctx.progress(),
                     force_status=True)
    top, cache = split_for(ctx, stages_of_epoch(cfg, cfg.epochs - 1), reporter)
    head = get_head(ctx.model, cfg.backbone)
    selected = bool(ctx.val_idx) and ctx.run.file(CHECKPOINT_BEST).exists()  # final_test loaded it
    training_weights = None if selected else swap_in_average(ctx)
    try:
        labels = ctx.data.train_labels[torch.as_tensor(ctx.train_idx)].tolist()
        rows = spread_over_classes(labels)
        failed = ctx.data.decode_pending([ctx.train_idx[p] for p in rows])
        rows = [p for p in rows if ctx.train_idx[p] not in failed]
        k = neighbours_for([labels[p] for p in rows])
        model, batches = reference_batches(ctx, rows, cache, top)
        train_features = features_and_logits(model, head, batches)[1]
        held_logits, held_features = features_and_logits(top, head, evaluation_batches(ctx, calibration.fitted_on, cache))
        test_logits, test_features = (held_logits, held_features) if calibration.fitted_on == "test" else \
            features_and_logits(top, head, evaluation_batches(ctx, "test", cache))
    finally:
        swap_back(ctx, training_weights)
    reference = normalised(train_features)

    def low_confidence(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / calibration.temperature, 1).max(1).values < calibration.threshold

    held_distances, held_low = distances(reference, held_features, k), low_confidence(held_logits)
    threshold = choose_distance_threshold(held_distances, held_low)
    if calibration.fitted_on == "test":
        test_not_sure = cross_validated_share(held_distances, held_low, folds_of(len(held_distances)))
        how = (f"chosen on the test split ({len(held_distances)} images; no validation split): the test share is "
               f"{len(folds_of(len(held_distances)))}-fold cross-validated")
    else:
        test_not_sure = float((low_confidence(test_logits) | (distances(reference, test_features, k) > threshold))
                              .float().mean())
        how = f"chosen on the validation split ({len(held_distances)} images)"
    save_reference(ctx.run.file(REFERENCE_FILE), reference)
    return {"distance_threshold": threshold, "distance_neighbours": k, "reference_images": len(rows),
            "distance_method": how, "test_not_sure_combined": test_not_sure}


def write_predictions(ctx: Setup, logits: torch.Tensor, temperature: float = 1.0) -> None:
    """predictions.csv: the selected model on the test split, its probabilities (confidence, loss and
    prob_ columns) calibrated by the run's temperature."""
    import pandas as pd

    logits = logits.float() / temperature
    probs = torch.softmax(logits, dim=1)
    labels = ctx.data.test_labels
    conf, pred = probs.max(1)
    frame = pd.DataFrame({
        "path": ctx.data.test_paths,
        "true": [ctx.classes[i] for i in labels.tolist()],
        "predicted": [ctx.classes[i] for i in pred.tolist()],
        "confidence": conf.numpy(),
        "loss": F.cross_entropy(logits, labels, reduction="none").numpy(),
    })
    for i, c in enumerate(ctx.classes):
        frame[f"prob_{c}"] = probs[:, i].numpy()
    atomic_write_file(ctx.run.file(PREDICTIONS), lambda f: frame.to_csv(f, index=False), durable=False)


def fit(ctx: Setup, reporter: Reporter) -> dict:
    """Every epoch, early stopping, then the test split and predictions. Returns status fields."""
    cfg = ctx.config  # each view is computed as the first epoch that uses it trains (streamed_batches)
    ctx.elapsed_at_start = reporter.elapsed()
    ctx.pass_seconds_at_start = pass_totals(ctx)[0]
    stopped_early = ""
    for epoch in range(ctx.start_epoch, cfg.epochs):
        run_epoch(ctx, epoch, reporter)
        if cfg.patience and ctx.epochs_without_gain >= cfg.patience and epoch + 1 < cfg.epochs:
            stopped_early = (f"; stopped early after epoch {epoch + 1}: no gain on the "
                             f"{'validation' if ctx.val_idx else 'test'} split for {cfg.patience} epochs")
            ctx.run.log(stopped_early[2:])
            break
    test_loss, test_acc, logits = final_test(ctx, reporter)
    calibration = calibration_of(ctx, logits, reporter)
    if ctx.dist.is_main:
        write_predictions(ctx, logits, calibration.temperature)
    unlike = reference_of(ctx, calibration, reporter)
    ctx.run.log(f"calibration: temperature {calibration.temperature:.3f} ({calibration.method}); test ECE "
                f"{calibration.ece_before:.3f} before, {calibration.ece_after:.3f} after; \"not sure\" below "
                f"{calibration.threshold:.3f} (at most {calibration.max_error:.0%} errors among answers)"
                + (f" or {unlike['distance_threshold']:.3f} away from the {unlike['distance_neighbours']}th nearest of "
                   f"{unlike['reference_images']} training photos ({unlike['distance_method']}): "
                   f"{unlike['test_not_sure_combined']:.1%} of the test photos" if unlike else
                   "; no reference of the training photos (confidence alone)"))
    fields = {"test_acc": test_acc, "test_loss": test_loss, "temperature": calibration.temperature,
              "calibration": {**calibration.to_dict(), **unlike},
              "selected_checkpoint": "best" if ctx.val_idx and ctx.run.file(CHECKPOINT_BEST).exists() else "last"}
    if ctx.val_idx:
        row = {"kind": "test", "epoch": ctx.run.read_status().get("epochs_done", cfg.epochs), "step": ctx.step,
               "test_loss": test_loss, "test_acc": test_acc, "elapsed_s": round(reporter.elapsed(), 3)}
        ctx.run.append_metrics(row)
        fields["best_test_acc"] = test_acc
    score = run_score({**ctx.run.read_status(), **fields})
    message = score.text() + (f", validation acc {score.val_acc:.3f}" if score.val_acc is not None else "")
    return {**fields, "message": message + stopped_early}


# --------------------------------------------------------------------------------------------
# Resuming: everything up to the restored checkpoint, or a refusal that changes nothing


def setup_resumed(config: TrainConfig, run: RunDir, reporter: Reporter, report: ScanReport | None,
                  cache_dir: str | None, distributed: Distributed, device_problem: str | None) -> Setup:
    """setup() and restore() for a resume; any error on the way is a ResumeRefused naming it
    (nothing in the run folder has changed yet), a stop is a stop."""
    try:
        if device_problem:
            raise ResumeRefused(f"not resumed: {device_problem}")
        checkpoint = distributed.from_main(run.file(CHECKPOINT_LAST).exists)  # rank 0's, under DDP
        ctx = setup(config, run, reporter, report, cache_dir, distributed, from_checkpoint=checkpoint)
        restore(ctx, reporter)
        return ctx
    except (ResumeRefused, StopRequested):
        raise
    except Exception as exc:  # noqa: BLE001 - the dataset folder gone, weights, a damaged checkpoint...
        raise ResumeRefused(f"not resumed: {failure_message(exc)}") from exc


# --------------------------------------------------------------------------------------------
# The entry point


def train(config: TrainConfig, run_dir: RunDir | str | os.PathLike, on_event: EventCallback | None = None,
          stop_event: threading.Event | None = None, resume: bool = False, cache_dir: str | None = None,
          report: ScanReport | None = None, shared_features: dict | None = None,
          distributed: Distributed | None = None) -> dict:
    """Run one training to its end and return its final status. Never raises for a failed run:
    the state (completed, stopped, failed, diverged) and message are in the returned status and
    in status.json. Raises ConfigError for invalid settings, a device this machine lacks included,
    before writing anything (a resume is refused instead: the run stays stopped). `report`: the
    dataset's scan when the caller already has it (it is not scanned again). `shared_features`: a
    dict the caller keeps across runs (a sweep's): the frozen part's outputs are computed once
    for all the runs that can share them (shared_features_key). `distributed`: this process's
    rank under torchrun (distributed.py); only rank 0 writes the run directory. Raises RunOwned,
    before writing, when another live process writes the run.

    A resume builds the model without its starting weights (the checkpoint replaces them), and
    any error before the checkpoint is restored (the dataset folder gone, a damaged checkpoint,
    a missing device...) refuses it: status.json is put back as it was before the resume, with
    the reason as its message, and the run stays resumable."""
    config = resolve_auto(config.check())  # epochs and views 0 are resolved once the data is scanned
    device_problem = config.validate(check_paths=True).get("device")
    if device_problem and not resume:
        raise ConfigError({"device": device_problem})
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    distributed = distributed or Distributed()
    # config.json says how many processes trained it, 1 for this one alone: a resume starts as many
    config = config.replace(processes=distributed.world_size if distributed.enabled else 1)
    run = distributed.follower(run)
    if distributed.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        claim_run(run)  # this process writes the run until the end below (runs.py: ownership)
    started_at = now_iso()
    try:
        before_resume = status_before_resume(run) if resume else {}
        run.write_status(state="running", message="resuming" if resume else "starting", ended_at=None,
                         **({} if resume else {"progress": 0.0, "started_at": started_at}),
                         **distributed.status_fields())
        run.log(f"{'resuming' if resume else 'starting'} run {run.id}")
    except BaseException:  # e.g. a full disk: the caller hears it, and the run is not left claimed
        if distributed.is_main:
            release_run(run)
        raise
    reporter = Reporter(run, on_event, stop_event)
    ctx: Setup | None = None
    interrupted: KeyboardInterrupt | None = None

    def summary() -> dict:
        if ctx is None or not ctx.train_seconds:
            return {}
        return {"images_per_s": round(ctx.train_images / ctx.train_seconds, 2),
                "train_seconds": round(ctx.train_seconds, 2)}

    try:
        if resume:  # first: a refused resume leaves config.json as it was
            ctx = setup_resumed(config, run, reporter, report, cache_dir, distributed, device_problem)
            run.replace_status({**without_before_resume(run.read_status(default={})), "started_at": started_at})
        else:
            ctx = setup(config, run, reporter, report, cache_dir, distributed, stream=True)
        ctx.shared_features = shared_features
        run.write_status(**distributed.status_fields())  # the backend is known once the device is
        run.write_config({**config_record(ctx.config, ctx.report, ctx.data, ctx.device, ctx.bf16,
                                          ctx.validation_copies),
                          **distributed.record()})
        # a stop lands within a layer; under DDP it travels with each step's all_reduce instead, so
        # that no rank is left waiting in a collective for one that stopped mid-layer
        with stop_checks(ctx.model, reporter.check_stop) if not distributed.enabled else contextlib.nullcontext():
            fields = fit(ctx, reporter)
        status = run.write_status(state="completed", progress=1.0, eta_s=0, ended_at=now_iso(), **fields,
                                  **summary())
    except (StopRequested, KeyboardInterrupt) as exc:
        reason = getattr(stop_event, "reason", None)  # set by whoever stopped it for another cause
        status = run.write_status(state="stopped", ended_at=now_iso(),
                                  message=(f"stopped: {reason}" if reason else "stopped by the user")
                                  + (" (Ctrl-C)" if isinstance(exc, KeyboardInterrupt)
                                     or getattr(stop_event, "interrupted", False) else "")
                                  + resume_clause(run.has_checkpoint()),
                                  **summary())
        if isinstance(exc, KeyboardInterrupt):
            interrupted = exc
    except Diverged as exc:
        status = run.write_status(state="diverged", ended_at=now_iso(), message=str(exc), **summary())
    except ResumeRefused as exc:  # nothing was changed: the run can still resume once its data is back
        run.log(str(exc))
        status = run.replace_status(status_put_back(before_resume, str(exc)))
    except torch.OutOfMemoryError as exc:
        run.log(traceback.format_exc())
        device = ctx.device if ctx else config.device
        status = run.write_status(state="failed", ended_at=now_iso(),
                                  message=f"out of memory on {device}: try a smaller batch size or image "
                                          f"size ({str(exc).splitlines()[0]})", **summary())
    except Exception as exc:  # noqa: BLE001 - a failed run must say why and keep its metrics
        with contextlib.suppress(OSError):  # a full disk may refuse the log too
            run.log(traceback.format_exc())
        fields = dict(state="failed", ended_at=now_iso(), message=failure_message(exc), **summary())
        try:
            status = run.write_status(**fields)
        except OSError:  # ...and even status.json: the caller still hears why (the old status.json stays whole)
            status = {**run.read_status(default={}), **fields}
    finally:
        if ctx is not None:
            for cache in ctx.caches.values():
                cache.close()
        if distributed.is_main:
            with contextlib.suppress(OSError):  # a stop request is consumed by the run it stopped
                run.file(STOP_FILE).unlink(missing_ok=True)
            release_run(run)
    run.log(f"ended {status.get('state')}: {status.get('message')}")
    if on_event is not None:
        on_event({"kind": "end", **status})
    ctx = None  # drop the model, optimiser and decoded images before collecting
    gc.collect()  # the model, optimiser and decoded images, cycles included
    release_memory()  # the tuned allocator keeps a run's peak heap until asked
    if interrupted is not None:
        raise interrupted  # Ctrl-C: the run is marked stopped; the program still ends
    return status
