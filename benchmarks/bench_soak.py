"""Soak: page polls during a run. Does the server's memory stay flat, and how much do the polls
slow the run?

    python benchmarks/bench_soak.py [--minutes 10] [--sessions 4] [--quiet-minutes 1]

In one process, as in the dashboard's server: a JobManager trains a run (random-init ResNet-18
at 64 px on a generated dataset, long enough to outlast the measurement). First the run trains
alone for --quiet-minutes; then --sessions threads each do what a browser with every page open
does on the pages' own timers: each second the home page's live part (the active jobs) and the
Train page's live fragment (the group's jobs, each run's metrics.csv, its charts built and
serialised as st.plotly_chart does); every other second the Compare page's fragment (the runs
listed, their metrics.csv, their charts, the comparison table). The
process's resident memory (RSS) is sampled every 5 s. The run's speed is its own images/s
(metrics.csv) in the quiet phase against the polled one.

Writes a Markdown summary and the RSS series to benchmarks/results/bench_soak.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from finetune_core import memory  # noqa: E402

memory.tune_in_process()  # as serve.py starts the dashboard: before any thread


def rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def page_poll(manager, runs_dir: Path, compare: bool) -> None:
    """One second of a browser with every page open, as the pages' fragments do it."""
    from finetune_core import analysis, plots
    from finetune_core.runs import RunDir, list_runs

    manager.active()  # home: running and queued (its fragment, every second)
    jobs = manager.jobs()  # Train: the live fragment, every second
    group = analysis.current_group(jobs)
    members = [j for j in jobs if j["group"] == group]
    labels = analysis.job_labels(members)
    frames = {labels[j["run_id"]]: RunDir(j["path"]).read_metrics(max_age_s=1.0) for j in members}
    as_the_page_sends(plots.cached_panel_figures(frames, epochs=max(j["epochs"] for j in members)))
    if compare:  # Compare: its fragment, every other second
        infos = [i for i in list_runs(runs_dir) if not i.error]
        labels = analysis.run_labels(infos)
        frames = {labels[i.id]: RunDir(i.path).read_metrics(max_age_s=2.0) for i in infos}
        as_the_page_sends(plots.cached_panel_figures(frames, x="epoch"))
        analysis.compare_table(infos)


def as_the_page_sends(figures) -> None:
    """What st.plotly_chart does with each chart (tuneboard_ui.curve_panels: one per metric)."""
    import plotly

    for figure in figures:
        plotly.io.to_json(plotly.tools.return_figure_from_figure_or_data(figure, validate_figure=True),
                          validate=False)


def images_per_s(metrics, since_s: float, until_s: float) -> float:
    """The run's training speed between two moments (elapsed_s of its batch rows)."""
    batches = metrics[(metrics["kind"] == "batch") & metrics["elapsed_s"].between(since_s, until_s)]
    if len(batches) < 2:
        return float("nan")
    first, last = batches.iloc[0], batches.iloc[-1]
    steps = last["step"] - first["step"]
    return steps * BATCH / (last["elapsed_s"] - first["elapsed_s"])


BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="polled phase")
    parser.add_argument("--quiet-minutes", type=float, default=1.0, help="the run alone, first")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_soak.md"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tuneboard-soak-"))
    from conftest import make_dataset

    from finetune_core.config import TrainConfig
    from finetune_core.jobs import JobManager
    from finetune_core.runs import RunDir

    data = make_dataset(tmp / "data" / "shapes", per_class=200, test_per_class=20, size=(64, 64))
    manager = JobManager(tmp / "runs", cache_dir=str(tmp / "cache"))
    run_id = manager.submit(TrainConfig(data=str(data), backbone="resnet18", weights="none", image_size=64,
                                        batch_size=BATCH, epochs=1000, lr=0.01, loss_reduction="mean",
                                        device="cpu", name="soak"))
    run = RunDir(tmp / "runs" / run_id)
    while manager.job(run_id)["last_event"].get("kind") != "batch":
        time.sleep(0.2)
    samples: list[tuple[float, float, str]] = []  # (seconds since the start, RSS MB, phase)
    t0 = time.monotonic()
    phase = ["quiet"]
    stop_polls = threading.Event()
    poll_ms: list[float] = []
    errors: list[str] = []

    def session() -> None:
        second = 0
        while not stop_polls.is_set():
            started = time.perf_counter()
            second += 1
            try:
                page_poll(manager, tmp / "runs", compare=second % 2 == 0)
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                errors.append(f"{type(exc).__name__}: {exc}")
            poll_ms.append((time.perf_counter() - started) * 1000)
            stop_polls.wait(max(0.0, 1.0 - (time.perf_counter() - started)))

    def sample_until(seconds: float) -> None:
        while time.monotonic() - t0 < seconds:
            samples.append((round(time.monotonic() - t0, 1), round(rss_mb(), 1), phase[0]))
            time.sleep(5)

    quiet_end = args.quiet_minutes * 60
    elapsed_at = lambda: float(run.read_metrics()["elapsed_s"].max())  # noqa: E731 - the run's own clock
    quiet_from = elapsed_at()
    sample_until(quiet_end)
    quiet_to = elapsed_at()
    phase[0] = "polled"
    sessions = [threading.Thread(target=session, daemon=True) for _ in range(args.sessions)]
    for s in sessions:
        s.start()
    sample_until(quiet_end + args.minutes * 60)
    polled_to = elapsed_at()
    stop_polls.set()
    for s in sessions:
        s.join(10)
    manager.stop(run_id)
    manager.wait(run_id, 120)
    metrics = run.read_metrics()
    quiet_speed = images_per_s(metrics, quiet_from, quiet_to)
    polled_speed = images_per_s(metrics, quiet_to, polled_to)
    polled = [mb for _, mb, p in samples if p == "polled"]
    third = max(1, len(polled) // 3)
    result = {
        "quiet_images_per_s": round(quiet_speed, 2), "polled_images_per_s": round(polled_speed, 2),
        "slowdown": round(1 - polled_speed / quiet_speed, 3),
        "rss_mb_start_of_polls": polled[0], "rss_mb_end": polled[-1], "rss_mb_max": max(polled),
        "rss_mb_first_third_median": statistics.median(polled[:third]),
        "rss_mb_last_third_median": statistics.median(polled[-third:]),
        "polls": len(poll_ms), "poll_ms_median": round(statistics.median(poll_ms), 1),
        "poll_ms_p95": round(sorted(poll_ms)[int(0.95 * (len(poll_ms) - 1))], 1),
        "metric_rows_at_end": len(metrics), "sessions": args.sessions, "polled_minutes": args.minutes,
        "quiet_minutes": args.quiet_minutes, "errors": errors[:5], "memory": memory.describe(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    command = f"python benchmarks/bench_soak.py {' '.join(sys.argv[1:])}".strip()
    lines = [f"# Soak: {args.sessions} sessions polling every second during a run", "",
             f"`{command}`", "",
             "| phase | run images/s | server RSS (MB) |", "|---|---|---|",
             f"| run alone ({args.quiet_minutes:g} min) | {quiet_speed:.2f} | "
             f"{samples[0][1]:.0f} -> {[mb for _, mb, p in samples if p == 'quiet'][-1]:.0f} |",
             f"| {args.sessions} sessions polling ({args.minutes:g} min) | {polled_speed:.2f} | "
             f"{polled[0]:.0f} -> {polled[-1]:.0f} (max {max(polled):.0f}; median of the first third "
             f"{result['rss_mb_first_third_median']:.0f}, of the last {result['rss_mb_last_third_median']:.0f}) |",
             "", f"Slowdown of the run while polled: {result['slowdown']:.1%}. One second of polls (one session): median "
             f"{result['poll_ms_median']} ms, p95 {result['poll_ms_p95']} ms ({len(poll_ms)} polls, "
             f"{len(metrics)} metric rows at the end). Errors: {len(errors)}.", "",
             "RSS every 5 s (seconds, MB, phase):", "", "```",
             *(f"{t:7.1f} {mb:8.1f} {p}" for t, mb, p in samples), "```", "", "```json", json.dumps(result), "```", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines[:10]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
