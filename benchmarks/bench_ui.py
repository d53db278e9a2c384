"""How long the Train page's live refresh takes while a job is training.

    python benchmarks/bench_ui.py [--looks 20]

Starts a training job (random-init ResNet-18 on a generated dataset, long enough to outlast the
measurement) through the same job manager the page uses, then measures:
  - the live fragment's work as the page does it every second: the job list, every run's
    metrics.csv, the overlay figure serialised to JSON (what goes to the browser);
  - a whole rerun of the Train page through Streamlit's AppTest (everything on the page, the
    scan served from Streamlit's cache), an upper bound for the fragment's refresh.
Prints the median and 95th percentile of each in milliseconds, and a JSON line. Runs under the
malloc settings `serve.py` starts the dashboard with (one arena shared by the page and the job).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from finetune_core.memory import describe, tune_in_process  # noqa: E402

tune_in_process()  # as serve.py starts the dashboard


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--looks", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    os.environ.update(TUNEBOARD_DATA_ROOT=str(tmp / "data"), TUNEBOARD_RUNS_DIR=str(tmp / "runs"),
                      TUNEBOARD_CACHE=str(tmp / "cache"))
    os.chdir(ROOT)
    from conftest import make_dataset
    from streamlit.testing.v1 import AppTest

    from finetune_core import plots
    from finetune_core.config import TrainConfig
    from finetune_core.runs import RunDir
    from tuneboard_ui import _job_manager

    data = make_dataset(tmp / "data" / "shapes", per_class=200, test_per_class=20, size=(64, 64))
    at = AppTest.from_file(str(ROOT / "pages" / "1_Train.py"), default_timeout=120)
    at.run()  # creates the page's job manager (cached for the process)
    manager = _job_manager(os.environ["TUNEBOARD_RUNS_DIR"])
    run_id = manager.submit(TrainConfig(data=str(data), backbone="resnet18", weights="none", image_size=64,
                                        batch_size=4, epochs=50, lr=0.01, loss_reduction="mean", device="cpu"))
    while manager.job(run_id)["last_event"].get("kind") != "batch":
        time.sleep(0.2)
    time.sleep(3)

    fragment_ms, page_ms = [], []
    for _ in range(args.looks):
        t0 = time.perf_counter()
        jobs = manager.jobs()
        frames = {j["name"]: RunDir(j["path"]).read_metrics() for j in jobs}
        plots.overlay_figure(frames, epochs=50).to_json()
        fragment_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        at.run()
        page_ms.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.3)
    rows = len(RunDir(manager.job(run_id)["path"]).read_metrics())
    manager.stop(run_id)
    manager.wait(run_id, 60)
    result = {"metrics_rows": rows, "fragment_ms_median": statistics.median(fragment_ms),
              "fragment_ms_p95": percentile(fragment_ms, 0.95), "page_ms_median": statistics.median(page_ms),
              "page_ms_p95": percentile(page_ms, 0.95), "looks": args.looks, "memory": describe()}
    print(f"live fragment work: median {result['fragment_ms_median']:.0f} ms, p95 {result['fragment_ms_p95']:.0f} ms; "
          f"whole Train page rerun: median {result['page_ms_median']:.0f} ms, p95 {result['page_ms_p95']:.0f} ms "
          f"(with a job training on the same 2 cores, {rows} metric rows; {describe()})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
