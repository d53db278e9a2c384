"""The learning-rate finder: a short run whose learning rate grows exponentially, step by step,
until the loss explodes; the loss drawn against the rate shows where training is fast and stable.

It trains exactly what the run would train (the same `train_stages`, parameter groups and head
multiplier: every group's rate is scaled by the same factor, so the head stays at lr x
multiplier), then puts the weights back and writes nothing: the run directory does not change.
With a validation split held out (`val_fraction`), the curve is the validation loss after each
step; without one, the training loss of each batch (smoothed).
"""
from __future__ import annotations

import copy
import math
import tempfile
import threading
from dataclasses import dataclass, field

import torch

from .config import TrainConfig
from .data import ScanReport
from .engine import (Diverged, EventCallback, Reporter, Setup, batch_loss, evaluate, evaluation_batches,
                     resolve_auto, setup, split_for, training_batches, train_one_epoch)
from .runs import RunDir

SMOOTHING = 0.9        # exponential moving average of the loss, bias-corrected
EXPLODED = 4.0         # stop once the smoothed loss is this many times its minimum
STEPS = 60             # batches a sweep trains at most (its cost estimate counts them)


@dataclass
class LRFinderResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)      # smoothed
    raw_losses: list[float] = field(default_factory=list)
    suggestion: float | None = None
    curve: str = "training loss"                             # or "validation loss"
    stopped: str = ""                                        # why it ended early, if it did

    def to_dict(self) -> dict:
        return {"lrs": self.lrs, "losses": self.losses, "raw_losses": self.raw_losses,
                "suggestion": self.suggestion, "curve": self.curve, "stopped": self.stopped}


def suggest_lr(lrs: list[float], losses: list[float]) -> float | None:
    """The rate where the smoothed loss falls fastest (steepest slope against log lr), looking
    only before the loss's minimum; None when the curve never falls."""
    if len(lrs) < 5:
        return None
    lowest = min(range(len(losses)), key=losses.__getitem__)
    if lowest < 2:
        return None
    slopes = [(losses[i + 1] - losses[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
              for i in range(1, lowest)]
    steepest = min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[steepest + 1] if slopes[steepest] < 0 else None


def lr_range_test(ctx: Setup, reporter: Reporter, start_lr: float = 1e-6, end_lr: float = 1.0,
                  steps: int = 60) -> LRFinderResult:
    """Run the sweep on a prepared run and put its model and optimiser back as they were."""
    cfg = ctx.config
    model_state = copy.deepcopy(ctx.model.state_dict())
    optimizer_state = copy.deepcopy(ctx.optimizer.state_dict())
    top, cache = split_for(ctx, cfg.train_stages, reporter)
    ratio = (end_lr / start_lr) ** (1.0 / max(1, steps - 1))
    result = LRFinderResult(curve="validation loss" if ctx.val_idx else "training loss")
    smoothed, best = 0.0, math.inf
    loss_fn = lambda logits, y: batch_loss(logits, y, cfg.loss_reduction, cfg.label_smoothing)  # noqa: E731
    state = {"step": 0, "loss_sum": 0.0, "seen": 0}  # the running sums of train_one_epoch's epoch so far

    class Done(Exception):
        pass

    def before_step() -> None:
        reporter.check_stop()
        if state["step"] >= steps:
            raise Done()
        lr = start_lr * ratio ** state["step"]
        for g in ctx.optimizer.param_groups:
            g["lr"] = g["initial_lr"] / cfg.lr * lr  # every group scaled alike: the multiplier holds
        result.lrs.append(lr)

    def after_step(loss_sum: float, correct: int, seen: int) -> None:
        nonlocal smoothed, best
        k = state["step"]
        state["step"] += 1
        if ctx.val_idx:
            logits, labels = evaluate(top, evaluation_batches(ctx, "val", cache), ctx.autocast)
            loss = torch.nn.functional.cross_entropy(logits, labels).item()
            top.train()
        else:
            loss = (loss_sum - state["loss_sum"]) / (seen - state["seen"])  # this batch's mean loss
        state["loss_sum"], state["seen"] = loss_sum, seen
        result.raw_losses.append(loss)
        smoothed = SMOOTHING * smoothed + (1 - SMOOTHING) * loss
        value = smoothed / (1 - SMOOTHING ** (k + 1))
        result.losses.append(value)
        best = min(best, value)
        reporter.emit({"kind": "lr_find", "step": k + 1, "lr": result.lrs[-1], "loss": value,
                       "progress": round((k + 1) / steps, 4),
                       "message": f"learning-rate finder: step {k + 1}/{steps}, lr {result.lrs[-1]:.2g}"})
        if not math.isfinite(value) or value > EXPLODED * best:
            result.stopped = f"the loss exploded at lr {result.lrs[-1]:.2g}"
            raise Done()

    try:
        epoch = 0
        while state["step"] < steps:
            state["loss_sum"], state["seen"] = 0.0, 0
            train_one_epoch(top, loss_fn, ctx.optimizer, training_batches(ctx, epoch, cache), before_step,
                            after_step, ctx.training_forward)
            epoch += 1
    except Done:
        pass
    except Diverged:
        result.stopped = f"the loss became infinite at lr {result.lrs[-1]:.2g}"
    del result.lrs[len(result.losses):]  # a rate set for a step that did not finish
    ctx.model.load_state_dict(model_state)
    ctx.optimizer.load_state_dict(optimizer_state)
    result.suggestion = suggest_lr(result.lrs, result.losses)
    return result


def find_lr(config: TrainConfig, report: ScanReport | None = None, cache_dir: str | None = None,
            start_lr: float = 1e-6, end_lr: float = 1.0, steps: int = STEPS, on_event: EventCallback | None = None,
            stop_event: threading.Event | None = None) -> LRFinderResult:
    """The learning-rate finder for these settings: builds the run's model and data as `train`
    would, sweeps, and returns the curve with a suggested learning rate. Writes no run folder."""
    config = resolve_auto(config.check(check_paths=True), report)
    with tempfile.TemporaryDirectory(prefix="tuneboard-lr-find-") as scratch:
        reporter = Reporter(RunDir(scratch), on_event, stop_event)
        ctx = setup(config, RunDir(scratch), reporter, report, cache_dir)
        try:
            return lr_range_test(ctx, reporter, start_lr, end_lr, steps)
        finally:
            for cache in ctx.caches.values():
                cache.close()


def failure_message(exc: BaseException) -> tuple[bool, str]:
    """(whether the input is at fault, why the finder failed) in one line, for the page and the
    command line alike (the command line exits 2 when the input is at fault: settings, a dataset
    whose images cannot be used; 1 otherwise)."""
    from .config import ConfigError
    from .data import DatasetError
    from .models import WeightsError

    first_line = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, ConfigError):
        return True, "invalid settings: " + "; ".join(exc.errors.values())
    if isinstance(exc, DatasetError):
        return True, f"the dataset could not be used: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return False, "the learning-rate finder was interrupted"
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in first_line.lower() \
            or "not enough memory" in first_line.lower():
        return False, f"out of memory: try a smaller batch size or image size ({first_line or type(exc).__name__})"
    if isinstance(exc, WeightsError):
        return False, f"the backbone's weights could not be loaded: {exc}"
    return False, f"the learning-rate finder failed: {type(exc).__name__}: {first_line}"
