"""The run curves: one colour per run everywhere, the unified hover, smoothing, log-scale loss,
the x axes, many points, and a palette that reads on the light and the dark theme."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import tomllib

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from finetune_core import plots
from finetune_core.runs import METRIC_COLUMNS


def logged(rows: list[dict]) -> pd.DataFrame:
    """metrics.csv as a run writes it, read back."""
    return pd.read_csv(io.StringIO(pd.DataFrame(rows, columns=METRIC_COLUMNS).to_csv(index=False)))


def book_run(n_batches: int = 8, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    per_epoch = n_batches // 2
    rows = [{"kind": "batch", "epoch": (b + 1) / per_epoch, "step": b + 1, "loss": 1.0 + rng.random(),
             "train_acc": 0.5 + rng.random() / 4, "elapsed_s": 0.5 * (b + 1)} for b in range(n_batches)]
    rows += [{"kind": "epoch", "epoch": e, "step": e * per_epoch, "loss": 1.2, "train_acc": 0.6, "test_loss": 0.9,
              "test_acc": 0.6 + e / 10, "elapsed_s": 0.5 * e * per_epoch + 0.1} for e in (1, 2)]
    return logged(rows)


def traces_of(fig, name: str, axis: str = "x") -> list:
    return [t for t in fig.data if t.name == name and t.xaxis == axis]


# --- colours ---------------------------------------------------------------------------------


def test_a_run_keeps_its_colour_whatever_it_is_drawn_with():
    ids = ["20261129-101500-fine", "20261129-101500-fine-scratch", "20261129-101501-fine-one-group"]
    together = plots.run_colors(ids)
    assert plots.run_colors(list(reversed(ids))) == together  # the order they are listed in does not matter
    alone = {i: plots.run_colors([i])[i] for i in ids}
    assert alone == together == {i: plots.run_color(i) for i in ids}  # in company as alone


def test_runs_drawn_together_look_distinct_and_colours_are_stable_across_processes():
    ids = [f"20261129-1000{k:02d}-run" for k in range(len(plots.PALETTE))]
    colors, dashes = plots.run_colors(ids), plots.run_dashes(ids)
    assert len({(colors[i], dashes[i]) for i in ids}) == len(ids)  # a shared colour, another dash
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from finetune_core import plots; "
            "print(plots.run_color('20261129-101500-fine'))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}  # Python's own hash() would change with it
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == plots.run_color("20261129-101500-fine")


def test_the_figure_draws_each_run_in_the_colour_it_is_given_in_every_panel():
    colors = {"fine": plots.PALETTE[3], "scratch": plots.PALETTE[7]}
    fig = plots.overlay_figure({"fine": book_run(), "scratch": book_run(seed=1)}, colors=colors)
    for name, color in colors.items():
        assert {t.line.color for t in fig.data if t.name == name} == {color}


def test_panels_drawn_apart_keep_one_metric_each_and_the_runs_colours():
    colors = {"fine": plots.PALETTE[3], "scratch": plots.PALETTE[7]}
    runs = {"fine": book_run(), "scratch": book_run(seed=1)}
    figures = plots.panel_figures(runs, colors=colors, x="step", log_loss=True)
    together = plots.overlay_figure(runs, colors=colors, x="step", log_loss=True)
    assert len(figures) == 3
    assert [len(f.data) for f in figures] == [len([t for t in together.data if t.xaxis == axis])
                                              for axis in ("x", "x2", "x3")]
    assert all({t.xaxis or "x" for t in f.data} == {"x"} for f in figures)  # one panel each (x: the default)
    assert figures[0].layout.yaxis.type == "log" and figures[1].layout.yaxis.range == (0, 1.02)
    for f in figures:
        for name, color in colors.items():
            assert {t.line.color for t in f.data if t.name == name} == {color}


def contrast(a: str, b: str) -> float:
    def luminance(hex_color: str) -> float:
        h = hex_color.lstrip("#")
        channels = [int(h[i:i + 2], 16) / 255 for i in (0, 2, 4)]
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted([luminance(a), luminance(b)], reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_the_palette_reads_on_the_light_and_the_dark_theme():
    for color in plots.PALETTE:
        for theme, background in plots.THEME_BACKGROUNDS.items():
            assert contrast(color, background) >= 3.0, f"{color} on the {theme} theme"


def test_the_page_follows_the_browsers_light_or_dark_setting_with_the_same_palette():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    theme = config["theme"]
    assert "base" not in theme  # a base would pin one theme whatever the browser prefers
    for variant in ("light", "dark"):
        assert theme[variant]["chartCategoricalColors"] == plots.PALETTE
        assert contrast(theme[variant]["primaryColor"], plots.THEME_BACKGROUNDS[variant]) >= 3.0


# --- hover, smoothing, scales, axes ------------------------------------------------------------


def test_the_hover_lists_every_runs_value_at_that_x_rounded():
    fig = plots.overlay_figure({"fine": book_run(), "scratch": book_run(seed=1)})
    assert fig.layout.hovermode == "x unified"
    loss, acc = traces_of(fig, "fine", "x")[0], traces_of(fig, "fine", "x3")[0]
    assert "%{y:.4g}" in loss.hovertemplate and "%{y:.3f}" in acc.hovertemplate
    assert fig.layout.xaxis.hoverformat == ".2f"
    box = fig.layout.hoverlabel  # its own colours: the light theme's hover text is a pale grey on white
    assert contrast(box.font.color, box.bgcolor) >= 4.5


def test_smoothing_is_tensorboards_debiased_moving_average():
    values = np.array([1.0, 2.0, 3.0, np.nan, 4.0])
    assert plots.smooth(values, 0.0)[:3].tolist() == [1.0, 2.0, 3.0]
    smoothed = plots.smooth(values, 0.6)
    assert smoothed[0] == 1.0  # debiased: the first point is not pulled towards zero
    assert smoothed[1] == pytest.approx((0.6 * 0.4 * 1 + 0.4 * 2) / (1 - 0.6 ** 2))
    assert np.isnan(smoothed[3]) and smoothed[4] == pytest.approx(
        (0.6 * (0.6 * 0.4 * 1 + 0.4 * 2) * 0.6 + 0.6 * 0.4 * 3 + 0.4 * 4) / (1 - 0.6 ** 4))
    assert plots.smooth(np.full(50, 0.7), 0.9) == pytest.approx(np.full(50, 0.7))
    noisy = np.random.default_rng(0).normal(1.0, 0.3, 500)
    assert plots.smooth(noisy, 0.9).std() < noisy.std() / 2
    with pytest.raises(ValueError, match="smoothing"):
        plots.smooth(values, 1.0)


def test_a_smoothed_curve_is_drawn_over_its_raw_curve_faint_behind():
    run = book_run()
    fig = plots.overlay_figure({"fine": run}, smoothing=0.8)
    raw, smoothed = traces_of(fig, "fine", "x")
    batches = run[run["kind"] == "batch"]
    assert list(raw.y) == pytest.approx(batches["loss"].tolist())
    assert list(smoothed.y) == pytest.approx(plots.smooth(batches["loss"], 0.8).tolist())
    assert list(smoothed.customdata) == pytest.approx(batches["loss"].tolist())  # the hover shows the raw value
    assert raw.hoverinfo == "skip" and not raw.showlegend and raw.line.color.startswith("rgba(")
    assert "raw %{customdata" in smoothed.hovertemplate
    assert len(fig.data) == 2 * len(plots.overlay_figure({"fine": run}).data)


def test_loss_on_a_log_scale_and_the_step_and_wall_time_axes():
    run = book_run()
    fig = plots.overlay_figure({"fine": run}, log_loss=True)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis3.type != "log"
    by_step = plots.overlay_figure({"fine": run}, x="step")
    assert list(traces_of(by_step, "fine", "x")[0].x) == list(range(1, 9))
    assert list(traces_of(by_step, "fine", "x3")[0].x) == [4, 8]
    assert by_step.layout.xaxis.title.text == "step (batches)"
    by_time = plots.overlay_figure({"fine": run}, x="elapsed_s")
    assert by_time.layout.xaxis.title.text == "wall time (s)"
    assert list(traces_of(by_time, "fine", "x3")[0].x) == [2.1, 4.1]


def test_several_long_runs_stay_light_to_draw():
    """Six runs of 20,000 logged batches each, smoothed: every trace thinned to MAX_POINTS after
    smoothing over every point, so the browser gets about 22k points instead of 720k."""
    n = 20_000
    rng = np.random.default_rng(0)
    runs = {f"run {k}": pd.DataFrame({"kind": "batch", "epoch": np.linspace(0.001, 30, n), "step": np.arange(1, n + 1),
                                      "loss": rng.random(n), "train_acc": rng.random(n), "test_acc": np.nan,
                                      "elapsed_s": np.linspace(0, 900, n)}) for k in range(6)}
    start = time.perf_counter()
    fig = plots.overlay_figure(runs, smoothing=0.9)
    size = len(fig.to_json())
    elapsed = time.perf_counter() - start
    points = sum(len(t.x) for t in fig.data)
    assert max(len(t.x) for t in fig.data) <= plots.MAX_POINTS + 1
    assert points <= 6 * 2 * 2 * (plots.MAX_POINTS + 1)  # two training panels, raw and smoothed
    assert fig.data[1].x[-1] == pytest.approx(30.0)  # the newest point is always drawn
    print(f"6 runs x {n} rows, smoothed: {points} points, {size / 1e6:.2f} MB of JSON, {elapsed:.2f} s")


def test_metrics_are_parsed_once_while_the_file_is_unchanged_and_read_anew_when_it_changes(tmp_path, monkeypatch):
    import shutil

    from finetune_core import runs as runs_module
    from finetune_core.runs import RunDir

    parses = []
    real_parse = RunDir._parse_metrics
    monkeypatch.setattr(RunDir, "_parse_metrics", staticmethod(lambda path: parses.append(path) or real_parse(path)))
    monkeypatch.setattr(runs_module, "RACY_S", 0.2)  # a file left alone this long is trusted by its identity
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.append_metrics({"kind": "batch", "epoch": 0.5, "step": 1, "loss": 0.7})
    time.sleep(0.3)
    first = run.read_metrics()
    first["mine"] = 1  # a reader's own column stays in its copy
    again = run.read_metrics()
    assert len(parses) == 1 and "mine" not in again and len(again) == 1  # one parse for both readers
    run.append_metrics({"kind": "batch", "epoch": 1.0, "step": 2, "loss": 0.6})
    assert len(run.read_metrics(max_age_s=60)) == 1  # a live view may take the frame read just now...
    assert len(run.read_metrics()) == 2  # ...any other reader sees the new row
    # Replaced by a file of the same size and modification time (cp -p): a new inode, read anew.
    copy = tmp_path / "other.csv"
    shutil.copy2(run.file("metrics.csv"), copy)
    text = copy.read_text().replace("0.6", "0.5")
    stat = copy.stat()
    copy.write_text(text)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    old = run.file("metrics.csv").stat()
    os.utime(copy, ns=(old.st_atime_ns, old.st_mtime_ns))
    time.sleep(0.3)
    run.read_metrics()
    os.replace(copy, run.file("metrics.csv"))
    assert run.read_metrics()["loss"].tolist() == [0.7, 0.5]


def test_the_charts_of_unchanged_curves_are_built_once_for_every_session(tmp_path):
    from finetune_core.runs import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    for step in range(1, 4):
        run.append_metrics({"kind": "batch", "epoch": step / 4, "step": step, "loss": 1 / step, "train_acc": 0.5})
    one = plots.cached_panel_figures({"a": run.read_metrics()}, x="step", colors={"a": "#123456"})
    two = plots.cached_panel_figures({"a": run.read_metrics()}, x="step", colors={"a": "#123456"})
    assert all(f is g for f, g in zip(one, two))  # a second session draws the same figures
    other = plots.cached_panel_figures({"a": run.read_metrics()}, x="epoch", colors={"a": "#123456"})
    assert other[0] is not one[0] and other[0].data[0].x.tolist() == [0.25, 0.5, 0.75]  # other options: built
    run.append_metrics({"kind": "batch", "epoch": 1.0, "step": 4, "loss": 0.2, "train_acc": 0.6})
    grown = plots.cached_panel_figures({"a": run.read_metrics()}, x="step", colors={"a": "#123456"})
    assert grown[0] is not one[0] and grown[0].data[0].x.tolist() == [1, 2, 3, 4]  # new points: built anew
    cut = run.read_metrics().iloc[:2]  # a frame cut from a run's metrics is other curves
    assert plots.cached_panel_figures({"a": cut}, x="step", colors={"a": "#123456"})[0].data[0].x.tolist() == [1, 2]
    frame = run.read_metrics()
    changed = frame.assign(loss=frame["loss"] * 100)  # the same shape and source, other values
    drawn = plots.cached_panel_figures({"a": changed}, x="step", colors={"a": "#123456"})
    assert drawn[0] is not grown[0] and drawn[0].data[0].y.tolist()[-1] == pytest.approx(20.0)
    plain = logged([{"kind": "batch", "epoch": 0.5, "step": 1, "loss": 0.5}])  # not read from a run folder
    assert plots.cached_panel_figures({"a": plain})[0] is plots.cached_panel_figures({"a": plain.copy()})[0]


def test_sessions_asking_at_once_for_new_curves_wait_for_one_build_and_a_failed_build_frees_them(monkeypatch):
    import threading

    builds, gate = [], threading.Event()
    real = plots.panel_figures

    def slow(runs, **kwargs):
        builds.append(1)
        gate.wait(5)
        if kwargs.get("x") == "epoch":
            raise RuntimeError("build failed")
        return real(runs, **kwargs)

    monkeypatch.setattr(plots, "panel_figures", slow)
    frame = logged([{"kind": "batch", "epoch": 0.5, "step": 1, "loss": 0.5},
                    {"kind": "batch", "epoch": 1.0, "step": 2, "loss": 0.4}])
    got, failed = [], []

    def session(x):
        try:
            got.append(plots.cached_panel_figures({"a": frame.copy()}, x=x))
        except RuntimeError:
            failed.append(x)

    threads = [threading.Thread(target=session, args=("step",)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # all four are in: one builds, three wait
    gate.set()
    for t in threads:
        t.join(10)
    assert len(builds) == 1 and len(got) == 4 and all(g[0] is got[0][0] for g in got)
    gate.clear()
    threads = [threading.Thread(target=session, args=("epoch",)) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    gate.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)  # no session hangs on a build that failed
    assert failed == ["epoch"] * 3  # each waiter tried itself, and failed the same way


def test_a_parse_of_a_file_changed_within_the_racy_window_is_not_trusted(tmp_path, monkeypatch):
    """A same-size rewrite within one timestamp tick keeps the file's size, times and inode: only a
    parse made after the file has settled may stand for it."""
    from pathlib import Path as P

    from finetune_core import runs as runs_module
    from finetune_core.runs import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.append_metrics({"kind": "batch", "epoch": 0.5, "step": 1, "loss": 0.7})
    metrics = run.file("metrics.csv")
    frozen = metrics.stat()  # every later stat of the file says this: the rewrite is invisible to it
    real_stat = P.stat
    monkeypatch.setattr(P, "stat", lambda self, **kw: frozen if self == metrics else real_stat(self, **kw))

    monkeypatch.setattr(runs_module, "RACY_S", 3600.0)  # changed "just now": not settled
    assert run.read_metrics()["loss"].tolist() == [0.7]
    metrics.write_text(metrics.read_text().replace("0.7", "0.6"))
    assert run.read_metrics()["loss"].tolist() == [0.6]  # parsed again

    monkeypatch.setattr(runs_module, "RACY_S", 0.0)  # settled: the parse stands for the file...
    assert run.read_metrics()["loss"].tolist() == [0.6]
    metrics.write_text(metrics.read_text().replace("0.6", "0.5"))
    assert run.read_metrics()["loss"].tolist() == [0.6]  # ...so an invisible rewrite is not seen


def test_class_names_that_look_like_numbers_stay_names_on_every_class_axis():
    """The built-in example's classes are "0".."9": each must be its own labelled category, not a
    point on a number line (top-3 bars read 5, 4, 3 with an empty row for class 4)."""
    classes = [str(d) for d in range(10)]
    confusion = plots.confusion_figure(np.eye(10, dtype=int), classes)
    assert confusion.layout.xaxis.type == confusion.layout.yaxis.type == "category"
    assert confusion.layout.xaxis.dtick == 1 and confusion.layout.yaxis.dtick == 1  # every class labelled
    top = plots.top_k_figure([("5", 0.6), ("3", 0.3), ("8", 0.1)])
    assert top.layout.yaxis.type == "category" and list(top.data[0].y) == ["8", "3", "5"]
    counts = plots.class_counts_figure({"train": {c: 10 for c in classes}})
    assert counts.layout.xaxis.type == "category" and counts.layout.xaxis.dtick == 1


def test_a_curve_of_one_or_two_points_is_drawn_with_markers():
    """A run that diverged at its second step logged one or two batches: a line alone draws nothing for
    a single point (a first user saw empty loss charts for the run that diverged)."""
    short = logged([{"kind": "batch", "epoch": 0.5, "step": 1, "loss": 681.3, "train_acc": 0.5, "elapsed_s": 1.0}])
    loss = traces_of(plots.overlay_figure({"short": short}), "short", "x")[0]
    assert len(loss.x) == 1 and "markers" in loss.mode
    assert traces_of(plots.overlay_figure({"fine": book_run()}), "fine", "x")[0].mode == "lines"  # 8: a line
