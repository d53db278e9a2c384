"""Tuneboard's engine against the book's training loop, side by side, in one command run.

    python benchmarks/bench_train.py [--data ../shared/datasets/seefood] [--backbone efficientnet_lite0]
                                     [--target 0.85] [--epochs 5] [--runs book,engine,fast,...] [--out FILE]

Runs on the same data and device, one after the other, each in a fresh child process (glibc reads
its malloc settings only when a process starts, see finetune_core/memory.py):
  book            the book's loop exactly as GUIDE.md gives it, as a user runs it: torchvision
                  ImageFolder + DataLoader with the PIL transforms in the main process, fp32, two SGD
                  groups (head x10, lr 5e-5), summed loss, weight decay 1e-3, batch 128, test accuracy
                  after every epoch; glibc's default malloc settings;
  book-tuned      the same loop under Tuneboard's malloc settings (how much of the gap they explain);
  engine          Tuneboard's engine, identical recipe (same normalisation, fp32 on the CPU), started
                  as the dashboard and the command line start it (Tuneboard's malloc settings);
  engine-default  the same under glibc's defaults (as `streamlit run app.py` would run it);
  bf16            the identical recipe with bf16 autocast (where the hardware runs bf16 natively);
  fast            Tuneboard's "fast" preset.
Engine runs train in a worker thread, as the dashboard does. For each: training images/s (training
time only) and the wall time from the start (data and model loading included, no decode cache)
until test accuracy first reaches --target. Prints a table and a final JSON line; --out writes the
table as Markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from finetune_core import memory  # noqa: E402
from finetune_core.config import preset_config  # noqa: E402
from finetune_core.data import IMAGENET_MEAN, IMAGENET_STD, book_test_transform, book_train_transform  # noqa: E402
from finetune_core.engine import train  # noqa: E402
from finetune_core.models import build_model, device_description, get_head, resolve_device  # noqa: E402


def book_loop(data: Path, backbone: str, epochs: int, target: float, device: torch.device, lr=5e-5,
              batch_size=128, weights: str = "auto") -> dict:
    """d2l's train_fine_tuning / train_ch13, written out."""
    import torchvision

    t0 = time.perf_counter()
    train_ds = torchvision.datasets.ImageFolder(str(data / "train"), transform=book_train_transform(
        224, IMAGENET_MEAN, IMAGENET_STD))
    test_ds = torchvision.datasets.ImageFolder(str(data / "test"), transform=book_test_transform(
        224, IMAGENET_MEAN, IMAGENET_STD))
    train_iter = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, shuffle=True)
    test_iter = torch.utils.data.DataLoader(test_ds, batch_size=batch_size)
    torch.manual_seed(0)
    net = build_model(backbone, len(train_ds.classes), weights).to(device)  # new head, Xavier init
    head_ids = {id(p) for p in get_head(net, backbone).parameters()}
    params_1x = [p for p in net.parameters() if id(p) not in head_ids]
    trainer = torch.optim.SGD([{"params": params_1x},
                               {"params": get_head(net, backbone).parameters(), "lr": lr * 10}],
                              lr=lr, weight_decay=0.001)
    loss = nn.CrossEntropyLoss(reduction="none")
    train_seconds, train_images, reached, curve = 0.0, 0, None, []
    for epoch in range(epochs):
        net.train()
        t_epoch = time.perf_counter()
        for X, y in train_iter:
            X, y = X.to(device), y.to(device)
            trainer.zero_grad()
            l = loss(net(X), y)
            l.sum().backward()
            trainer.step()
            train_images += len(y)
        train_seconds += time.perf_counter() - t_epoch
        net.eval()
        correct = total = 0
        with torch.no_grad():
            for X, y in test_iter:
                X, y = X.to(device), y.to(device)
                correct += (net(X).argmax(1) == y).sum().item()
                total += len(y)
        acc = correct / total
        curve.append(round(acc, 3))
        if reached is None and acc >= target:
            reached = time.perf_counter() - t0
        print(f"  book loop epoch {epoch + 1}: test acc {acc:.3f}, {train_images / train_seconds:.2f} img/s, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return {"images_per_s": train_images / train_seconds, "time_to_target_s": reached, "test_acc_by_epoch": curve,
            "wall_s": time.perf_counter() - t0}


def engine_run(config, target: float, runs: Path, label: str) -> dict:
    t0 = time.perf_counter()
    status = train(config, runs / label, cache_dir="")
    wall = time.perf_counter() - t0
    import pandas as pd

    m = pd.read_csv(runs / label / "metrics.csv")
    epochs = m[m["kind"] == "epoch"]
    # elapsed_s counts from the start of train() (scan, weights and decoding included)
    hit = epochs[epochs["test_acc"] >= target]
    # A frozen backbone's epochs train the head on cached features: their images/s do not compare.
    result = {"images_per_s": None if config.freeze_backbone else status.get("images_per_s"),
              "state": status["state"],
              "time_to_target_s": float(hit["elapsed_s"].iloc[0]) if len(hit) else None,
              "test_acc_by_epoch": [round(v, 3) for v in epochs["test_acc"]], "wall_s": wall}
    print(f"  {label}: {result}", flush=True)
    return result


RUNS = {  # name: (label, allocator)
    "book": ("book loop", "default"),
    "book-tuned": ("book loop, Tuneboard's malloc settings", "tuned"),
    "engine": ("engine, identical recipe", "tuned"),
    "engine-default": ("engine, identical recipe, glibc defaults", "default"),
    "bf16": ("engine, identical recipe, bf16", "tuned"),
    "fast": ("engine, fast preset", "tuned"),
}


def run_one(name: str, args) -> dict:
    """One measured run, in this process (which the parent started with the run's allocator)."""
    data, device = Path(args.data), resolve_device(args.device)
    common = dict(data=str(data), backbone=args.backbone, device=args.device, weights=args.weights)
    if name.startswith("book"):
        return book_loop(data, args.backbone, args.epochs, args.target, device, weights=args.weights)
    if name == "fast":
        config = preset_config("fast", **common)
    else:
        config = preset_config("book-finetune", epochs=args.epochs, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                               precision="bf16" if name == "bf16" else "auto", **common)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        # In a worker thread, as the dashboard trains (glibc treats the main thread's memory differently).
        worker = threading.Thread(target=lambda: result.update(engine_run(config, args.target, Path(tmp), name)))
        worker.start()
        worker.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "seefood"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--weights", default="auto", help="auto, none (random init: for throughput where the "
                        "backbone's weights are not on the machine) or a file")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from: {', '.join(RUNS)}")
    parser.add_argument("--out", help="write the Markdown table here")
    parser.add_argument("--one", choices=list(RUNS), help=argparse.SUPPRESS)  # a child process: one run
    args = parser.parse_args()
    if args.one:
        result = run_one(args.one, args)
        result["peak_memory_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
        print("RESULT " + json.dumps(result), flush=True)
        return
    data, device = Path(args.data), resolve_device(args.device)
    names = [n for n in filter(None, args.runs.split(",")) if n in RUNS or parser.error(f"unknown run {n!r}")]
    print(f"{device_description(device)}; {data.name}; {args.backbone}; target {args.target}", flush=True)

    results = {}
    for name in names:
        label, allocator = RUNS[name]
        env = memory.untuned_environ()
        env = memory.tuned_environ(env) if allocator == "tuned" and memory.supported() else env
        child = [sys.executable, __file__, "--one", name, "--data", str(data), "--backbone", args.backbone,
                 "--target", str(args.target), "--epochs", str(args.epochs), "--device", args.device,
                 "--weights", args.weights]
        print(f"{label} ({allocator} malloc settings)", flush=True)
        proc = subprocess.run(child, env=env, stdout=subprocess.PIPE, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("RESULT ")), flush=True)
        if proc.returncode or not lines:
            raise SystemExit(f"{label}: the run failed (exit {proc.returncode})")
        results[label] = {"allocator": allocator if memory.supported() else "system", **json.loads(lines[-1][7:])}

    book = results.get(RUNS["book"][0], {})
    lines = [f"{device_description(device)}, {data.name}, {args.backbone}, target test acc {args.target}: "
             f"`python benchmarks/bench_train.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             "| run | malloc settings | train images/s | x book | time to target (s) | x sooner than book | "
             "test acc by epoch | peak memory (GB) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ratio = r["images_per_s"] / book["images_per_s"] if book and r.get("images_per_s") else None
        sooner = (book["time_to_target_s"] / r["time_to_target_s"]
                  if book.get("time_to_target_s") and r.get("time_to_target_s") else None)
        r["ratio_images_per_s"], r["ratio_time_to_target"] = ratio, sooner
        ttt = f"{r['time_to_target_s']:.0f}" if r.get("time_to_target_s") else f"not reached ({r['wall_s']:.0f} s run)"
        ips = f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "head only"
        lines.append(f"| {name} | {r['allocator']} | {ips} | {ratio and f'{ratio:.1f}x' or '-'} | {ttt} | "
                     f"{sooner and f'{sooner:.1f}x' or '-'} | {', '.join(map(str, r['test_acc_by_epoch']))} | "
                     f"{r['peak_memory_gb']} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    print(json.dumps({"device": device_description(device), "data": data.name, "backbone": args.backbone,
                      "target": args.target, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "results": results}))


if __name__ == "__main__":
    main()
