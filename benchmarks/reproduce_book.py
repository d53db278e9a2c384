"""Reproduce the book's comparison: fine-tuning vs training from scratch, on real photos.

    python benchmarks/reproduce_book.py [--datasets seefood hymenoptera] [--backbone efficientnet_lite0]
                                        [--finetune-lr 5e-5 ...] [--out benchmarks/results/reproduce_book.md]

Runs Tuneboard's engine with the book's two presets (fine-tune: pretrained, head x10, lr 5e-5,
summed loss, 5 epochs; scratch: random init, one group, lr 5e-4) on each dataset, and writes a
Markdown table (loss, train and test accuracy, time, images/s) plus one JSON line per run.
Several --finetune-lr values make it a small learning-rate sweep.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune_core.config import preset_config  # noqa: E402
from finetune_core.engine import train  # noqa: E402
from finetune_core.models import device_description  # noqa: E402

DATASETS = ROOT.parent / "shared" / "datasets"


def run_one(data: Path, preset: str, backbone: str, lr: float | None, runs: Path, **extra) -> dict:
    overrides = {"data": str(data), "backbone": backbone, **extra}
    if lr is not None:
        overrides["lr"] = lr
    config = preset_config(preset, **overrides)
    t0 = time.perf_counter()
    status = train(config, runs / f"{data.name}-{preset}-{config.lr:g}")
    wall = time.perf_counter() - t0
    import pandas as pd

    m = pd.read_csv(runs / f"{data.name}-{preset}-{config.lr:g}" / "metrics.csv")
    epochs = m[m["kind"] == "epoch"]
    return {"dataset": data.name, "preset": preset, "backbone": backbone, "lr": config.lr,
            "state": status["state"], "loss": status.get("loss"), "train_acc": status.get("train_acc"),
            "test_acc": status.get("test_acc"), "best_test_acc": status.get("best_test_acc"),
            "test_acc_by_epoch": [round(v, 3) for v in epochs["test_acc"]],
            "wall_s": round(wall, 1), "images_per_s": status.get("images_per_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["seefood", "hymenoptera"])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--finetune-lr", type=float, nargs="+", default=[None])
    parser.add_argument("--no-scratch", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reproduce_book.md"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        for name in args.datasets:
            data = DATASETS / name
            if not data.is_dir():
                sys.exit(f"dataset {name} not found at {data}")
            for lr in args.finetune_lr:
                rows.append(run_one(data, "book-finetune", args.backbone, lr, runs))
                print(json.dumps(rows[-1]), flush=True)
            if not args.no_scratch:
                rows.append(run_one(data, "book-scratch", args.backbone, None, runs))
                print(json.dumps(rows[-1]), flush=True)

    lines = [f"Device: {device_description()}; backbone {args.backbone}; command: "
             f"`python benchmarks/reproduce_book.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             "| dataset | run | lr | loss | train acc | test acc | test acc by epoch | time (s) | train images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['preset']} | {r['lr']:g} | {r['loss']:.3f} | {r['train_acc']:.3f} | "
                     f"{r['test_acc']:.3f} | {', '.join(f'{v:.3f}' for v in r['test_acc_by_epoch'])} | "
                     f"{r['wall_s']:.0f} | {r['images_per_s']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
