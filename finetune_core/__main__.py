"""Command line: scan, train, lr-find, sweep, predict, runs, export, info (the same engine as the dashboard).

    python -m finetune_core scan DATA [--json]
    python -m finetune_core train --data DATA [--preset NAME] [--backbone NAME] ... [--json]
                                  (a flag for every setting: see config.TrainConfig)
    python -m finetune_core lr-find --data DATA [the train flags] [--steps N] [--json]
    python -m finetune_core sweep --data DATA --lr F,F,... --head-lr-mult F,F,... [the train flags] [--json]
    python -m finetune_core predict --run RUN_DIR_OR_BUNDLE IMAGE... [--top-k K] [--json]
    python -m finetune_core runs [--runs-dir DIR] [--json]
    python -m finetune_core export --run RUN_DIR --out DIR
    python -m finetune_core info [--json]

The command sets glibc's malloc settings from finetune_core.memory in its own process (about 2x
faster CPU training on Linux); TUNEBOARD_ALLOCATOR=default turns that off.

Runs go to runs.default_runs_dir() (TUNEBOARD_RUNS_DIR, else runs/ beside the app), as the
dashboard's do; --runs-dir changes it. `runs` does not import torch.

Exit codes: 0 success, 1 the run (or the lr-find sweep) did not complete, 2 bad input (one line on stderr
for both).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig

def one_line(text: str) -> str:
    """A message on one line (exception texts may span several)."""
    return " ".join(str(text).split())


def fail(message: str, code: int = 2) -> int:
    """One line on stderr; exit code 2 (bad input) unless told otherwise."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return code


def cmd_scan(args) -> int:
    from .cachestore import default_cache_dir
    from .data import DatasetError, format_report, scan_dataset

    try:
        report = scan_dataset(args.data, test_fraction=args.test_fraction, scan_cache=default_cache_dir())
    except (DatasetError, ValueError) as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    if not report.usable:
        print(f"error: no usable dataset: {report.reason()}", file=sys.stderr)
        return 2
    return 0


class ProgressBar:
    """The run's progress on stderr: a tqdm bar (preparation, then batches, with the time left)
    and one line per finished epoch."""

    def __init__(self, file=None, mininterval: float = 0.1):
        from tqdm import tqdm

        self.file = file or sys.stderr
        self.bar = tqdm(total=100, file=self.file, dynamic_ncols=True, leave=False, mininterval=mininterval,
                        bar_format="{percentage:3.0f}%|{bar}| {desc}{postfix}")

    def __call__(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "epoch":
            self.bar.write(f"{event['message']} ({event['images_per_s']:.1f} img/s)", file=self.file)
        elif kind in ("batch", "prepare", "lr_find"):
            self.bar.set_description_str(event.get("message", ""), refresh=False)
            if kind == "batch" and event.get("eta_s") is not None:
                self.bar.set_postfix_str(f"{event['eta_s']:.0f} s left, {event.get('images_per_s', 0):.1f} img/s",
                                         refresh=False)
            self.bar.update(max(0.0, 100 * float(event.get("progress", 0.0)) - self.bar.n))
        elif kind == "end":
            self.close()

    def close(self) -> None:
        self.bar.close()


def config_from_args(args) -> TrainConfig:
    """The train command's settings: the preset (if any), then every flag that was given."""
    from .config import TrainConfig, preset_config, settings

    overrides = {name: getattr(args, name) for name, s in settings().items()
                 if s.flag is not None and getattr(args, name, None) is not None}
    return preset_config(args.preset, **overrides) if args.preset else TrainConfig(**overrides)


class BadInput(Exception):
    """A refused setting or an unusable dataset: one line on stderr, exit code 2."""


def checked_config_and_scan(args):
    """The settings from the flags, validated, and the dataset's scan (passed on to the engine so
    that it does not scan again). Raises BadInput before anything is written."""
    from .cachestore import default_cache_dir
    from .config import ConfigError
    from .data import DatasetError, scan_dataset

    try:
        config = config_from_args(args).check(check_paths=True)
    except ConfigError as exc:
        raise BadInput("invalid settings: " + "; ".join(exc.errors.values())) from None
    try:
        report = scan_dataset(config.data, test_fraction=config.test_fraction, scan_cache=default_cache_dir())
    except DatasetError as exc:
        raise BadInput(str(exc)) from None
    if not report.usable:
        raise BadInput(f"no usable dataset: {report.reason()}")
    from .models import WeightsUnavailable, fetch_weights

    try:
        fetch_weights(config.backbone, config.weights)  # a timm model's download, before the run folder
    except WeightsUnavailable as exc:
        raise BadInput(str(exc)) from None
    return config, report


def cmd_train(args) -> int:
    from .distributed import Distributed
    from .runs import new_run_dir

    try:
        config, report = checked_config_and_scan(args)
    except BadInput as exc:
        return fail(str(exc))
    distributed = Distributed.from_env()  # under torchrun: this rank; rank 0 creates the run folder
    run = distributed.run_dir(lambda: new_run_dir(args.runs_dir, config.name or config.backbone))
    return run_to_the_end(config, run, args, report=report, distributed=distributed)


def run_to_the_end(config, run, args, report=None, resume: bool = False, distributed=None) -> int:
    """Train (or resume) in this process with a progress bar; print the outcome; the exit code.
    Under torchrun (`distributed`), every rank trains and rank 0 alone reports."""
    from .distributed import Distributed, Terminated
    from .engine import train
    from .runs import run_score

    distributed = distributed or Distributed()
    stop = distributed.stop_flag(run) if distributed.enabled else threading.Event()
    progress = None if args.quiet or not distributed.is_main else ProgressBar()
    try:
        with distributed.signals(stop) as training_done:
            try:
                status = train(config, run, on_event=progress, stop_event=stop, report=report, resume=resume,
                               distributed=distributed)
            except Terminated as exc:  # torchrun ended this rank, perhaps as train() was writing its end
                status = ended_by_torchrun(run, exc)
            finally:
                training_done()
            status = distributed.settle(run, status)  # a failed rank's message reaches rank 0
    except Terminated as exc:  # it landed between train()'s return and training_done()
        status = distributed.settle(run, ended_by_torchrun(run, exc))
    except KeyboardInterrupt:  # the engine has marked the run stopped, its checkpoint kept
        status = run.read_status()
    finally:
        if progress is not None:
            progress.close()
    distributed.close()
    if not distributed.is_main:
        return 0 if status.get("state") == "completed" else 1
    score = run_score(status)  # the model the run keeps: what predict and export use
    result = {"run_dir": str(run.path), "status": status.get("state"), "message": status.get("message"),
              "test_acc": score.test_acc, "kept_model": score.kept,
              "train_acc": status.get("train_acc"), "loss": status.get("loss"),
              "images_per_s": status.get("images_per_s")}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['status']}: {result['message']}\nrun folder: {run.path}")
    return 0 if status.get("state") == "completed" else 1


def ended_by_torchrun(run, exc: BaseException) -> dict:
    """The status of a rank that torchrun ended (SIGTERM, because another rank failed). The signal
    can land anywhere, even while train() writes why the run failed: a run still marked running
    is marked failed here, and settle() then replaces the message with the failing rank's."""
    from .runs import ACTIVE_STATES, now_iso

    status = run.read_status(default={})
    if status.get("state") in ACTIVE_STATES or not status:
        status = run.write_status(state="failed", ended_at=now_iso(), message=f"Terminated: {exc}")
    return status


def saved_run(run_dir: str, states: tuple[str, ...], distributed):
    """(config, None) of a run folder whose state is one of `states`, or (None, exit code) after
    saying what is wrong. Under torchrun rank 0 reads the folder and tells the other ranks. A
    resume (`states` RESUMABLE_STATES) does not need the run's starting weights: its checkpoint
    replaces them (and the engine refuses a resume that needs them and lacks them, saying why)."""
    from .config import ConfigError, TrainConfig
    from .runs import ACTIVE_STATES, RESUMABLE_STATES, RunDir

    run = RunDir(run_dir)
    resuming = states == RESUMABLE_STATES

    def read() -> tuple[dict | None, str]:
        try:
            record, status = run.read_config(), run.read_status()
            saved = TrainConfig.from_dict(record["config"])
            (saved.replace(weights="none") if resuming else saved).check(check_paths=True)
        except (OSError, ValueError, KeyError) as exc:
            return None, f"{run.path}: cannot be resumed ({type(exc).__name__}: {exc})"
        except ConfigError as exc:
            return None, f"{run.path}: its settings are no longer valid here: " + "; ".join(exc.errors.values())
        state = status.get("state")
        if state in ACTIVE_STATES and resuming:  # left so by a process that is gone (rank 0 owns the run
            state = "interrupted"                 # now: see cmd_resume)
        if state not in states:
            return None, f"{run.path}: is {state}; only a {' or '.join(states)} run can be resumed"
        return record["config"], ""

    values, problem = distributed.from_main(read)
    if problem:
        return None, fail(problem)
    return TrainConfig.from_dict(values).check(), None


def cmd_resume(args) -> int:
    """Continue a stopped or interrupted run from its last checkpoint, in its own folder. Refused
    while another live process (a server, another command) writes the run."""
    import contextlib

    from .distributed import STOP_FILE, Distributed
    from .runs import RESUMABLE_STATES, RunDir, RunOwned, owning

    distributed = Distributed.from_env()
    run = RunDir(args.run_dir)
    if distributed.is_main and not run.path.is_dir():
        return fail(f"{run.path}: no such run folder")
    try:
        with owning(run) if distributed.is_main else contextlib.nullcontext():  # no other writer from here on
            config, code = saved_run(args.run_dir, RESUMABLE_STATES, distributed)
            if config is None:
                return code
            if distributed.is_main:  # a stop the dashboard asked of an earlier process is not for this one
                run.file(STOP_FILE).unlink(missing_ok=True)
            return run_to_the_end(config, distributed.follower(run), args, resume=True, distributed=distributed)
    except RunOwned as exc:
        return fail(str(exc))


def cmd_start(args) -> int:
    """Train a run folder the dashboard queued (its config.json): how it starts a torchrun run."""
    from .distributed import Distributed
    from .runs import RunDir

    distributed = Distributed.from_env()
    config, code = saved_run(args.run_dir, ("queued",), distributed)
    if config is None:
        return code
    return run_to_the_end(config, distributed.follower(RunDir(args.run_dir)), args, resume=args.resume,
                          distributed=distributed)


def cmd_sweep(args) -> int:
    """One run per learning rate x head multiplier, one after another in this process, in one
    group; then the grid of the kept models' accuracies (validation when held out, else test),
    best marked."""
    from .config import ConfigError
    from .distributed import launched_by_torchrun

    if launched_by_torchrun():  # every rank would run every cell
        return fail("sweep runs its cells in one process: start it with python -m finetune_core, not torchrun")
    from .engine import resolve_auto, train
    from .runs import new_run_dir
    from .sweep import new_sweep_group, parse_values, sweep_configs, sweep_grid, sweep_table

    try:
        lrs, mults = parse_values(args.sweep_lr, "lr"), parse_values(args.sweep_head_lr_mult, "head_lr_mult")
        config, report = checked_config_and_scan(args)
        configs = sweep_configs(resolve_auto(config, report), lrs, mults, group=new_sweep_group())
    except ConfigError as exc:
        return fail("invalid sweep: " + "; ".join(exc.errors.values()))
    except BadInput as exc:
        return fail(str(exc))
    paths, shared_features = [], {}  # the frozen part's outputs, computed by the first cell for all
    for k, cell in enumerate(configs, start=1):
        run = new_run_dir(args.runs_dir, cell.name)
        paths.append(run.path)
        if not args.quiet:
            print(f"[{k}/{len(configs)}] {cell.name}", file=sys.stderr)
        progress = None if args.quiet else ProgressBar()
        try:
            train(cell, run, on_event=progress, stop_event=threading.Event(), report=report,
                  shared_features=shared_features)
        except KeyboardInterrupt:  # the engine has marked the run stopped; the grid so far is printed
            break
        finally:
            if progress is not None:
                progress.close()
    table = sweep_table(paths)
    grid = sweep_grid(table)
    if args.json:
        folders = {p.name: str(p) for p in paths}
        cells = [{"lr": r.lr, "head_lr_mult": r.head_lr_mult, "state": r.state,
                  "accuracy": None if r.accuracy is None or math.isnan(r.accuracy) else float(r.accuracy),
                  "split": r.split, "run_dir": folders[r.run_id]} for r in table.itertuples(index=False)]
        best = None
        if grid.best is not None:
            (lr, mult), (i, j) = grid.best_values, grid.best
            best = {"lr": lr, "head_lr_mult": mult, "accuracy": grid.accuracy[i][j]}
        print(json.dumps({"cells": cells, "best": best, "split": grid.split}))
    else:
        print(f"{grid.label} (rows: lr, columns: head multiplier; * best)")
        print("lr        " + "".join(f"{'x' + format(m, 'g'):>10}" for m in grid.head_lr_mults))
        for i, lr in enumerate(grid.lrs):
            cells = [("-" if v is None else f"{v:.3f}") + ("*" if grid.best == (i, j) else "")
                     for j, v in enumerate(grid.accuracy[i])]
            print(f"{lr:<10g}" + "".join(f"{c:>10}" for c in cells))
        if grid.best_values is not None:
            lr, mult = grid.best_values
            print(f"best: --lr {lr:g} --head-lr-mult {mult:g}")
    return 0 if all(r.state == "completed" for r in table.itertuples()) and len(table) == len(configs) else 1


MIN_SWEEP_STEPS = 5  # lr_find.suggest_lr needs five points of the curve


def sweep_problem(args) -> str | None:
    """What is wrong with lr-find's own flags (the sweep's range and length), or None."""
    if args.steps < MIN_SWEEP_STEPS:
        return f"--steps must be at least {MIN_SWEEP_STEPS} (the suggestion needs five points), got {args.steps}"
    if not (args.start_lr > 0 and math.isfinite(args.start_lr)):
        return f"--start-lr must be a number greater than zero, got {args.start_lr:g}"
    if not (args.end_lr > args.start_lr and math.isfinite(args.end_lr)):
        return f"--end-lr must be greater than --start-lr ({args.start_lr:g}), got {args.end_lr:g}"
    return None


def cmd_lr_find(args) -> int:
    from . import lr_find
    from .distributed import launched_by_torchrun

    if launched_by_torchrun():  # every rank would sweep on its own
        return fail("lr-find runs in one process: start it with python -m finetune_core, not torchrun")

    problem = sweep_problem(args)
    if problem:
        return fail(problem)
    try:
        config, report = checked_config_and_scan(args)
    except BadInput as exc:
        return fail(str(exc))
    progress = None if args.quiet else ProgressBar()
    failure = None
    try:
        result = lr_find.find_lr(config, report=report, start_lr=args.start_lr, end_lr=args.end_lr,
                                 steps=args.steps, on_event=progress)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - one line, not a traceback
        failure = lr_find.failure_message(exc)
    finally:
        if progress is not None:
            progress.close()
    if failure is not None:
        input_at_fault, message = failure
        return fail(message, 2 if input_at_fault else 1)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    every = max(1, len(result.lrs) // 20)
    print(f"lr        {result.curve}")
    for lr, loss in list(zip(result.lrs, result.losses))[::every]:
        print(f"{lr:<9.2g} {loss:.4f}")
    if result.stopped:
        print(result.stopped)
    if result.suggestion is None:
        print("no suggestion: the loss did not fall over this range")
    else:
        print(f"suggested learning rate: {result.suggestion:.2g} (train ... --lr {result.suggestion:.2g})")
    return 0


def cmd_predict(args) -> int:
    from tqdm import tqdm

    from .predict import PredictError, Predictor, image_inputs, predictions_frame

    if args.batch_size < 1:
        return fail(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        return fail(f"--threshold must be a probability from 0 to 1, not {args.threshold:g}")
    try:
        predictor = Predictor.load(args.run, checkpoint=args.checkpoint)
        files = image_inputs(args.images)
    except (PredictError, FileNotFoundError, KeyError) as exc:
        return fail(str(exc))
    if args.heatmap_class is not None and args.heatmap_class not in predictor.classes:
        return fail(f"--heatmap-class {args.heatmap_class!r} is not one of the run's classes: "
                    + ", ".join(predictor.classes))
    with tqdm(total=len(files), file=sys.stderr, leave=False, unit="img", disable=len(files) < 2) as bar:
        results = predictor.predict_many(((str(f), f.read_bytes) for f in files), top_k=args.top_k,
                                         threshold=args.threshold, total=len(files), batch_size=args.batch_size,
                                         progress=lambda done, total: bar.update(done - bar.n))
    if args.csv:
        predictions_frame(results, args.top_k).to_csv(args.csv, index=False)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    for r in results:
        if r.error:
            print(f"{r.name}: ERROR {r.error}", file=sys.stderr if args.csv or args.json else sys.stdout)
        elif not (args.csv or args.json):
            guesses = ", ".join(f"{c} {p:.3f}" for c, p in r.top)
            print(f"{r.name}: not sure, {r.why} (top guesses: {guesses})" if r.not_sure else f"{r.name}: {guesses}")
    if args.heatmaps:
        from .heatmaps import HeatmapError, write_overlays

        try:
            with tqdm(total=len(files), file=sys.stderr, leave=False, unit="img", desc="heatmaps",
                      disable=len(files) < 2) as bar:
                written, _ = write_overlays(predictor, files, args.heatmaps, args.heatmap_class,
                                            progress=lambda done, total: bar.update(done - bar.n))
        except (HeatmapError, PredictError) as exc:
            return fail(str(exc))
        print(f"{len(written)} heatmaps ({'why ' + args.heatmap_class if args.heatmap_class else 'the answer'}"
              f", Grad-CAM++) -> {args.heatmaps}", file=sys.stderr if args.json else sys.stdout)
    if args.csv:
        unsure = sum(r.not_sure for r in results)
        unlike = sum(r.not_sure and r.unlike for r in results)
        errors = sum(bool(r.error) for r in results)
        print(f"{len(results)} images: {len(results) - unsure - errors} answered, {unsure} not sure (below "
              f"{predictor.threshold_for(args.threshold):.3f}; {unlike} of them unlike the training photos), "
              f"{errors} unreadable -> {args.csv}", file=sys.stderr if args.json else sys.stdout)
    if predictor.reference is None and results:
        print(f"note: {predictor.not_sure_rule}", file=sys.stderr)
    return 2 if any(r.error for r in results) else 0


def cmd_runs(args) -> int:
    from .runs import list_runs

    infos = list_runs(args.runs_dir)
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    if not infos:
        print(f"no runs in {args.runs_dir}")
    for i in infos:
        if i.error:
            print(f"{i.id}  {i.error}")
            continue
        print(f"{i.id}  {i.state:<11} {i.score.text()}  {i.backbone}  {i.dataset}")
        if i.warning:
            print(f"{'':<{len(i.id)}}  {i.warning}")
    return 0


def cmd_export(args) -> int:
    from .predict import PredictError, bundle_warning, export_bundle

    try:
        out = export_bundle(args.run, args.out, checkpoint=args.checkpoint)
    except (PredictError, FileNotFoundError) as exc:
        return fail(str(exc))
    if bundle_warning(out):
        print(f"warning: {bundle_warning(out)} (the rest of the bundle is written)", file=sys.stderr)
    print(out)
    return 0


def cmd_review(args) -> int:
    """Review a dataset (label issues, copies and leaks, images that teach nothing), or change its
    fixes file: --apply FIXES adds a fixes file's entries, --undo N removes one, --export OUT writes a
    corrected copy."""
    from .data import DatasetError, scan_dataset
    from .fixes import FixesError, export_corrected, fixes_path, install_fixes, undo_fix

    try:
        report = scan_dataset(args.data)
        if args.apply or args.undo is not None or args.export:
            if args.apply:
                path, n = install_fixes(report.root, args.apply)
                print(f"{n} fixes from {args.apply} recorded in {path}")
            if args.undo is not None:
                removed = undo_fix(report.root, args.undo - 1)
                print(f"undone: {removed.action} {removed.path} ({fixes_path(report.root)})")
            if args.export:
                report = scan_dataset(args.data)
                if not report.usable:
                    return fail(f"no usable dataset: {report.reason()}")
                print(f"corrected copy written to {export_corrected(report, args.export)}")
            return 0
        if not report.usable:
            return fail(f"no usable dataset: {report.reason()}")
        return _print_review(args, report)
    except (DatasetError, FixesError, ValueError) as exc:
        return fail(str(exc))


def _print_review(args, report) -> int:
    from .review import KIND_LABELS, review_dataset

    bar = None if args.quiet or args.json else ProgressBar()

    def progress(fraction: float, message: str) -> None:
        if bar is not None:
            bar({"kind": "prepare", "progress": fraction, "message": message})

    try:
        result = review_dataset(args.data, folds=args.folds, backbone=args.backbone, image_size=args.image_size,
                                run_dir=args.run, runs_dir=args.runs_dir, report=report, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if args.csv:
        import pandas as pd

        pd.DataFrame([i.to_dict() for i in result.issues],
                     columns=["kind", "path", "split", "given", "suggested", "score", "other", "confidence",
                              "detail"]).to_csv(args.csv, index=False)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"Reviewed {result.images.get('train', 0)} training and {result.images.get('test', 0)} test images "
          f"in {result.seconds:.0f} s")
    for kind, n in result.counts().items():
        if n:
            print(f"  {KIND_LABELS[kind]:<22} {n}")
    for note in result.health_notes:
        print(note)
    for issue in result.issues[:args.top]:
        suggestion = f" -> {issue.suggested}" if issue.suggested else ""
        other = f" (copies {issue.other})" if issue.other else ""
        print(f"{issue.kind:<16} {issue.score:5.2f}  [{issue.given}{suggestion}] {issue.path}{other}")
    if len(result.issues) > args.top:
        print(f"... and {len(result.issues) - args.top} more (--json or --csv for all)")
    return 0


def cmd_info(args) -> int:
    import torch

    from . import __version__, memory
    from .models import available_devices, device_description, offline_backbones

    info = {"tuneboard": __version__, "torch": torch.__version__, "device": device_description(),
            "devices": available_devices(), "threads": torch.get_num_threads(),
            "allocator_tuned": memory.supported() and memory.is_tuned(), "allocator": memory.describe(),
            "offline_backbones": offline_backbones()}
    if args.json:
        print(json.dumps(info))
    else:
        print("\n".join(f"{key}: {', '.join(value) if isinstance(value, list) else value}"
                        for key, value in info.items()))
    return 0


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, from its definition (config.TrainConfig's field metadata): the
    type, the choices, a --[no-]flag pair for on/off settings, the help with its unit and default.
    Every default is None: a flag that is not given leaves the preset's or the default value."""
    from .config import SECTIONS, settings

    groups = {key: parser.add_argument_group(f"settings: {title.lower()}") for key, title in SECTIONS.items()}
    for s in settings().values():
        if s.flag_name is None:
            continue
        group = groups[s.section]
        default = ("on" if s.default else "off") if s.kind is bool else s.default if s.default not in ("", None) \
            else "none"
        text = s.display_label + (f": {s.help}" if s.help else "")
        text = f"{text} [default: {default}]".replace("%", "%%")
        if s.kind is bool:
            group.add_argument(s.flag_name, dest=s.name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        else:
            choices = None if callable(s.choices) else s.choice_list()
            metavar = None if choices else s.metavar or {int: "N", float: "F", str: "TEXT"}[s.kind]
            group.add_argument(s.flag_name, dest=s.name, type=s.kind, choices=choices, metavar=metavar,
                               default=None, required=s.required, help=text)
        for flag, value, shorthand_help in s.shorthands:
            group.add_argument(flag, dest=s.name, action="store_const", const=value, help=shorthand_help)


def add_runs_dir(parser: argparse.ArgumentParser) -> None:
    from .runs import default_runs_dir

    parser.add_argument("--runs-dir", default=str(default_runs_dir()),
                        help="where runs live (TUNEBOARD_RUNS_DIR, else runs/ beside the app) [default: %(default)s]")


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    parser = argparse.ArgumentParser(prog="python -m finetune_core", description="Tuneboard: fine-tune an "
                                     "ImageNet-pretrained classifier on a folder of images.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scan", help="report what is in a dataset folder and what is wrong with it")
    p.add_argument("data")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("train", help="fine-tune a backbone on a dataset folder")
    p.add_argument("--preset", choices=list(PRESETS), help="start from a preset; other flags override it")
    add_setting_flags(p)
    add_runs_dir(p)
    p.add_argument("--json", action="store_true", help="print a final JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("lr-find", help="sweep the learning rate on what a run would train; suggest one "
                       "(writes no run folder)")
    p.add_argument("--preset", choices=list(PRESETS), help="start from a preset; other flags override it")
    add_setting_flags(p)
    p.add_argument("--start-lr", type=float, default=1e-6, help="[default: %(default)s]")
    p.add_argument("--end-lr", type=float, default=1.0, help="[default: %(default)s]")
    p.add_argument("--steps", type=int, default=60,
                   help="steps of the sweep, at most (5 or more) [default: %(default)s]")
    p.add_argument("--json", action="store_true", help="print the curve and the suggestion as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("sweep", conflict_handler="resolve",
                       help="one run per learning rate x head multiplier (one group), then the grid of accuracies")
    p.add_argument("--preset", choices=list(PRESETS), help="start from a preset; other flags override it")
    add_setting_flags(p)
    p.add_argument("--lr", dest="sweep_lr", required=True, metavar="F,F,...",
                   help="the learning rates to try, e.g. 1e-5,5e-5,2e-4")
    p.add_argument("--head-lr-mult", dest="sweep_head_lr_mult", required=True, metavar="F,F,...",
                   help="the head multipliers to try, e.g. 1,10,30")
    add_runs_dir(p)
    p.add_argument("--json", action="store_true", help="print the grid as a final JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("predict", help="classify images with a trained run or an exported bundle")
    p.add_argument("--run", required=True, help="a run folder, or a bundle folder or zip")
    p.add_argument("--checkpoint", choices=["last", "best"], default=None,
                   help="default: the one the run selected (best on the validation split when it held one out, "
                        "else the last)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, or folders: every image in them (sub-folders included), in batches")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="answer 'not sure' below this calibrated top probability [default: the run's, chosen "
                        "on held-out images for at most 5%% errors among the answers; 0 for runs from before it]; "
                        "a run's second rule, 'not sure' for a photo unlike its training photos, stays in force")
    p.add_argument("--csv", default=None, metavar="FILE",
                   help="write file, answer, confidence, not_sure, why, top-k and error columns to FILE")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images a forward pass [default: 32]")
    p.add_argument("--heatmaps", default=None, metavar="OUT_DIR",
                   help="write each image's heatmap (Grad-CAM++: where the model looks) over its centre crop to "
                        "OUT_DIR")
    p.add_argument("--heatmap-class", default=None, metavar="CLASS",
                   help="explain this class instead of the answer (\"why not hot dog?\")")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("resume", help="continue a stopped or interrupted run from its last checkpoint")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print a final JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("start", help="train a run folder that the dashboard queued (it starts torchrun runs so)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--resume", action="store_true", help="continue from its last checkpoint")
    p.add_argument("--json", action="store_true", help="print a final JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("runs", help="list the runs in a runs folder")
    add_runs_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("export", help="write a bundle (safetensors + JSON + torch.export program + ONNX) of a run")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", choices=["last", "best"], default=None,
                   help="default: the one the run selected (best on the validation split when it held one out, "
                        "else the last)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("review", help="find label issues, copies, leaks and useless images in a dataset; "
                       "record or export fixes")
    p.add_argument("data")
    p.add_argument("--folds", type=int, default=5, help="folds of the out-of-fold predictions [default: %(default)s]")
    p.add_argument("--backbone", default=None, help="[default: the newest reusable run's, else efficientnet_lite0]")
    p.add_argument("--image-size", type=int, default=None, help="[default: the newest reusable run's, else 224]")
    p.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="a finished run on this dataset: its cached activations give the features and its "
                        "predictions score the test images [default: the newest finished run on this dataset in "
                        "--runs-dir whose activations are still cached, else the review computes its own]")
    add_runs_dir(p)
    p.add_argument("--json", action="store_true", help="print the review as one JSON object (README)")
    p.add_argument("--csv", metavar="FILE", help="also write the issues to a CSV file")
    p.add_argument("--top", type=int, default=30, help="issues listed in the text output [default: %(default)s]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--apply", metavar="FIXES", help="add the fixes of a fixes file to the dataset's own (no review)")
    p.add_argument("--undo", type=int, metavar="N", help="remove fix number N (1 = first) of the dataset's fixes file")
    p.add_argument("--export", metavar="OUT", help="write a corrected copy of the dataset (fixes applied) to OUT")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("info", help="the device, threads, memory settings and offline backbones")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def subcommand_flags(name: str) -> set[str]:
    """Every flag of one subcommand (for the README's check), without -h/--help."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {o for a in sub.choices[name]._actions for o in a.option_strings if o not in ("-h", "--help")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    from .memory import tune_in_process

    tune_in_process()  # before torch is imported or any thread starts (glibc's arenas are per thread)
    code = main()
    from .distributed import launched_by_torchrun

    if launched_by_torchrun():
        # A torchrun rank has written and settled everything by now (its files are fsynced), and the
        # interpreter's teardown can abort in gloo's worker threads (SIGABRT, "terminate called without
        # an active exception": pytorch#179291), turning a completed run into a failed launch: leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
