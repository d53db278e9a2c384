"""Open tabs during a run: how much longer does a run take with the dashboard open in a browser,
and does the server's memory stay flat without Streamlit's post-script garbage collection?

    nice -n 10 python benchmarks/bench_tabs.py [--repeats 2] [--images 30]

What a user does, in real Chromium tabs driven by Playwright, against `python serve.py` started as
the README starts it (a free port, its own data, runs and cache folders; the machine's torch cache,
so the fast preset's pretrained backbone is offline as on a user's machine):
- one Train tab fills the form (the fast preset on --images generated photos, a run name) and
  presses Train;
- "no tab": that tab is closed at once; nothing is open while the run trains;
- "tabs": a Train tab on its Live view and a Home tab are open (and loaded) before the run starts,
  and the tab that pressed Train stays on Train -> Live.
The run's duration is its own (status.json: started to ended). Conditions alternate (no tab, tabs,
tabs, no tab, ...) after one warm-up run that is not counted, so that the load of a shared machine
falls on both. The server's resident memory (RSS) is sampled every 2 s throughout.

Writes a Markdown summary with the RSS series to benchmarks/results/bench_tabs.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_dataset  # noqa: E402
import test_e2e_browser  # noqa: E402
from test_e2e_browser import CHROMIUM, FLAGS, fill, free_port, wait_idle  # noqa: E402

from finetune_core.runs import list_runs  # noqa: E402

# The browser test's waits, with room for a loaded machine (the Train page's first visit writes the
# example dataset).
test_e2e_browser.IDLE_TIMEOUT_MS = 600_000


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def start_server(tmp: Path, data: Path) -> tuple[subprocess.Popen, str]:
    import urllib.request

    port = free_port()
    env = {**os.environ, "TUNEBOARD_DATA_ROOT": str(data), "TUNEBOARD_RUNS_DIR": str(tmp / "runs"),
           "TUNEBOARD_CACHE": str(tmp / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    log = open(tmp / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "serve.py", "--server.port", str(port), "--server.headless", "true"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit(f"the server did not start: {(tmp / 'streamlit.log').read_text()[-2000:]}")




def open_live(page, url: str) -> None:
    """A Train tab showing its Live view."""
    page.goto(f"{url}/Train")
    page.get_by_role("tab", name="Live").click()
    wait_idle(page)


def start_run(page, url: str, folder: Path, name: str) -> None:
    """The fast preset (the CPU's default) on `folder`, named `name`."""
    page.goto(f"{url}/Train")
    page.get_by_text("1 · Data").wait_for()
    page.get_by_role("tab", name="Setup").click()
    wait_idle(page)
    page.get_by_text("A folder path", exact=True).click()
    wait_idle(page)
    fill(page, "Folder", str(folder))
    page.get_by_text("Training images", exact=True).wait_for()
    fill(page, "Run name", name)
    page.get_by_role("button", name="Train", exact=True).click()
    page.locator("[role=tab][aria-selected=true]", has_text="Live").wait_for()


def wait_for_run(runs_dir: Path, name: str, timeout_s: float = 1800):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = next((i for i in list_runs(runs_dir) if i.name == name), None)
        if info is not None and info.state in ("completed", "failed", "stopped"):
            return info
        time.sleep(0.5)
    raise SystemExit(f"run {name} did not end in {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs per condition (after one warm-up run)")
    parser.add_argument("--images", type=int, default=30, help="training images (two classes)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_tabs.md"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tuneboard-tabs-"))
    data = tmp / "data"
    make_dataset(data / "shapes", classes=("red", "blue"), per_class=args.images // 2, test_per_class=5, size=(96, 96))
    server, url = start_server(tmp, data)
    samples: list[tuple[float, float, str]] = []  # (seconds since the start, server RSS MB, condition)
    condition = ["start"]
    done = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not done.is_set():
            samples.append((round(time.monotonic() - t0, 1), round(rss_mb(server.pid), 1), condition[0]))
            done.wait(2.0)

    threading.Thread(target=sample, daemon=True).start()
    order = ["warm-up"] + [c for k in range(args.repeats)
                           for c in (("no tab", "tabs") if k % 2 == 0 else ("tabs", "no tab"))]
    durations: dict[str, list[float]] = {"no tab": [], "tabs": []}
    from playwright.sync_api import sync_playwright

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, ignore_default_args=["--headless=old"])
            for k, cond in enumerate(order):
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                context.set_default_timeout(600_000)
                if cond == "tabs":  # open, and loaded, before the run starts: what is measured is their refreshes
                    open_live(context.new_page(), url)
                    home = context.new_page()
                    home.goto(url)
                    home.get_by_text("Recent runs").wait_for()
                driver = context.new_page()
                condition[0] = cond
                name = f"run{k}-{cond.replace(' ', '')}"
                start_run(driver, url, data / "shapes", name)
                if cond != "tabs":
                    driver.close()
                info = wait_for_run(tmp / "runs", name)
                context.close()
                condition[0] = "between"
                print(f"{cond:8s} {name}: {info.state} in {info.duration_s:.1f} s", flush=True)
                if cond in durations:
                    durations[cond].append(info.duration_s)
                time.sleep(2)
            browser.close()
    finally:
        done.set()
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    alone, tabbed = statistics.median(durations["no tab"]), statistics.median(durations["tabs"])
    rss = [mb for _, mb, c in samples if c not in ("start",)]
    result = {"no_tab_s": durations["no tab"], "tabs_s": durations["tabs"], "median_no_tab_s": round(alone, 1),
              "median_tabs_s": round(tabbed, 1), "slowdown": round(tabbed / alone - 1, 3),
              "rss_mb_first": rss[0], "rss_mb_last": rss[-1], "rss_mb_max": max(rss), "images": args.images,
              "load_average_at_end": os.getloadavg()}
    command = f"python benchmarks/bench_tabs.py {' '.join(sys.argv[1:])}".strip()
    lines = ["# Open tabs during a run: the fast preset, with no tab open and with Train -> Live in two tabs "
             "and Home in a third", "", f"`{command}`", "",
             "| condition | run durations (s) | median (s) |", "|---|---|---|",
             f"| no tab | {', '.join(f'{d:.1f}' for d in durations['no tab'])} | {alone:.1f} |",
             f"| Live x2 + Home | {', '.join(f'{d:.1f}' for d in durations['tabs'])} | {tabbed:.1f} |", "",
             f"Runs with the tabs open took {tabbed / alone - 1:+.1%} against no tab (medians). Server RSS "
             f"{rss[0]:.0f} MB at the first run, {rss[-1]:.0f} MB at the end, max {max(rss):.0f} MB.", "",
             "Server RSS every 2 s (seconds, MB, condition):", "", "```",
             *(f"{t:7.1f} {mb:8.1f} {c}" for t, mb, c in samples), "```", "", "```json", json.dumps(result), "```", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines[:10]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
