"""Recipes side by side, from the click to a finished run: test accuracy, wall time, images/s.

    python benchmarks/bench_recipes.py [--datasets seefood hymenoptera four] [--recipes fast fast-old ...]
                                       [--grid] [--out benchmarks/results/bench_recipes.md]

Each recipe runs as `python -m finetune_core train --data D --preset P [flags] --json` in a fresh
child process with an empty decode cache, one after another on the same machine, so the wall
time is what a user waits after pressing Train (interpreter start, scan, weights, decoding,
cached activations, training, evaluation). `four` is a 4-class set made of both shared sets
(hot_dog, not_hot_dog, ants, bees; linked, not copied). `--grid` adds the trainable depths
(head, 1, 2, 3; `--grid-stages` can add all) for every offline backbone at its native size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"

# name -> (preset, extra flags)
RECIPES: dict[str, tuple[str, list[str]]] = {
    "fast": ("fast", []),
    # The fast preset before partial fine-tuning: a linear probe on centre-crop features.
    "fast-old": ("fast", ["--backbone", "efficientnet_lite0", "--image-size", "224", "--train-stages", "head",
                          "--feature-views", "1", "--lr", "0.02", "--label-smoothing", "0", "--no-tta-flip"]),
    # The knobs matter: the same preset with the head at the pretrained layers' rate.
    "fast-head-x1": ("fast", ["--head-lr-mult", "1"]),
    # The preset's own backbone as a linear probe (head only, centre views): what the preset must not fall below.
    "fast-probe": ("fast", ["--train-stages", "head", "--feature-views", "1"]),
    # The book's recipe (ResNet-18's weights need a download here, so the offline Lite0).
    "book": ("book-finetune", ["--backbone", "efficientnet_lite0"]),
}
NATIVE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def four_class_set(folder: Path) -> Path:
    """seefood's two classes and hymenoptera's two as one 4-class set (symbolic links)."""
    root = folder / "four"
    for source in ("seefood", "hymenoptera"):
        for split in ("train", "test"):
            for cls in sorted((SHARED / source / split).iterdir()):
                dest = root / split / cls.name
                dest.mkdir(parents=True, exist_ok=True)
                for f in cls.iterdir():
                    (dest / f.name).symlink_to(f)
    return root


def run_recipe(data: Path, preset: str, flags: list[str], runs_dir: Path) -> dict:
    env = dict(os.environ, TUNEBOARD_CACHE=tempfile.mkdtemp(prefix="tb-cold-cache-"))
    t0, cpu0, load0 = time.perf_counter(), children_cpu_seconds(), os.getloadavg()[0]
    out = subprocess.run([sys.executable, "-m", "finetune_core", "train", "--data", str(data), "--preset", preset,
                          *flags, "--runs-dir", str(runs_dir), "--json", "--quiet"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu_seconds() - cpu0
    load = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
    subprocess.run(["rm", "-rf", env["TUNEBOARD_CACHE"]], check=False)
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"status": "error", "message": out.stderr.strip().splitlines()[-1:], "wall_s": wall, "cpu_s": cpu,
                "load": load}
    return {**result, "wall_s": wall, "cpu_s": cpu, "load": load}


def children_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes so far (a recipe's child, threads
    included): on a shared machine the wall time swells with the load, the CPU time much less."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["seefood", "hymenoptera", "four"])
    parser.add_argument("--recipes", nargs="+", default=["fast", "fast-old"], choices=list(RECIPES))
    parser.add_argument("--grid", action="store_true", help="also every depth for every offline backbone")
    parser.add_argument("--grid-backbones", nargs="+", default=list(NATIVE))
    parser.add_argument("--grid-stages", nargs="+", default=["head", "1", "2", "3"],
                        help="'all' trains every layer for the preset's 30 epochs: tens of minutes on a CPU")
    parser.add_argument("--seeds", nargs="+", type=int, default=[],
                        help="run each recipe once per seed (the run-to-run spread) and add a summary row")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    recipes = [(name, *RECIPES[name]) for name in args.recipes]
    if args.grid:
        for backbone in args.grid_backbones:
            for stages in args.grid_stages:
                recipes.append((f"{backbone} {stages}", "fast", ["--backbone", backbone, "--image-size",
                                                                   str(NATIVE[backbone]), "--train-stages", stages]))
    lines = ["| dataset | recipe | test acc (final) | best test acc | wall time from the click (s) | "
             "training images/s | CPU time (s) | load average (start-end) |", "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for name in args.datasets:
            data = four_class_set(scratch) if name == "four" else SHARED / name
            for label, preset, flags in recipes:
                finals, walls = [], []
                for seed in args.seeds or [None]:
                    seeded = flags + (["--seed", str(seed)] if seed is not None else [])
                    shown = label + (f" (seed {seed})" if seed is not None else "")
                    r = run_recipe(data, preset, seeded, scratch / "runs")
                    if r.get("status") != "completed":
                        line = (f"| {name} | {shown} | {r.get('status')}: {r.get('message')} | | {r['wall_s']:.0f} | | "
                                f"{r['cpu_s']:.0f} | {r['load']} |")
                    else:
                        finals.append(r["test_acc"])
                        walls.append(r["wall_s"])
                        line = (f"| {name} | {shown} | {r['test_acc']:.3f} | {r.get('best_test_acc', r['test_acc']):.3f} | "
                                f"{r['wall_s']:.0f} | {r['images_per_s']:.1f} | {r['cpu_s']:.0f} | {r['load']} |")
                    print(line, flush=True)
                    lines.append(line)
                if len(finals) > 1:
                    line = (f"| {name} | {label}: {len(finals)} seeds | mean {statistics.mean(finals):.3f}, "
                            f"{min(finals):.3f}-{max(finals):.3f} | | up to {max(walls):.0f} | | | |")
                    print(line, flush=True)
                    lines.append(line)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
