"""Command line: scan, train, predict, runs, export (the same engine as the dashboard).

    python -m finetune_core scan DATA [--json]
    python -m finetune_core train --data DATA [--preset NAME] [--backbone NAME] ... [--json]
    python -m finetune_core predict --run RUN_DIR_OR_BUNDLE IMAGE... [--top-k K] [--json]
    python -m finetune_core runs [--runs-dir DIR] [--json]
    python -m finetune_core export --run RUN_DIR --out DIR
    python -m finetune_core info [--json]

The command starts Python once more with glibc's malloc settings from finetune_core.memory (about
2x faster CPU training on Linux); TUNEBOARD_ALLOCATOR=default turns that off.

Exit codes: 0 success, 1 the run did not complete, 2 bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading

DEFAULT_RUNS_DIR = "runs"


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_scan(args) -> int:
    from .data import DatasetError, format_report, scan_dataset

    try:
        report = scan_dataset(args.data, test_fraction=args.test_fraction)
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


def _progress_printer():
    """A one-line progress bar on stderr."""
    state = {"last": ""}

    def on_event(event: dict) -> None:
        kind = event.get("kind")
        if kind == "epoch":
            sys.stderr.write("\r" + " " * len(state["last"]) + "\r")
            sys.stderr.write(f"{event['message']} ({event['images_per_s']:.1f} img/s)\n")
            state["last"] = ""
        elif kind in ("batch", "prepare"):
            p = float(event.get("progress", 0.0))
            bar = "#" * int(p * 30)
            eta = f", {event['eta_s']:.0f} s left" if event.get("eta_s") is not None and kind == "batch" else ""
            line = f"[{bar:<30}] {p:5.1%} {event.get('message', '')}{eta}"
            sys.stderr.write("\r" + line.ljust(len(state["last"])))
            state["last"] = line
        sys.stderr.flush()

    return on_event


def cmd_train(args) -> int:
    from .config import ConfigError, TrainConfig, preset_config
    from .data import scan_dataset
    from .engine import train
    from .runs import new_run_dir

    overrides = {k: v for k, v in {
        "data": args.data, "backbone": args.backbone, "weights": args.weights, "lr": args.lr,
        "head_lr_mult": args.head_lr_mult, "param_groups": False if args.no_param_groups else None,
        "freeze_backbone": True if args.freeze_backbone else None, "loss_reduction": args.loss_reduction,
        "batch_size": args.batch_size, "epochs": args.epochs, "weight_decay": args.weight_decay,
        "momentum": args.momentum, "schedule": args.schedule, "image_size": args.image_size,
        "device": args.device, "precision": args.precision, "seed": args.seed, "name": args.name,
        "warmup_epochs": args.warmup_epochs, "feature_views": args.feature_views,
    }.items() if v is not None}
    try:
        config = preset_config(args.preset, **overrides) if args.preset else TrainConfig(**overrides)
        config.check(check_paths=True)
    except ConfigError as exc:
        return fail(f"invalid settings: {exc}")
    report = scan_dataset(config.data, test_fraction=config.test_fraction)
    if not report.usable:
        return fail(f"no usable dataset: {report.reason()}")
    run = new_run_dir(args.runs_dir, config.name or config.backbone)
    stop = threading.Event()
    on_event = None if args.quiet else _progress_printer()
    try:
        status = train(config, run, on_event=on_event, stop_event=stop)
    except KeyboardInterrupt:
        stop.set()
        status = run.read_status()
    result = {"run_dir": str(run.path), "status": status.get("state"), "message": status.get("message"),
              "test_acc": status.get("test_acc"), "best_test_acc": status.get("best_test_acc"),
              "train_acc": status.get("train_acc"), "loss": status.get("loss"),
              "images_per_s": status.get("images_per_s")}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['status']}: {result['message']}\nrun folder: {run.path}")
    return 0 if status.get("state") == "completed" else 1


def cmd_predict(args) -> int:
    from .predict import PredictError, Predictor

    try:
        predictor = Predictor.load(args.run, checkpoint=args.checkpoint)
    except (PredictError, FileNotFoundError, KeyError) as exc:
        return fail(str(exc))
    results = predictor.predict_files(args.images, top_k=args.top_k)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            if r.error:
                print(f"{r.name}: ERROR {r.error}")
            else:
                print(f"{r.name}: " + ", ".join(f"{c} {p:.3f}" for c, p in r.top))
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
        acc = f"{i.best_test_acc:.3f}" if i.best_test_acc is not None else "-"
        print(f"{i.id}  {i.state:<11} best test acc {acc}  {i.backbone}  {i.dataset}")
    return 0


def cmd_export(args) -> int:
    from .predict import PredictError, export_bundle

    try:
        out = export_bundle(args.run, args.out, checkpoint=args.checkpoint)
    except (PredictError, FileNotFoundError) as exc:
        return fail(str(exc))
    print(out)
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


def build_parser() -> argparse.ArgumentParser:
    from .config import LOSS_REDUCTIONS, PRECISIONS, PRESETS, SCHEDULES
    from .models import BACKBONES

    parser = argparse.ArgumentParser(prog="python -m finetune_core", description="Tuneboard: fine-tune an "
                                     "ImageNet-pretrained classifier on a folder of images.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scan", help="report what is in a dataset folder and what is wrong with it")
    p.add_argument("data")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("train", help="fine-tune a backbone on a dataset folder")
    p.add_argument("--data", required=True)
    p.add_argument("--preset", choices=list(PRESETS), help="start from a preset; other flags override it")
    p.add_argument("--backbone", choices=list(BACKBONES))
    p.add_argument("--weights", help="auto | none | path to a .pt/.pth/.safetensors state_dict")
    p.add_argument("--lr", type=float)
    p.add_argument("--head-lr-mult", type=float)
    p.add_argument("--no-param-groups", action="store_true", help="one group at --lr (the book's param_group=False)")
    p.add_argument("--freeze-backbone", action="store_true", help="train the new head only")
    p.add_argument("--loss-reduction", choices=LOSS_REDUCTIONS)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--warmup-epochs", type=int, help="head-only epochs on cached features before unfreezing")
    p.add_argument("--feature-views", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--device")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--seed", type=int)
    p.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR)
    p.add_argument("--name")
    p.add_argument("--json", action="store_true", help="print a final JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="classify images with a trained run or an exported bundle")
    p.add_argument("--run", required=True, help="a run folder, or a bundle folder or zip")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("runs", help="list the runs in a runs folder")
    p.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("export", help="write a bundle (safetensors + JSON + torch.export program) of a run")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="the device, threads, memory settings and offline backbones")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    from .memory import reexec_tuned

    reexec_tuned()  # before torch is imported: glibc reads its malloc settings at start only
    sys.exit(main())
