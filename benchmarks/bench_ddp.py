"""One process against N processes (DistributedDataParallel through torchrun) on the same recipe.

    python benchmarks/bench_ddp.py [--data DIR] [--processes 2] [--recipes all fast] [--epochs 1] [--repeat 1]
                                   [--out benchmarks/results/bench_ddp.md]

Each run is `python -m finetune_core train ... --json` in a fresh process (one process), or the same
command under `python -m torch.distributed.run --standalone --nproc_per_node=N` (N processes),
one after another, with a decode cache warmed first so that decoding is not timed. On a CPU the N
processes share its cores: each gets cores / N OpenMP threads (one process gets them all), so this
measures what DDP costs, not a speed-up. On a machine with several GPUs it measures the speed-up.
Wall time is from the start of the command to its end (interpreters, torchrun's rendezvous, the
frozen layers' pass, training, evaluation); images/s is the run's own training throughput.
--repeat alternates the two (1, N, 1, N, ...) so that a machine whose load drifts treats both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"

# name -> (description, flags)
RECIPES: dict[str, tuple[str, list[str]]] = {
    "all": ("every layer (the book's loop), EfficientNet-Lite0 224 px, batch 32",
            ["--preset", "book-finetune", "--backbone", "efficientnet_lite0", "--batch-size", "32", "--lr", "1e-4"]),
    "fast": ("the `fast` preset (last stage + head on cached activations), Lite2 260 px",
             ["--preset", "fast"]),
}


def run(recipe: str, processes: int, data: str, epochs: int, runs_dir: str, cache: str, device: str,
        threads: int = 0) -> dict:
    flags = ["-m", "finetune_core", "train", "--data", data, "--epochs", str(epochs), "--device", device,
             "--runs-dir", runs_dir, "--json", "--quiet", *RECIPES[recipe][1]]
    cores = os.cpu_count() or 1
    env = {**os.environ, "TUNEBOARD_CACHE": cache, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": str(threads or max(1, cores // processes))}
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *flags]
    else:
        command = [sys.executable, *flags]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{recipe} x{processes} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    result = json.loads(lines[-1])
    return {"recipe": recipe, "processes": processes, "wall_s": wall, "images_per_s": result["images_per_s"],
            "test_acc": result["test_acc"], "threads": env["OMP_NUM_THREADS"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "hymenoptera"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--single-threads", type=int, default=0,
                        help="OpenMP threads of the one-process run (default: every core)")
    parser.add_argument("--repeat", type=int, default=1, help="alternate 1 and N processes this many times")
    parser.add_argument("--out", help="write the Markdown table here")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # other work on the machine: these figures are only as quiet as it
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        for recipe in args.recipes:
            run(recipe, 1, args.data, 1, str(Path(tmp) / "warm"), cache, args.device)  # decode once, untimed
            for processes in [1, args.processes] * args.repeat:
                rows.append(run(recipe, processes, args.data, args.epochs, str(Path(tmp) / "runs"), cache,
                                args.device, args.single_threads if processes == 1 else 0))
                print(rows[-1], flush=True)
    base: dict = {}
    for r in rows:  # the first one-process run of each recipe
        if r["processes"] == 1:
            base.setdefault(r["recipe"], r)
    lines = [f"`python benchmarks/bench_ddp.py --data {Path(args.data).name} --processes {args.processes} "
             f"--epochs {args.epochs} --repeat {args.repeat} --single-threads {args.single_threads}` on {os.cpu_count()} CPU cores, device {args.device}; "
             f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after", "",
             "| recipe | processes | threads each | wall time (s) | x the first one-process run | training images/s | "
             "test acc |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {RECIPES[r['recipe']][0]} | {r['processes']} | {r['threads']} | {r['wall_s']:.1f} | "
                     f"{base[r['recipe']]['wall_s'] / r['wall_s']:.2f}x | {r['images_per_s']:.1f} | "
                     f"{r['test_acc']:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
