"""A run's checkpoints: writing them, loading them safely, and continuing a run from one.

`checkpoint_last.pt` is written at the end of every epoch, atomically and durably (a new file
renamed over the old one), and loads with torch.load(..., weights_only=True). `checkpoint_best.pt`
is the same file at the best score so far: a hard link to that epoch's `checkpoint_last.pt`
(a copy where the file system has no links). The next epoch's write of `checkpoint_last.pt` is a
new file renamed over the name, so it never changes the best one.
"""
from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .models import load_refusal
from .runs import CHECKPOINT_BEST, CHECKPOINT_LAST, RunDir, atomic_write_file

if TYPE_CHECKING:  # engine.py imports this module: the types only
    from .engine import Reporter, Setup


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely: damaged, or holding more than tensors and plain data."""


class ResumeRefused(Exception):
    """The run cannot continue from its checkpoint as things are (its dataset's classes changed,
    its dataset or device is missing...); the run and its checkpoint are left as they were."""


def class_change(saved: list[str], now: list[str]) -> str:
    """How the dataset's classes differ from a checkpoint's ('' when they are the same list): the
    classes added, removed, or the new order, each by name."""
    if list(saved) == list(now):
        return ""
    added = [c for c in now if c not in saved]
    removed = [c for c in saved if c not in now]
    parts = []
    if added:
        parts.append("added " + ", ".join(f"'{c}'" for c in added))
    if removed:
        parts.append("removed " + ", ".join(f"'{c}'" for c in removed))
    if not parts:
        parts.append(f"reordered from {list(saved)} to {list(now)}")
    return "; ".join(parts)


RESUME_ADVICE = "put the dataset back as it was to resume, or start a new run"


def fixes_change(recorded: dict | None, now: dict | None) -> str:
    """How the review fixes applied now differ from those a run trained with ('' when they are
    the same fixes): config.json's dataset.fixes against the scan's, both AppliedFixes.to_dict()."""
    from .fixes import summary_text

    def what(fixes: dict | None) -> tuple:
        fixes = fixes or {}
        return (fixes.get("relabelled", 0), fixes.get("excluded", 0), fixes.get("leaks_dropped", 0),
                fixes.get("fixes", []))

    if what(recorded) == what(now):
        return ""
    return (f"the review fixes applied changed since the run trained (then: {summary_text(*what(recorded)[:3])}; "
            f"now: {summary_text(*what(now)[:3])}); undo or redo them on the Review page to resume, "
            "or start a new run")


def validation_change(recorded: dict | None, now: dict | None) -> str:
    """How the validation split computed now differs from the one config.json records ('' when
    the same): a run that recorded none, or one made by path (before the split by content, no
    `split_by`), or other held-out images."""
    recorded, now = recorded or {}, now or {}
    if recorded and "split_by" not in recorded:
        return ("the run's validation split was made by file path, before the split by file content: resuming "
                "would validate on other images; start a new run")
    if not recorded and not now:
        return ""
    if not recorded or not now:
        then_text = "no validation split" if not recorded else "a validation split"
        now_text = "one" if now else "none"
        return f"the run trained with {then_text}, and the dataset now gives {now_text}; {RESUME_ADVICE}"
    compared = [k for k in now if k in recorded]  # `held_out` is not in the records of older runs
    if any(recorded[k] != now[k] for k in compared):
        return f"the validation split changed since the run trained (other images are held out); {RESUME_ADVICE}"
    return ""


def save_checkpoint(path: Path, model, optimizer, epoch: int, best_score: float, config: dict,
                    classes: list[str], epochs_without_gain: int = 0,
                    training_weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write a checkpoint atomically and durably (a kill or a full disk mid-write leaves the
    previous one whole): it loads with torch.load(..., weights_only=True).
    `best_test_acc` is the best score on the selection split (validation when held out). With
    weight averaging, `model` holds the averaged weights (the ones evaluated and used) and
    `training_weights` the weights the optimiser was training, for resume."""
    extra = {} if training_weights is None else {"training_weights": {k: v.cpu() for k, v in training_weights.items()}}
    state = {**extra, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "epoch": epoch, "best_test_acc": best_score,
             "epochs_without_gain": epochs_without_gain,
             "config": config, "classes": classes, "format": "tuneboard-checkpoint-1"}
    atomic_write_file(path, lambda f: torch.save(state, f))


def keep_as_best(run: RunDir) -> None:
    """Make the checkpoint just written (checkpoint_last.pt) the best one too, at no cost: a hard
    link under a temporary name renamed over checkpoint_best.pt (the old best stays whole until
    the rename). Where the file system refuses links, a copy written atomically."""
    last, best = run.file(CHECKPOINT_LAST), run.file(CHECKPOINT_BEST)
    tmp = best.with_name(f".{best.name}.{uuid.uuid4().hex}.link")
    try:
        os.link(last, tmp)
    except OSError:  # no hard links here (some network and FAT file systems)
        with open(last, "rb") as src:
            atomic_write_file(best, lambda f: shutil.copyfileobj(src, f))
        return
    try:
        os.replace(tmp, best)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A run's checkpoint, loaded with weights_only=True: a file crafted to run code when unpickled
    is refused (CheckpointError naming it), and nothing in it runs."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling refused, truncated, not a torch file
        raise CheckpointError(f"{path} cannot be loaded as a checkpoint: {load_refusal(exc)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} is not a Tuneboard checkpoint (no model weights in it)")
    return ckpt


def restore(ctx: "Setup", reporter: "Reporter") -> None:
    """Continue from the last checkpoint: weights, optimiser, epoch, best score, elapsed time.
    The run's files change only once everything has loaded (a refusal leaves them as they were);
    status.json then records the wall time the run had behind it (`resumed_after_s`), so that
    its duration counts every segment."""
    path = ctx.run.file(CHECKPOINT_LAST)
    ckpt = ctx.dist.from_main(lambda: load_checkpoint(path) if path.exists() else None)  # rank 0's, under DDP
    if ckpt is None:
        ctx.run.log("resume: no checkpoint yet, starting from the beginning")
        ctx.run.truncate_metrics(0)
        ctx.run.write_status(resumed_after_s=0.0)
        return
    saved = ckpt.get("classes") or ctx.run.read_config().get("classes", [])
    change = class_change(saved, ctx.classes)
    if change:
        raise ResumeRefused(f"not resumed: the dataset's classes changed since the checkpoint ({change}); "
                            f"the checkpoint was trained on {len(saved)} classes {list(saved)}. Put the class "
                            "folders back as they were to resume, or start a new run")
    data_change = ctx.dist.from_main(lambda: data_changes(ctx))  # rank 0 reads config.json, as the checkpoint
    if data_change:
        raise ResumeRefused(f"not resumed: {data_change}")
    ctx.model.load_state_dict(ckpt.get("training_weights", ckpt["model"]))
    if "training_weights" in ckpt and ctx.config.ema_decay:
        ctx.average = {k: v.to(ctx.device) for k, v in ckpt["model"].items()}
    ctx.optimizer.load_state_dict(ckpt["optimizer"])
    ctx.start_epoch = int(ckpt["epoch"])
    ctx.best_score = float(ckpt.get("best_test_acc", -1.0))
    ctx.epochs_without_gain = int(ckpt.get("epochs_without_gain", 0))
    ctx.step = ctx.start_epoch * ctx.batches_per_epoch
    ctx.run.truncate_metrics(ctx.start_epoch)
    metrics = ctx.run.read_metrics()
    behind = float(metrics["elapsed_s"].max()) if len(metrics) and "elapsed_s" in metrics else 0.0
    behind = 0.0 if math.isnan(behind) else behind
    reporter.t_start -= behind  # the wall-time axis keeps running
    ctx.run.write_status(resumed_after_s=round(behind, 3))
    ctx.run.log(f"resumed from the end of epoch {ctx.start_epoch}")


def data_changes(ctx: "Setup") -> str:
    """What would make a resume train on other data than its checkpoint did, as one sentence
    ('' when nothing): review fixes added or undone, or another validation split."""
    recorded = ctx.run.read_config().get("dataset") or {}
    fixes_now = ctx.report.fixes.to_dict() if ctx.report is not None and ctx.report.fixes is not None else None
    changes = [fixes_change(recorded.get("fixes"), fixes_now),
               validation_change(recorded.get("validation_split"), ctx.validation_copies)]
    return "; and ".join(c for c in changes if c)
