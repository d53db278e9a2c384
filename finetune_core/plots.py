"""Plotly figures built from pandas frames: pure functions, no Streamlit.

The run curves follow what TensorBoard and Weights & Biases do: one colour per run, derived from
its id (the same on every page); a hover that lists every run's value at that x; optional
exponential-moving-average smoothing with the raw curve faint behind; log-scale loss; epoch,
step or wall-time x axes. The palette reads on Streamlit's light and dark backgrounds alike, and
no background is set here: the page's theme (theme="streamlit") draws it."""
from __future__ import annotations

import hashlib
import html
import math
import threading
from collections import OrderedDict

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

METRIC_LABELS = {"loss": "train loss", "train_acc": "train acc", "test_acc": "test acc", "test_loss": "test loss"}
# Ten hues, each with a contrast of at least 3:1 (WCAG's bar for graphics) against both the light
# theme's white and the dark theme's #171614, and no two alike: every pair at least
# MIN_COLOR_DIFFERENCE apart in CIELAB (the earlier palette had violet and grape, red and orange,
# green and olive within 26 of each other). tests/test_plots.py and tests/test_ui_colors.py check
# both. The page's theme gets the same list (.streamlit/config.toml, chartCategoricalColors).
PALETTE = ["#1c7ed6", "#f03e3e", "#2b8a3e", "#7048e8", "#0c8599", "#9c755f", "#f800a8", "#a09000", "#985090",
           "#f000f8"]
MIN_COLOR_DIFFERENCE = 40.0  # CIE76 delta E; about 2.3 is the smallest difference an eye notices
# How the curves of runs that share a colour differ (in id order): two ids hash to one of ten
# colours about one time in ten, and their colour must stay the one every page shows.
DASHES = ("solid", "dash", "dot", "dashdot", "longdash")
COLORS = PALETTE
THEME_BACKGROUNDS = {"light": "#ffffff", "dark": "#171614"}  # Streamlit 1.67's two backgrounds, as Chromium draws them
# The hover box: light text on a dark box, as TensorBoard's, readable on either theme (the light
# theme's own hover text is a pale grey on white).
HOVER_LABEL = dict(bgcolor="#262730", bordercolor="#808495", font=dict(color="#fafafa"))
MAX_POINTS = 600  # per trace: a live chart stays smooth with thousands of logged batches
# The x axes a run's curves can be drawn against: {choice: metrics.csv column}.
X_AXES = {"epoch": "epoch", "step": "step", "wall time": "elapsed_s"}
X_TITLES = {"epoch": "epoch", "step": "step (batches)", "elapsed_s": "wall time (s)"}
X_HOVER = {"epoch": ".2f", "step": "d", "elapsed_s": ".0f"}


def _slot(run_id: str) -> int:
    """A run's place in the palette, from its id (a stable hash: Python's hash() changes per process)."""
    return int(hashlib.sha1(str(run_id).encode("utf-8")).hexdigest(), 16) % len(PALETTE)


def run_color(run_id: str) -> str:
    """The colour of a run, derived from its id alone."""
    return PALETTE[_slot(run_id)]


def run_colors(run_ids) -> dict[str, str]:
    """{run id: colour}: each run's own run_color, whatever else is on the chart (a colour that
    depended on the companions changed between pages and as runs were added)."""
    return {run_id: run_color(run_id) for run_id in sorted(set(run_ids))}


def run_dashes(run_ids) -> dict[str, str]:
    """{run id: line dash} for runs drawn together: solid, except that runs whose ids hash to one
    colour take the next of DASHES in id order, so that no two curves of a chart look alike and
    every run keeps its colour."""
    dashes, seen = {}, {}
    for run_id in sorted(set(run_ids)):
        color = run_color(run_id)
        dashes[run_id] = DASHES[seen.get(color, 0) % len(DASHES)]
        seen[color] = seen.get(color, 0) + 1
    return dashes


def run_styles(labels: dict[str, str]) -> dict[str, dict[str, str]]:
    """overlay_figure's colors and dashes for runs drawn under their labels ({run id: label})."""
    return {"colors": {labels[i]: c for i, c in run_colors(labels).items()},
            "dashes": {labels[i]: d for i, d in run_dashes(labels).items()}}


def color_difference(a: str, b: str) -> float:
    """How far apart two "#rrggbb" colours look: CIE76 delta E, the distance in CIELAB (D65)."""
    return math.dist(_lab(a), _lab(b))


def _lab(color: str) -> tuple[float, float, float]:
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
              for c in (int(color[k:k + 2], 16) / 255 for k in (1, 3, 5))]
    xyz = [sum(m * c for m, c in zip(row, linear)) / white for row, white in zip(
        ((0.4124, 0.3576, 0.1805), (0.2126, 0.7152, 0.0722), (0.0193, 0.1192, 0.9505)), (0.95047, 1.0, 1.08883))]
    fx, fy, fz = (t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29 for t in xyz)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def chart_text(text: str) -> str:
    """A user's text (a run's name, a class) for a plotly label: plotly draws the tags it knows
    (<b>, <br>, <a href>) in names and hovers, so <, > and & are escaped and the text shows as typed."""
    return html.escape(str(text), quote=False)


def faint(color: str, alpha: float = 0.25) -> str:
    """A hex colour at `alpha` opacity (the raw curve behind a smoothed one)."""
    h = color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def smooth(values, weight: float) -> np.ndarray:
    """TensorBoard's scalar smoothing: an exponential moving average, debiased (divided by
    1 - weight^n) so that the first points are not pulled towards zero. weight 0 leaves the values
    as they are; non-finite values pass through without entering the average."""
    values = np.asarray(values, dtype=float)
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing must be at least 0 and below 1, got {weight}")
    if weight == 0 or len(values) == 0:
        return values.copy()
    out = np.empty_like(values)
    last, n = 0.0, 0
    for i, v in enumerate(values):
        if not math.isfinite(v):
            out[i] = v
            continue
        last = last * weight + (1 - weight) * v
        n += 1
        out[i] = last / (1 - weight ** n)
    return out


def downsample(frame: pd.DataFrame, max_points: int | None = None) -> pd.DataFrame:
    """At most max_points (default MAX_POINTS) rows, evenly spaced, always keeping the last one."""
    max_points = MAX_POINTS if max_points is None else max_points
    if len(frame) <= max_points:
        return frame
    step = len(frame) / max_points
    idx = sorted({int(i * step) for i in range(max_points)} | {len(frame) - 1})
    return frame.iloc[idx]


def _curve_points(metrics: pd.DataFrame, metric: str, x: str, kind: str | None = None,
                  smoothing: float = 0.0) -> pd.DataFrame:
    """Training curves come from the per-batch rows (running epoch averages, as the book's
    animator draws them); test and validation curves from the per-epoch rows. Columns: x, the
    metric, and "smoothed" (the metric smoothed over every logged point, before thinning)."""
    if metrics.empty or metric not in metrics or x not in metrics:
        return pd.DataFrame(columns=[x, metric, "smoothed"])
    kind = kind or ("epoch" if metric.startswith(("test", "val")) else "batch")
    rows = metrics[metrics["kind"] == kind]
    if rows.empty and kind == "batch":
        rows = metrics[metrics["kind"] == "epoch"]
    rows = rows[[x, metric]].dropna()
    rows = rows.assign(smoothed=smooth(rows[metric].to_numpy(), smoothing))
    return downsample(rows)


def _validation_metric(metric: str) -> str | None:
    """The validation counterpart of a test metric (test_acc -> val_acc), None for the others."""
    return "val_" + metric[len("test_"):] if metric.startswith("test_") else None


def _has_validation(frame: pd.DataFrame, metric: str) -> bool:
    """Whether a run held out a validation split: its epoch rows log val_* instead of test_*."""
    val = _validation_metric(metric)
    return val is not None and val in frame and frame.loc[frame["kind"] == "epoch", val].notna().any()


def _panel_title(metric: str, validated: list[bool]) -> str:
    label = METRIC_LABELS.get(metric, metric)
    if not any(validated):
        return label
    val_label = label.replace("test", "validation")
    return f"{val_label} (◆ final test)" if all(validated) else f"{label} / {val_label} (◆ final test)"


def _number_format(metric: str) -> str:
    """How a hover rounds a metric: accuracies to 3 decimals, losses to 4 significant digits."""
    return ".3f" if metric.endswith("_acc") else ".4g"


LABEL_EVERY_CLASS = 30  # up to this many classes every one is labelled; above, plotly thins the labels

_FIGURES: "OrderedDict[tuple, list[go.Figure]]" = OrderedDict()
_FIGURES_LOCK = threading.Lock()
_BUILDING: dict[tuple, threading.Event] = {}  # keys being built, and the event their waiters wait on
FIGURES_CACHED = 32


def live_epoch_span(runs: dict[str, pd.DataFrame], epochs: int) -> int:
    """The epochs a live chart's axis spans: twice the epochs logged so far (at least one), up to the
    run's total. The axis spanned every epoch from the start, as the book's animator does: 30 epochs
    left the first a thirtieth of the chart, and a first user saw the loss move per epoch only,
    though every batch is drawn. It now grows with the run, never more than half empty."""
    done = max((float(f["epoch"].max()) for f in runs.values() if "epoch" in f and f["epoch"].notna().any()),
               default=0.0)
    return int(min(max(epochs, 1), max(1, math.ceil(2 * done - 1e-9))))


def cached_panel_figures(runs: dict[str, pd.DataFrame], **kwargs) -> list[go.Figure]:
    """panel_figures, built once for the same curves and options in this process: the live views of
    several sessions refreshing every second, and Compare on finished runs, then cost one build.
    Curves are known to be the same by their content (a hash of every value and the columns: a few
    milliseconds, where a build takes tens), so any change to a frame is other curves. Sessions
    asking at once for the same new curves wait for one build; other builds go on meanwhile. The
    figures are shared: draw them, do not change them."""
    if not runs:
        return panel_figures(runs, **kwargs)
    key = (tuple((label, _content_digest(frame)) for label, frame in runs.items()),
           tuple(sorted((k, _hashable(v)) for k, v in kwargs.items())))
    while True:
        with _FIGURES_LOCK:
            hit = _FIGURES.get(key)
            if hit is not None:
                _FIGURES.move_to_end(key)
                return hit
            building = _BUILDING.get(key)
            if building is None:  # this caller builds; others asking for the same key wait for it
                building = _BUILDING[key] = threading.Event()
                break
        building.wait(30)
    try:
        figures = panel_figures(runs, **kwargs)
        with _FIGURES_LOCK:
            _FIGURES[key] = figures
            while len(_FIGURES) > FIGURES_CACHED:
                _FIGURES.popitem(last=False)
        return figures
    finally:
        with _FIGURES_LOCK:
            _BUILDING.pop(key, None)
        building.set()


def _content_digest(frame: pd.DataFrame) -> str:
    rows = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return hashlib.sha1(rows.tobytes() + repr((list(frame.columns), len(frame))).encode()).hexdigest()


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def panel_figures(runs: dict[str, pd.DataFrame], metrics=("loss", "train_acc", "test_acc"),
                  **kwargs) -> list[go.Figure]:
    """overlay_figure's panels as one figure each (same colours, hover, smoothing and axes), so a
    page can set them in columns that stack on a narrow screen instead of squeezing three panels
    across a phone."""
    figures = []
    for metric in metrics:
        fig = overlay_figure(runs, metrics=(metric,), **kwargs)
        fig.update_layout(height=340, legend=dict(orientation="h", y=-0.3))
        figures.append(fig)
    return figures


def overlay_figure(runs: dict[str, pd.DataFrame], metrics=("loss", "train_acc", "test_acc"), x: str = "epoch",
                   epochs: int | None = None, colors: dict[str, str] | None = None, smoothing: float = 0.0,
                   log_loss: bool = False, dashes: dict[str, str] | None = None) -> go.Figure:
    """Several runs overlaid, one panel per metric; each run keeps one colour across panels.

    `runs`: {label: metrics frame}; `colors`, `dashes`: {label: colour or line dash} (the pages pass
    run_styles of the runs' ids; by default the labels are hashed). `x`: a metrics.csv column, "epoch", "step" or
    "elapsed_s". `smoothing`: TensorBoard's EMA weight (0: none); above 0 the smoothed curve is
    drawn over the raw one, faint, and the hover shows both. `log_loss`: the loss panels on a log
    scale. The hover lists every run's value at the x under the cursor ("x unified").

    A run with a validation split logs its validation metrics every epoch and the test split once,
    at the end: its test panels draw the validation curve and the final test result as a diamond.
    A run without one (the book's way) draws its test metric of every epoch."""
    if smoothing and not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be at least 0 and below 1, got {smoothing}")
    dashes = {**(run_dashes(runs) if colors is None else dict.fromkeys(runs, "solid")), **(dashes or {})}
    colors = {**run_colors(runs), **(colors or {})}
    validated = {metric: [_has_validation(frame, metric) for frame in runs.values()] for metric in metrics}
    titles = [_panel_title(m, validated[m]) for m in metrics]
    if len(metrics) == 1:  # one panel (panel_figures, every refresh of the live view): no subplot grid to build
        # The title on the left: plotly's toolbar sits top right, and covered a centred title
        fig = go.Figure(layout=dict(annotations=[dict(text=titles[0], x=0.0, y=1.0, xref="paper", yref="paper",
                                                      xanchor="left", yanchor="bottom", showarrow=False,
                                                      font=dict(size=16))]))
    else:
        fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=titles)

    def cell(col: int) -> dict:
        return {} if len(metrics) == 1 else {"row": 1, "col": col}
    for k, (key, frame) in enumerate(runs.items()):
        color, dash, label = colors[key], dashes[key], chart_text(key)  # plotly reads <b>, <a href> in names: a name stays as typed
        for col, metric in enumerate(metrics, start=1):
            name = METRIC_LABELS.get(metric, metric)
            shown = metric
            if validated[metric][k]:
                shown, name = _validation_metric(metric), name.replace("test", "validation")
            pts = _curve_points(frame, shown, x, smoothing=smoothing)
            fmt = _number_format(metric)
            # markers where a line alone would hide points: the test split's few, and any curve of one or
            # two (a run that diverged at its second step drew nothing: a single point has no line)
            mode = "lines+markers" if metric.startswith("test") or len(pts) <= 2 else "lines"
            if smoothing:
                fig.add_trace(go.Scatter(x=pts[x], y=pts[shown], name=label, legendgroup=label, showlegend=False,
                                         mode=mode, line=dict(color=faint(color), width=1, dash=dash),
                                         marker=dict(color=faint(color)), hoverinfo="skip"), **cell(col))
                hover = f"%{{fullData.name}} · {name} %{{y:{fmt}}} (raw %{{customdata:{fmt}}})<extra></extra>"
                y, raw = pts["smoothed"], pts[shown]
            else:
                hover = f"%{{fullData.name}} · {name} %{{y:{fmt}}}<extra></extra>"
                y, raw = pts[shown], None
            fig.add_trace(go.Scatter(x=pts[x], y=y, customdata=raw, name=label, legendgroup=label,
                                     showlegend=col == 1, mode=mode, line=dict(color=color, dash=dash), marker=dict(color=color),
                                     hovertemplate=hover), **cell(col))
            if validated[metric][k]:
                final = _curve_points(frame, metric, x, kind="test")
                hover = (f"%{{fullData.name}} · final {METRIC_LABELS.get(metric, metric)} %{{y:{fmt}}}"
                         "<extra></extra>")
                fig.add_trace(go.Scatter(x=final[x], y=final[metric], name=label, legendgroup=label, showlegend=False,
                                         mode="markers", hovertemplate=hover,
                                         marker=dict(color=color, symbol="diamond", size=11,
                                                     line=dict(color="white", width=1))), **cell(col))
    for col, metric in enumerate(metrics, start=1):
        if metric.endswith("_acc"):
            fig.update_yaxes(range=[0, 1.02], **cell(col))
        elif log_loss and metric.endswith("loss"):
            fig.update_yaxes(type="log", **cell(col))
        elif not any(t.x is not None and len(t.x) for t in fig.select_traces(**cell(col))):  # none yet: 0-1, not -1-4
            fig.update_yaxes(range=[0, 1], **cell(col))
    fig.update_layout(height=360, margin=dict(l=40, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.25),
                      hovermode="x unified", hoverlabel=HOVER_LABEL)
    fig.update_xaxes(title_text=X_TITLES.get(x, x.replace("_", " ")), hoverformat=X_HOVER.get(x, ".3g"))
    if epochs and x == "epoch":
        fig.update_xaxes(range=[0, epochs * 1.03])
    else:  # every panel to the last epoch, step or second any run logged (a panel's own ended earlier; plotly
        # centres its own range on a lone point: a 1-epoch run's test accuracy ran to epoch 2)
        last = max((float(f[x].max()) for f in runs.values() if x in f and f[x].notna().any()), default=0.0)
        if last > 0:
            fig.update_xaxes(range=[0, last * 1.03])
    return fig


def class_counts_figure(splits: dict[str, dict[str, int]]) -> go.Figure:
    fig = go.Figure()
    for k, (split, counts) in enumerate(splits.items()):
        fig.add_trace(go.Bar(x=[chart_text(c) for c in counts], y=list(counts.values()), name=split,
                             marker_color=COLORS[k]))
    fig.update_layout(barmode="group", height=280, margin=dict(l=40, r=10, t=10, b=40), yaxis_title="images",
                      xaxis_type="category",  # classes named 0-9 are names; each labelled while they fit
                      xaxis_dtick=1 if len(next(iter(splits.values()), {})) <= LABEL_EVERY_CLASS else None)
    return fig


def confusion_figure(matrix, classes: list[str]) -> go.Figure:
    classes = [chart_text(c) for c in classes]  # folder names, shown as typed
    # No colorscale of its own: the page's theme gives its sequential one, dark on the dark theme
    # ("Blues" starts at white: a bright block there); plotly picks each count's text colour.
    fig = go.Figure(go.Heatmap(z=matrix, x=classes, y=classes, text=matrix, texttemplate="%{text}",
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{z}<extra></extra>"))
    fig.update_layout(xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed", height=420,
                      xaxis_type="category", yaxis_type="category",
                      xaxis_dtick=1 if len(classes) <= LABEL_EVERY_CLASS else None,
                      yaxis_dtick=1 if len(classes) <= LABEL_EVERY_CLASS else None,
                      margin=dict(l=60, r=10, t=10, b=60))
    return fig


def top_k_figure(top: list[tuple[str, float]]) -> go.Figure:
    labels = [chart_text(c) for c, _ in top][::-1]
    values = [p for _, p in top][::-1]
    fig = go.Figure(go.Bar(x=values, y=labels, orientation="h", text=[f"{v:.1%}" for v in values],
                           textposition="auto", marker_color=COLORS[0]))
    fig.update_layout(xaxis=dict(range=[0, 1], tickformat=".0%"), yaxis_type="category", height=60 + 35 * len(top),
                      margin=dict(l=10, r=10, t=10, b=30))
    return fig


def sweep_figure(grid) -> go.Figure:
    """A sweep's heatmap (sweep.SweepGrid): learning rate down, head multiplier across, the score
    of the model each finished cell's run keeps (grid.label says which), the run's state in the others, the best cell marked with a
    star and a frame."""
    def cell_text(i: int, j: int) -> str:
        value = grid.accuracy[i][j]
        if value is None:
            return grid.states[i][j] or "-"
        return f"★ {value:.3f}" if grid.best == (i, j) else f"{value:.3f}"

    rows = [f"{lr:g}" for lr in grid.lrs]
    cols = [f"x{m:g}" for m in grid.head_lr_mults]
    text = [[cell_text(i, j) for j in range(len(cols))] for i in range(len(rows))]
    z = [[math.nan if v is None else v for v in row] for row in grid.accuracy]
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=rows, text=text, texttemplate="%{text}", colorscale="Viridis",
                               zmin=0, zmax=1, colorbar=dict(title=f"{grid.split} acc"),
                               hovertemplate="lr %{y}, head %{x}<br>%{text}<extra></extra>"))
    waiting = [(i, j) for i in range(len(rows)) for j in range(len(cols)) if grid.accuracy[i][j] is None]
    if waiting:  # a heatmap writes no text in a cell without a value: blank until a cell finished
        fig.add_trace(go.Scatter(x=[cols[j] for _, j in waiting], y=[rows[i] for i, _ in waiting], mode="text",
                                 text=[text[i][j] for i, j in waiting], hoverinfo="skip", showlegend=False))
    if grid.best is not None:
        i, j = grid.best
        fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5, line=dict(color="#f03e3e", width=3))
    fig.update_layout(xaxis_title="head learning-rate multiplier", yaxis_title="learning rate",
                      xaxis_type="category", yaxis_type="category", height=120 + 60 * len(rows),
                      margin=dict(l=60, r=10, t=30, b=50),
                      title=f"{grid.label}: {grid.finished} of {grid.total} runs finished")
    return fig


def reliability_figure(bins_before: list[dict], bins_after: list[dict]) -> go.Figure:
    """The reliability diagram (calibration.reliability's bins): each bin's accuracy against its mean
    confidence, before and after temperature scaling, with the diagonal a calibrated model lies on;
    marker size by the bin's number of images."""
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="calibrated",
                               line=dict(color="#808495", dash="dot")))
    for bins, name, color in ((bins_before, "before (softmax)", COLORS[1]), (bins_after, "after (temperature)",
                                                                            COLORS[0])):
        counts = [b["count"] for b in bins]
        biggest = max(counts, default=1)
        fig.add_trace(go.Scatter(
            x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins], mode="lines+markers", name=name,
            marker=dict(color=color, size=[6 + 14 * (c / biggest) ** 0.5 for c in counts]), line=dict(color=color),
            customdata=counts, hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>%{customdata} images"))
    fig.update_layout(xaxis=dict(title="confidence (top probability)", range=[0, 1.02]),
                      yaxis=dict(title="accuracy", range=[0, 1.02]), height=360,
                      margin=dict(l=10, r=10, t=10, b=40), legend=dict(orientation="h", y=-0.25))
    return fig
