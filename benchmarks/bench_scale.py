"""How the costs grow with the set: time to the first step, total time, peak memory, cache on disk.

    python benchmarks/bench_scale.py [--sizes 1000 8000] [--presets fast book] [--epochs 1]
                                     [--book-up-to 1000] [--out benchmarks/results/bench_scale.md]
                                     [--data-dir DIR] [--photo-size 500x375] [--stop-after-steps N]

For each size it generates a 10-class folder of synthetic 500 x 375 JPEGs (smooth random pictures,
about the size of a photo of that resolution; 1 test image per 8 training ones), then runs each preset
as `python -m finetune_core train ... --json` in a fresh child process with an empty decode cache (a cold
start, as after a click on Train), and reports: the time from the run's start to its first training
step (metrics.csv), the child's whole wall time, its peak resident memory (wait4's ru_maxrss: that
process only), its CPU time (user + system, wait4's: on a shared machine the figure to compare, where
wall time follows the other work), the cache on disk afterwards against the photos, and the training images/s. `book` is
the book's recipe on EfficientNet-Lite0 (ResNet-18's weights need a download here); it runs only up to
--book-up-to images. Accuracy on random pictures means nothing and is not reported. `--data-dir` keeps
the generated sets there (DIR/<size>-<photo size>) and reuses them, since generating 50,000 photos takes
longer than a run's start; `--photo-size` makes smaller photos where generating full-size ones does not fit
the time. "First step from the click" is from the child's start (interpreter, scan, weights, setup) to the
first training step logged, polled every half second.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune_core.cachestore import cache_size  # noqa: E402

PRESETS = {"fast": ("fast", []), "book": ("book-finetune", ["--backbone", "efficientnet_lite0"])}
CLASSES = 10


def synthetic_photo(task: tuple[Path, str, int, int, tuple[int, int]]) -> int:
    """One JPEG (500 x 375 by default): a smooth random picture with a class tint and some grain;
    returns its bytes."""
    root, split, i, seed, (width, height) = task
    path = root / split / f"class_{i % CLASSES}" / f"{split}_{i}.jpg"
    if path.exists():  # made by a generation that was stopped: kept
        return path.stat().st_size
    rng = np.random.default_rng((seed, split == "test", i))
    k = i % CLASSES
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    coarse[..., k % 3] = coarse[..., k % 3] // 2 + 100  # a class tint
    picture = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    noise = rng.integers(-12, 13, (height, width, 3))
    picture = Image.fromarray(np.clip(np.asarray(picture, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    path = root / split / f"class_{k}" / f"{split}_{i}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # a generation stopped halfway leaves no torn photo
    picture.save(tmp, format="JPEG", quality=85)
    tmp.replace(path)
    return path.stat().st_size


def generate(root: Path, n_train: int, seed: int = 0, photo_size: tuple[int, int] = (500, 375)) -> int:
    """A 10-class folder of n_train training and n_train / 8 test JPEGs (every core generating);
    returns its bytes. A folder already complete (kept by --data-dir) is reused as it is."""
    from concurrent.futures import ProcessPoolExecutor

    done = root / ".complete"
    if done.exists():
        return int(done.read_text())
    tasks = [(root, split, i, seed, photo_size) for split, n in (("train", n_train), ("test", max(CLASSES * 2, n_train // 8)))
             for i in range(n)]
    with ProcessPoolExecutor() as pool:
        photos = sum(pool.map(synthetic_photo, tasks, chunksize=64))
    done.write_text(str(photos))  # a hidden file: the scan skips it (and says so)
    return photos


def code_name(code: str) -> str:
    """A checkout by its commit (and `+` when it has uncommitted changes), or its folder's name."""
    try:
        commit = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", code, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return Path(code).name


def batch_rows(runs: Path) -> int:
    """Training steps the run in `runs` has logged so far."""
    metrics = next(runs.glob("*/metrics.csv"), None)
    try:
        return sum(',batch,' in f",{line}" for line in metrics.read_text().splitlines()) if metrics else 0
    except OSError:
        return 0


def wait_for(child: subprocess.Popen, runs: Path, stop_after_steps: int, t0: float):
    """(wait4 on the child, seconds from t0 to its first logged step or None); with stop_after_steps,
    first send it Ctrl-C (a stop: the run is marked stopped) once it has logged that many steps, for
    the cost of a start on a set too large to train here in full."""
    first_step = None
    while True:
        ended = os.wait4(child.pid, os.WNOHANG)  # not child.poll(): it would reap the child, and its usage with it
        if ended[0]:
            return ended, first_step
        steps = batch_rows(runs)
        if steps and first_step is None:
            first_step = time.perf_counter() - t0
        if stop_after_steps and steps >= stop_after_steps:
            child.send_signal(signal.SIGINT)
            return os.wait4(child.pid, 0), first_step
        time.sleep(0.5)


def default_sigint() -> None:
    """In the child, Ctrl-C's default action: a shell starts background jobs with SIGINT ignored, and
    Python then never turns it into KeyboardInterrupt, so --stop-after-steps' Ctrl-C did nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_preset(data: Path, preset: str, flags: list[str], epochs: int, scratch: Path, code: Path = ROOT,
               stop_after_steps: int = 0) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix=f"{preset}-", dir=scratch))  # each run its own empty cache
    cache = scratch / f"cache-{preset}"
    runs = scratch / f"runs-{preset}"
    env = dict(os.environ, TUNEBOARD_CACHE=str(cache))
    command = [sys.executable, "-m", "finetune_core", "train", "--data", str(data), "--preset", preset, *flags,
               "--epochs", str(epochs), "--runs-dir", str(runs), "--json", "--quiet"]
    t0 = time.perf_counter()
    with open(scratch / f"{preset}.out", "w") as out_file, open(scratch / f"{preset}.err", "w") as err_file:
        child = subprocess.Popen(command, cwd=code, env=env, stdout=out_file, stderr=err_file,
                                 preexec_fn=default_sigint)
        (_, code, usage), first_from_click = wait_for(child, runs, stop_after_steps, t0)  # this child's own peak memory
    child.returncode = os.waitstatus_to_exitcode(code)
    wall = time.perf_counter() - t0
    out, err = (scratch / f"{preset}.out").read_text(), (scratch / f"{preset}.err").read_text()
    status = {}
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            status = json.loads(line)
            break
    metrics = next(runs.glob("*/metrics.csv"), None)
    first_step = None
    if metrics is not None:
        import pandas as pd

        frame = pd.read_csv(metrics)
        batches = frame[frame["kind"] == "batch"]
        first_step = float(batches["elapsed_s"].iloc[0]) if len(batches) else None
    return {"state": status.get("status") or f"exit {child.returncode}: {err.strip().splitlines()[-1:]}",
            "first_step_s": first_step, "first_from_click_s": first_from_click, "wall_s": wall, "images_per_s": status.get("images_per_s"),
            "peak_rss_mb": peak_rss_mb(usage), "cpu_s": usage.ru_utime + usage.ru_stime,
            "cache_mb": cache_size(cache) / 1024**2,
            "activations_mb": sum(f.stat().st_size for f in (cache / "activations").glob("*.npy")) / 1024**2}


def peak_rss_mb(usage) -> float:
    """ru_maxrss of the child just waited for (kilobytes on Linux)."""
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000])
    parser.add_argument("--presets", nargs="+", default=["fast", "book"], choices=sorted(PRESETS))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--book-up-to", type=int, default=1000)
    parser.add_argument("--device", default="", help="the runs' device (default: the presets' auto)")
    parser.add_argument("--code", nargs="+", default=[str(ROOT)], help="the checkouts whose finetune_core runs, "
                        "one after the other on the same generated set (e.g. an older commit's, for a before/after table)")
    parser.add_argument("--stop-after-steps", type=int, default=0, help="stop each run (Ctrl-C) once it has made this "
                        "many training steps: the time to the first step, memory and cache of a start on a large set")
    parser.add_argument("--data-dir", default="", help="keep the generated sets here and reuse them")
    parser.add_argument("--photo-size", default="500x375", help="the generated photos' width x height")
    parser.add_argument("--out", default="benchmarks/results/bench_scale.md")
    args = parser.parse_args()
    photo_size = tuple(int(v) for v in args.photo_size.lower().split("x"))
    lines = ["| training images | photos on disk | code | preset | first step (s from the run's start) | first step (s "
             "from the click) | total (s, click to done) | CPU time (s) | peak RSS | cache on disk (of which activations) "
             "| training images/s | load average |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="tb-scale-") as scratch:
            scratch = Path(scratch)
            data = (Path(args.data_dir) if args.data_dir else scratch) / f"{size}-{args.photo_size}"
            photos = generate(data, size, photo_size=photo_size)
            for name, code in [(name, code) for name in args.presets for code in args.code]:
                if name == "book" and size > args.book_up_to:
                    continue
                preset, flags = PRESETS[name]
                flags = flags + (["--device", args.device] if args.device else [])
                load = os.getloadavg()[0]
                r = run_preset(data, preset, flags, args.epochs, scratch, Path(code), args.stop_after_steps)
                first, clicked = ("-" if r[k] is None else f"{r[k]:.0f}" for k in ("first_step_s", "first_from_click_s"))
                lines.append(f"| {size:,} | {photos / 1024**2:.0f} MB ({args.photo_size}) | {code_name(code)} | {name} "
                             f"({r['state']}) | {first} | {clicked} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_mb']:,.0f} MB | "
                             f"{r['cache_mb']:.0f} MB ({r['activations_mb']:.0f} MB) | "
                             f"{r['images_per_s'] or 0:.1f} | {load:.1f}-{os.getloadavg()[0]:.1f} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(f"`python benchmarks/bench_scale.py {' '.join(sys.argv[1:])}`\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
