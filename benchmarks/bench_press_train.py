"""The first step from pressing Train on the Train page, on a folder the page has already scanned.

    python benchmarks/bench_press_train.py DATA [--steps 3] [--epochs 1] [--preset fast]

What the page does, in one process with an empty decode cache (TUNEBOARD_CACHE is set to a fresh
temporary folder): "Use this folder" (`scan_dataset` with the scan memory, timed apart), then Train
(`JobManager.submit(config, report)`: the page passes its scan to the run). Reports the seconds from
submit to the first training step logged (metrics.csv, polled every 0.1 s), this process's CPU seconds
over the same span, and the peak RSS; the run is then stopped after --steps steps, as the Stop button
does. The library is imported before the clock starts, as in the dashboard's server.
"""
from __future__ import annotations

import argparse
import importlib
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def steps_logged(run_path: Path) -> int:
    metrics = run_path / "metrics.csv"
    try:
        return sum(line.startswith("batch,") for line in metrics.read_text().splitlines())
    except OSError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--preset", default="fast")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tb-press-"))
    os.environ["TUNEBOARD_CACHE"] = str(scratch / "cache")

    importlib.import_module("finetune_core.engine")  # the server has imported the library before any click
    from finetune_core.cachestore import default_cache_dir
    from finetune_core.config import preset_config
    from finetune_core.data import scan_dataset
    from finetune_core.jobs import JobManager

    t0, c0 = time.perf_counter(), time.process_time()
    config = preset_config(args.preset, data=args.data, epochs=args.epochs)
    report = scan_dataset(args.data, test_fraction=config.test_fraction, scan_cache=default_cache_dir())
    scan_s, scan_cpu = time.perf_counter() - t0, time.process_time() - c0
    manager = JobManager(scratch / "runs")
    t0, c0 = time.perf_counter(), time.process_time()
    run_id = manager.submit(config, report)  # the click on Train
    run_path = scratch / "runs" / run_id
    first = first_cpu = None
    while True:
        steps = steps_logged(run_path)
        if steps and first is None:
            first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
        if steps >= args.steps:
            manager.stop(run_id)
            break
        job = manager.job(run_id)
        if job and job["state"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    final = manager.wait(run_id, timeout=600)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    files = report.samples["train"], report.samples["test"]
    print(f"| {len(files[0]):,} (+{len(files[1]):,}) | scan (Use this folder, cold): {scan_s:.0f} s, {scan_cpu:.0f} CPU s "
          f"| first step from pressing Train: {first if first is None else round(first, 1)} s, "
          f"{first_cpu if first_cpu is None else round(first_cpu, 1)} CPU s | peak RSS {peak:,.0f} MB "
          f"| run {final.get('state')} | load {os.getloadavg()[0]:.1f} |", flush=True)
    manager.shutdown()
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
