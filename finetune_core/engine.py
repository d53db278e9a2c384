"""Training and evaluation: the book's recipe, with the production concerns added.

`train(config, run_dir)` does what the book's `train_fine_tuning` does (SGD over two parameter
groups, cross-entropy summed or averaged over the batch, test accuracy after every epoch) and
writes everything to the run directory as it goes (see runs.py). What it adds:

- Speed: every image is decoded once (prepare.py: uint8 tensors in memory or a disk cache),
  the book's augmentation (RandomResizedCrop + flip) runs on batches of tensors, the network
  runs in channels_last, with bf16 autocast on CUDA, evaluation under inference_mode in large
  batches; a frozen backbone's features are computed once per image view and only the head
  trains on them.
- Safety: a cooperative stop checked before every batch; a non-finite loss ends the run as
  `diverged`; any exception ends it as `failed` with the message (traceback in log.txt);
  metrics logged so far are always kept; checkpoints are written atomically.
- Reproducibility: every random choice of epoch e is seeded from (seed, e), so a run resumed
  from its epoch-end checkpoint continues exactly as it would have without the interruption.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import random
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .config import TrainConfig
from .data import DatasetError, scan_dataset
from .memory import describe as describe_memory
from .memory import release_memory
from .models import BACKBONES, build_model, parameter_groups, resolve_device, split_backbone_head
from .prepare import PreparedData, augment_batch, center_view_batch, normalize_batch, prepare_data
from .runs import CHECKPOINT_BEST, CHECKPOINT_LAST, PREDICTIONS, RunDir, now_iso

Event = dict
EventCallback = Callable[[Event], None]


class StopRequested(Exception):
    """The user asked the run to stop."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


@dataclass
class EpochResult:
    loss: float
    train_acc: float
    images: int
    seconds: float


def library_versions() -> dict:
    import torchvision

    versions = {"tuneboard": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                "python": platform.python_version()}
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:
        pass
    return versions


def normalisation(config: TrainConfig) -> tuple[tuple, tuple]:
    spec = BACKBONES[config.backbone]
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


def lr_factor(config: TrainConfig, step: int, total_steps: int) -> float:
    if config.schedule == "cosine" and total_steps > 0:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return 1.0


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, per-example losses): summed over the batch as in the book, or averaged."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    return (losses.sum() if reduction == "sum" else losses.mean()), losses


def save_checkpoint(path: Path, model, optimizer, epoch: int, best_test_acc: float, config: dict,
                    classes: list[str]) -> None:
    """Write a checkpoint atomically: it loads with torch.load(..., weights_only=True)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "epoch": epoch, "best_test_acc": best_test_acc,
                "config": config, "classes": classes, "format": "tuneboard-checkpoint-1"}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Trainer:
    """One training run. Use `train()` below; this class keeps the loop's state in one place."""

    def __init__(self, config: TrainConfig, run: RunDir, on_event: EventCallback | None = None,
                 stop_event: threading.Event | None = None, cache_dir: str | None = None):
        self.config = config
        self.run = run
        self.on_event = on_event
        self.stop_event = stop_event or threading.Event()
        self.cache_dir = cache_dir
        self.device = resolve_device(config.device)
        self.bf16 = use_bf16(config, self.device)
        self.mean, self.std = normalisation(config)
        self.step = 0
        self.start_epoch = 0
        self.best_test_acc = -1.0
        self.t_start = time.perf_counter()
        self.train_seconds = 0.0
        self.train_images = 0
        self._last_status_write = 0.0
        self.last_test_logits: torch.Tensor | None = None

    # --- events --------------------------------------------------------------------------------
    def emit(self, event: Event, force_status: bool = False) -> None:
        event.setdefault("elapsed_s", round(time.perf_counter() - self.t_start, 3))
        if self.on_event is not None:
            self.on_event(event)
        now = time.perf_counter()
        if force_status or now - self._last_status_write > 0.5:
            self._last_status_write = now
            fields = {k: event[k] for k in ("progress", "epoch", "step", "eta_s", "images_per_s", "message")
                      if k in event}
            self.run.write_status(**fields)

    def check_stop(self) -> None:
        if self.stop_event.is_set():
            raise StopRequested()

    # --- setup ---------------------------------------------------------------------------------
    def setup(self, resume: bool) -> None:
        cfg = self.config
        self.emit({"kind": "prepare", "message": "scanning the dataset", "progress": 0.0}, force_status=True)
        report = scan_dataset(cfg.data, test_fraction=cfg.test_fraction)
        if not report.usable:
            raise DatasetError(f"dataset not usable: {report.reason()}")
        self.report = report
        self.classes = report.classes
        if self.device.type == "cpu":
            self.run.log(describe_memory())
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.emit({"kind": "prepare", "message": f"loading {cfg.backbone} weights ({cfg.weights})",
                   "progress": 0.0}, force_status=True)
        self.model = build_model(cfg.backbone, len(self.classes), cfg.weights)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        groups = parameter_groups(self.model, cfg.backbone, cfg.lr, cfg.head_lr_mult, cfg.param_groups,
                                  cfg.freeze_backbone)
        for g in groups:
            g["initial_lr"] = g["lr"]
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

        def progress(done, total):
            self.check_stop()
            self.emit({"kind": "prepare", "message": f"decoding images ({done}/{total})", "progress": 0.0})

        self.data: PreparedData = prepare_data(report, cfg.image_size, cache_dir=self.cache_dir,
                                               device=self.device, progress=progress)
        for problem in self.data.skipped:
            self.run.log(f"skipped {problem.path}: {problem.problem}")
        self.batches_per_epoch = max(1, math.ceil(len(self.data.train_labels) / cfg.batch_size))
        self.total_steps = self.batches_per_epoch * cfg.epochs
        self.write_config()
        if resume:
            self.restore()

    def write_config(self) -> None:
        cfg = self.config
        spec = BACKBONES[cfg.backbone]
        self.run.write_config({
            "config": cfg.to_dict(),
            "classes": self.classes,
            "dataset": {"root": self.report.root, "layout": self.report.layout, "splits": self.report.splits,
                        "test_split_name": self.report.test_split_name,
                        "skipped_files": len(self.report.warnings) + len(self.data.skipped)},
            "backbone": {"name": cfg.backbone, "head": spec.head, "description": spec.description},
            "weights": cfg.weights,
            "normalisation": {"mean": list(self.mean), "std": list(self.std)},
            "preprocessing": {"image_size": cfg.image_size, "resize": self.data.resize,
                              "test_transform": f"Resize([{self.data.resize}, {self.data.resize}]), "
                                                f"CenterCrop({cfg.image_size}), ToTensor(), Normalize(mean, std)"},
            "loss_reduction": cfg.loss_reduction,
            "device": str(self.device),
            "precision": "bf16 autocast" if self.bf16 else "fp32",
            "versions": library_versions(),
            "created_at": now_iso(),
        })

    def restore(self) -> None:
        path = self.run.file(CHECKPOINT_LAST)
        if not path.exists():
            self.run.log("resume: no checkpoint yet, starting from the beginning")
            self.run.truncate_metrics(0)
            return
        ckpt = load_checkpoint(path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.start_epoch = int(ckpt["epoch"])
        self.best_test_acc = float(ckpt.get("best_test_acc", -1.0))
        self.step = self.start_epoch * self.batches_per_epoch
        self.run.truncate_metrics(self.start_epoch)
        self.run.log(f"resumed from the end of epoch {self.start_epoch}")

    # --- the loop ------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def set_lrs(self) -> None:
        factor = lr_factor(self.config, self.step, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor

    def lrs(self) -> tuple[float, float]:
        groups = {g.get("name", ""): g["lr"] for g in self.optimizer.param_groups}
        head = groups.get("head", groups.get("all"))
        body = groups.get("backbone", groups.get("all", head))
        return body, head

    def loss_of(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_loss(logits, labels, self.config.loss_reduction)

    def epoch_uses_features(self, epoch: int) -> bool:
        return self.config.freeze_backbone or epoch < self.config.warmup_epochs

    def run_all(self) -> None:
        cfg = self.config
        for epoch in range(self.start_epoch, cfg.epochs):
            if self.epoch_uses_features(epoch):
                result = self.train_epoch_on_features(epoch)
            else:
                result = self.train_epoch(epoch)
            test_loss, test_acc = self.evaluate(frozen=self.epoch_uses_features(epoch))
            self.end_epoch(epoch, result, test_loss, test_acc)

    def _batch_event(self, epoch: int, b: int, loss_sum: float, correct: int, seen: int, t0: float) -> None:
        seconds = self.train_seconds + (time.perf_counter() - t0)
        images = self.train_images + seen
        ips = images / seconds if seconds > 0 else 0.0
        progress = self.step / self.total_steps
        done_epochs = self.step / self.batches_per_epoch
        remaining = (self.total_steps - self.step) * (seconds / max(1, self.step - self.start_epoch * self.batches_per_epoch))
        body_lr, head_lr = self.lrs()
        event = {"kind": "batch", "epoch": round(done_epochs, 4), "step": self.step, "batch": b + 1,
                 "batches_per_epoch": self.batches_per_epoch, "loss": loss_sum / seen,
                 "train_acc": correct / seen, "lr": body_lr, "head_lr": head_lr, "images_per_s": round(ips, 2),
                 "progress": round(progress, 4), "eta_s": round(remaining, 1),
                 "message": f"epoch {epoch + 1}/{self.config.epochs}, batch {b + 1}/{self.batches_per_epoch}"}
        event.setdefault("elapsed_s", round(time.perf_counter() - self.t_start, 3))
        self.run.append_metrics(event)
        self.emit(event)

    def run_batches(self, epoch: int, forward: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> EpochResult:
        """The book's train_batch for each batch of one epoch; forward(b) returns (logits, labels)."""
        loss_sum, correct, seen = 0.0, 0, 0
        t0 = time.perf_counter()
        for b in range(self.batches_per_epoch):
            self.check_stop()
            self.set_lrs()
            logits, y = forward(b)
            total, losses = self.loss_of(logits, y)
            if not torch.isfinite(total):
                body_lr, head_lr = self.lrs()
                raise Diverged(f"the loss became {total.item()} at step {self.step + 1} (epoch {epoch + 1}, batch "
                               f"{b + 1}) with learning rate {body_lr:g} (head {head_lr:g}); "
                               "try a lower learning rate")
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            self.step += 1
            loss_sum += losses.detach().sum().item()
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            self._batch_event(epoch, b, loss_sum, correct, seen, t0)
        return EpochResult(loss_sum / seen, correct / seen, seen, time.perf_counter() - t0)

    def shuffled(self, epoch: int) -> tuple[random.Random, list[int]]:
        """This epoch's random generator and training order (seeded by seed and epoch)."""
        gen = random.Random(epoch_seed(self.config.seed, epoch, 1))
        order = list(range(len(self.data.train_labels)))
        gen.shuffle(order)
        return gen, order

    def train_epoch(self, epoch: int) -> EpochResult:
        cfg, data = self.config, self.data
        self.model.train()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, 2))  # dropout etc.
        gen, order = self.shuffled(epoch)

        def forward(b: int):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            images_u8 = augment_batch(data, idx, cfg.image_size, gen, self.device)
            x = normalize_batch(images_u8, self.mean, self.std, cfg.channels_last)
            with self.autocast():
                logits = self.model(x)
            return logits, data.train_labels[idx].to(self.device, non_blocking=True)

        return self.run_batches(epoch, forward)

    # --- frozen backbone: features computed once per view ---------------------------------------
    def features_model(self) -> nn.Module:
        if not hasattr(self, "_features"):
            self._features, self._head = split_backbone_head(self.model, self.config.backbone)
        return self._features

    @torch.inference_mode()
    def compute_features(self, images_of_batch: Callable[[list[int]], torch.Tensor], n: int,
                         what: str) -> torch.Tensor:
        cfg = self.config
        model = self.features_model()
        model.eval()
        out = []
        for start in range(0, n, cfg.eval_batch_size):
            self.check_stop()
            idx = list(range(start, min(n, start + cfg.eval_batch_size)))
            x = normalize_batch(images_of_batch(idx), self.mean, self.std, cfg.channels_last)
            with self.autocast():
                out.append(model(x).float())
            self.emit({"kind": "prepare", "message": f"computing {what} ({idx[-1] + 1}/{n})",
                       "progress": round(self.step / self.total_steps, 4)})
        return torch.cat(out)

    def train_view_features(self, view: int) -> torch.Tensor:
        """Backbone features of every training image. View 0 is the test-style centre view;
        views 1, 2, ... are the book's random augmentation, seeded by the view number."""
        if not hasattr(self, "_view_features"):
            self._view_features = {}
        if view not in self._view_features:
            data, cfg = self.data, self.config
            if view == 0:
                def batch(idx):
                    return center_view_batch(data, idx, cfg.image_size, self.device)
            else:
                gen = random.Random(epoch_seed(cfg.seed, view, 3))

                def batch(idx):
                    return augment_batch(data, idx, cfg.image_size, gen, self.device)
            self._view_features[view] = self.compute_features(batch, len(data.train_labels),
                                                              f"backbone features, view {view + 1}")
        return self._view_features[view]

    def test_features(self) -> torch.Tensor:
        if not hasattr(self, "_test_features"):
            data = self.data
            self._test_features = self.compute_features(
                lambda idx: data.test_images[idx].to(self.device), len(data.test_labels), "test features")
        return self._test_features

    def train_epoch_on_features(self, epoch: int) -> EpochResult:
        """Head-only training on cached backbone features: the view used cycles through
        `feature_views` (the centre view, then augmented views)."""
        cfg = self.config
        t0 = time.perf_counter()
        feats = self.train_view_features(epoch % cfg.feature_views)
        # Computing the features is this epoch's training work too: count it in images/s.
        self.train_seconds += time.perf_counter() - t0
        self.features_model()
        self._head.train()
        _, order = self.shuffled(epoch)
        labels = self.data.train_labels.to(self.device)

        def forward(b: int):
            idx = torch.tensor(order[b * cfg.batch_size:(b + 1) * cfg.batch_size], device=self.device)
            return self._head(feats[idx]), labels[idx]

        return self.run_batches(epoch, forward)

    # --- evaluation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def evaluate(self, frozen: bool = False) -> tuple[float, float]:
        """Test loss (mean per example) and accuracy; keeps the logits for predictions.csv."""
        data, cfg = self.data, self.config
        if frozen:
            self.features_model()
            self._head.eval()
            logits = self._head(self.test_features()).float()
        else:
            self.model.eval()
            chunks = []
            for start in range(0, len(data.test_labels), cfg.eval_batch_size):
                self.check_stop()
                x = data.test_images[start:start + cfg.eval_batch_size].to(self.device)
                x = normalize_batch(x, self.mean, self.std, cfg.channels_last)
                with self.autocast():
                    chunks.append(self.model(x).float())
            logits = torch.cat(chunks)
        labels = data.test_labels.to(logits.device)
        loss = F.cross_entropy(logits, labels).item()
        acc = (logits.argmax(1) == labels).float().mean().item()
        self.last_test_logits = logits.cpu()
        return loss, acc

    def end_epoch(self, epoch: int, result: EpochResult, test_loss: float, test_acc: float) -> None:
        self.train_seconds += result.seconds
        self.train_images += result.images
        ips = self.train_images / self.train_seconds if self.train_seconds else 0.0
        body_lr, head_lr = self.lrs()
        event = {"kind": "epoch", "epoch": epoch + 1, "step": self.step, "loss": result.loss,
                 "train_acc": result.train_acc, "test_loss": test_loss, "test_acc": test_acc,
                 "lr": body_lr, "head_lr": head_lr, "images_per_s": round(ips, 2),
                 "progress": round(self.step / self.total_steps, 4),
                 "message": f"epoch {epoch + 1}/{self.config.epochs}: loss {result.loss:.3f}, "
                            f"train acc {result.train_acc:.3f}, test acc {test_acc:.3f}"}
        event.setdefault("elapsed_s", round(time.perf_counter() - self.t_start, 3))
        self.run.append_metrics(event)
        self.emit(event, force_status=True)
        self.run.write_status(loss=result.loss, train_acc=result.train_acc, test_acc=test_acc,
                              test_loss=test_loss, best_test_acc=max(self.best_test_acc, test_acc),
                              epochs_done=epoch + 1)
        cfg_dict, classes = self.config.to_dict(), self.classes
        save_checkpoint(self.run.file(CHECKPOINT_LAST), self.model, self.optimizer, epoch + 1,
                        max(self.best_test_acc, test_acc), cfg_dict, classes)
        if test_acc > self.best_test_acc:  # the same state: copy the file rather than serialise twice
            self.best_test_acc = test_acc
            tmp = self.run.file(f".{CHECKPOINT_BEST}.tmp")
            shutil.copyfile(self.run.file(CHECKPOINT_LAST), tmp)
            os.replace(tmp, self.run.file(CHECKPOINT_BEST))

    def write_predictions(self) -> None:
        """predictions.csv: the final model on the test split."""
        import pandas as pd

        if self.last_test_logits is None:
            self.evaluate(frozen=self.epoch_uses_features(self.config.epochs - 1))
        probs = torch.softmax(self.last_test_logits, dim=1)
        labels = self.data.test_labels
        conf, pred = probs.max(1)
        losses = F.cross_entropy(self.last_test_logits, labels, reduction="none")
        frame = pd.DataFrame({
            "path": self.data.test_paths,
            "true": [self.classes[i] for i in labels.tolist()],
            "predicted": [self.classes[i] for i in pred.tolist()],
            "confidence": conf.numpy(),
            "loss": losses.numpy(),
        })
        for i, c in enumerate(self.classes):
            frame[f"prob_{c}"] = probs[:, i].numpy()
        tmp = self.run.file(f".{PREDICTIONS}.tmp")
        frame.to_csv(tmp, index=False)
        os.replace(tmp, self.run.file(PREDICTIONS))

    def final_summary(self) -> dict:
        ips = self.train_images / self.train_seconds if self.train_seconds else 0.0
        return {"images_per_s": round(ips, 2), "train_seconds": round(self.train_seconds, 2)}


def train(config: TrainConfig, run_dir: RunDir | str | os.PathLike, on_event: EventCallback | None = None,
          stop_event: threading.Event | None = None, resume: bool = False,
          cache_dir: str | None = None) -> dict:
    """Run one training to its end and return its final status. Never raises for a failed run:
    the state (completed, stopped, failed, diverged) and message are in the returned status and
    in status.json. Raises ConfigError for invalid settings before writing anything."""
    config.check()
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_status(state="running", message="starting", progress=0.0, started_at=now_iso(), ended_at=None)
    run.log(f"{'resuming' if resume else 'starting'} run {run.id}")
    trainer = Trainer(config, run, on_event, stop_event, cache_dir)
    try:
        trainer.setup(resume)
        trainer.run_all()
        trainer.write_predictions()
        best = max(trainer.best_test_acc, 0.0)
        status = run.write_status(state="completed", progress=1.0, eta_s=0, ended_at=now_iso(),
                                  message=f"best test accuracy {best:.3f}", **trainer.final_summary())
    except StopRequested:
        status = run.write_status(state="stopped", ended_at=now_iso(), message="stopped by the user"
                                  + ("; it can be resumed from its last checkpoint" if run.has_checkpoint() else ""),
                                  **trainer.final_summary())
    except Diverged as exc:
        status = run.write_status(state="diverged", ended_at=now_iso(), message=str(exc),
                                  **trainer.final_summary())
    except torch.OutOfMemoryError as exc:
        run.log(traceback.format_exc())
        status = run.write_status(state="failed", ended_at=now_iso(),
                                  message=f"out of memory on {trainer.device}: try a smaller batch size or image "
                                          f"size ({str(exc).splitlines()[0]})", **trainer.final_summary())
    except Exception as exc:  # noqa: BLE001 - a failed run must say why and keep its metrics
        run.log(traceback.format_exc())
        status = run.write_status(state="failed", ended_at=now_iso(), message=f"{type(exc).__name__}: {exc}",
                                  **trainer.final_summary())
    run.log(f"ended {status.get('state')}: {status.get('message')}")
    if trainer.on_event is not None:
        trainer.on_event({"kind": "end", **status})
    del trainer
    gc.collect()  # the model, optimiser and decoded images, cycles included
    release_memory()  # the tuned allocator keeps a run's peak heap until asked
    return status
