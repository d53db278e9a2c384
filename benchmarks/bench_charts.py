"""How fast the run curves draw in a real browser with many runs and many logged points.

Builds the Compare/Train overlay for RUNS runs of ROWS logged batches each (smoothing on, so
every run has a raw and a smoothed curve), then times in Debian's Chromium (headless, software
rendering, as the browser test runs it) the first draw (Plotly.newPlot), one hover in "x unified"
mode (every run's value at one x) and one zoom (relayout), for:

  - Tuneboard's figure: every trace thinned to plots.MAX_POINTS after smoothing, SVG (Scatter);
  - every point, SVG;
  - every point, WebGL (Scattergl).

Also the JSON the browser receives for each. No Streamlit, no training: plotly.js from the
installed plotly package, loaded from a local file.

    python benchmarks/bench_charts.py [--runs 6] [--rows 20000] [--out benchmarks/results/bench_charts.md]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune_core import plots  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

PAGE = """<!doctype html><html><head><meta charset="utf-8"><script src="{plotly_js}"></script></head>
<body><div id="g" style="width:1300px;height:360px"></div></body></html>"""

MEASURE = """async (spec) => {
  const gd = document.getElementById('g');
  const times = {};
  let t0 = performance.now();
  await Plotly.newPlot(gd, spec.data, spec.layout);
  times.draw_ms = performance.now() - t0;
  const hovers = [];
  for (let k = 1; k <= 10; k++) {
    await new Promise(r => setTimeout(r, 80));  // past plotly's hover throttle (50 ms)
    t0 = performance.now();
    Plotly.Fx.hover(gd, {xval: spec.xmax * k / 11}, 'xy');
    hovers.push(performance.now() - t0);
  }
  times.hover_items = gd.querySelectorAll('.hoverlayer .legend .traces').length;
  times.hover_ms = hovers;
  t0 = performance.now();
  await Plotly.relayout(gd, {'xaxis.range': [spec.xmax * 0.25, spec.xmax * 0.75]});
  times.zoom_ms = performance.now() - t0;
  Plotly.purge(gd);
  return times;
}"""


def fake_runs(n_runs: int, rows: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(0)
    epochs = 30
    runs = {}
    for k in range(n_runs):
        epoch = np.linspace(epochs / rows, epochs, rows)
        loss = np.exp(-epoch / 10) * (1 + 0.3 * rng.standard_normal(rows)) + 0.05
        acc = np.clip(1 - loss / 2 + 0.05 * rng.standard_normal(rows), 0, 1)
        frame = pd.DataFrame({"kind": "batch", "epoch": epoch, "step": np.arange(1, rows + 1), "loss": np.abs(loss),
                              "train_acc": acc, "test_acc": np.nan, "elapsed_s": epoch * 30})
        per_epoch = pd.DataFrame({"kind": "epoch", "epoch": np.arange(1, epochs + 1), "test_acc": np.linspace(0.6, 0.95,
                                                                                                              epochs)})
        runs[f"run {k}"] = pd.concat([frame, per_epoch], ignore_index=True)
    return runs


def variants(runs: dict[str, pd.DataFrame]) -> dict[str, tuple[dict, int]]:
    """{name: (figure as the browser gets it, points)} for the three ways of drawing the same curves."""
    thinned = plots.overlay_figure(runs, smoothing=0.9)
    saved = plots.MAX_POINTS
    plots.MAX_POINTS = 10 ** 9
    try:
        full = plots.overlay_figure(runs, smoothing=0.9)
    finally:
        plots.MAX_POINTS = saved
    gl = json.loads(full.to_json())
    for trace in gl["data"]:
        trace["type"] = "scattergl"

    def points(fig) -> int:
        return sum(len(t.x) for t in fig.data)

    return {f"Tuneboard: thinned to {saved} points a trace, SVG": (json.loads(thinned.to_json()), points(thinned)),
            "every point, SVG": (json.loads(full.to_json()), points(full)),
            "every point, WebGL (Scattergl)": (gl, points(full))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import plotly
    from playwright.sync_api import sync_playwright

    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    runs = fake_runs(args.runs, args.rows)
    start = time.perf_counter()
    figures = variants(runs)
    build_s = time.perf_counter() - start
    lines = [f"{args.runs} runs x {args.rows} logged batches, smoothing 0.9 (raw + smoothed curve per run), "
             f"3 panels; Chromium headless, software rendering; median of {args.repeats} draws.", "",
             "| drawing | points sent | JSON (MB) | first draw (ms) | hover, x unified (ms) | zoom (ms) |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        html = Path(tmp) / "bench.html"
        html.write_text(PAGE.format(plotly_js=plotly_js.as_uri()))
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, ignore_default_args=["--headless=old"])
        page = browser.new_page(viewport={"width": 1400, "height": 600})
        page.set_default_timeout(300_000)
        page.goto(html.as_uri())
        for name, (spec, points) in figures.items():
            spec["xmax"] = 30
            size_mb = len(json.dumps(spec)) / 1e6
            results = [page.evaluate(MEASURE, spec) for _ in range(args.repeats)]
            draw = statistics.median(r["draw_ms"] for r in results)
            hover = statistics.median(h for r in results for h in r["hover_ms"])
            zoom = statistics.median(r["zoom_ms"] for r in results)
            lines.append(f"| {name} | {points:,} | {size_mb:.2f} | {draw:.0f} | {hover:.0f} | {zoom:.0f} |")
            print(lines[-1], flush=True)
        browser.close()
    lines += ["", f"Building Tuneboard's figures in Python (smoothing every point, then thinning), all three: "
                  f"{build_s:.2f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(f"`python benchmarks/bench_charts.py --runs {args.runs} --rows {args.rows}`\n\n"
                                  + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
