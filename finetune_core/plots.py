"""Plotly figures built from pandas frames: pure functions, no Streamlit."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

METRIC_LABELS = {"loss": "train loss", "train_acc": "train acc", "test_acc": "test acc", "test_loss": "test loss"}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
MAX_POINTS = 600  # per trace: a live chart stays smooth with thousands of logged batches


def downsample(frame: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """At most max_points rows, evenly spaced, always keeping the last one."""
    if len(frame) <= max_points:
        return frame
    step = len(frame) / max_points
    idx = sorted({int(i * step) for i in range(max_points)} | {len(frame) - 1})
    return frame.iloc[idx]


def _curve_points(metrics: pd.DataFrame, metric: str, x: str, kind: str | None = None) -> pd.DataFrame:
    """Training curves come from the per-batch rows (running epoch averages, as the book's
    animator draws them); test and validation curves from the per-epoch rows."""
    if metrics.empty or metric not in metrics or x not in metrics:
        return pd.DataFrame(columns=[x, metric])
    kind = kind or ("epoch" if metric.startswith(("test", "val")) else "batch")
    rows = metrics[metrics["kind"] == kind]
    if rows.empty and kind == "batch":
        rows = metrics[metrics["kind"] == "epoch"]
    rows = rows[[x, metric]].dropna()
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


def overlay_figure(runs: dict[str, pd.DataFrame], metrics=("loss", "train_acc", "test_acc"), x: str = "epoch",
                   epochs: int | None = None) -> go.Figure:
    """Several runs overlaid, one panel per metric; each run keeps one colour across panels.

    A run with a validation split logs its validation metrics every epoch and the test split once,
    at the end: its test panels draw the validation curve and the final test result as a diamond.
    A run without one (the book's way) draws its test metric of every epoch."""
    validated = {metric: [_has_validation(frame, metric) for frame in runs.values()] for metric in metrics}
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[_panel_title(m, validated[m]) for m in metrics])
    for k, (label, frame) in enumerate(runs.items()):
        color = COLORS[k % len(COLORS)]
        for col, metric in enumerate(metrics, start=1):
            name = METRIC_LABELS.get(metric, metric)
            shown = metric
            if validated[metric][k]:
                shown, name = _validation_metric(metric), name.replace("test", "validation")
            pts = _curve_points(frame, shown, x)
            hover = f"%{{fullData.name}}<br>{name} %{{y:.3f}}<extra></extra>"
            fig.add_trace(go.Scatter(x=pts[x], y=pts[shown], name=label, legendgroup=label, showlegend=col == 1,
                                     mode="lines+markers" if metric.startswith("test") else "lines",
                                     line=dict(color=color), hovertemplate=hover), row=1, col=col)
            if validated[metric][k]:
                final = _curve_points(frame, metric, x, kind="test")
                hover = f"%{{fullData.name}}<br>final {METRIC_LABELS.get(metric, metric)} %{{y:.3f}}<extra></extra>"
                fig.add_trace(go.Scatter(x=final[x], y=final[metric], name=label, legendgroup=label, showlegend=False,
                                         mode="markers", hovertemplate=hover,
                                         marker=dict(color=color, symbol="diamond", size=11,
                                                     line=dict(color="white", width=1))), row=1, col=col)
    for col, metric in enumerate(metrics, start=1):
        if metric.endswith("_acc"):
            fig.update_yaxes(range=[0, 1.02], row=1, col=col)
    fig.update_layout(height=360, margin=dict(l=40, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(title_text=x.replace("_", " "))
    if epochs and x == "epoch":
        fig.update_xaxes(range=[0, epochs * 1.03])
    return fig


def class_counts_figure(splits: dict[str, dict[str, int]]) -> go.Figure:
    fig = go.Figure()
    for k, (split, counts) in enumerate(splits.items()):
        fig.add_trace(go.Bar(x=list(counts), y=list(counts.values()), name=split, marker_color=COLORS[k]))
    fig.update_layout(barmode="group", height=280, margin=dict(l=40, r=10, t=10, b=40), yaxis_title="images")
    return fig


def confusion_figure(matrix, classes: list[str]) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=matrix, x=classes, y=classes, colorscale="Blues", text=matrix, texttemplate="%{text}",
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{z}<extra></extra>"))
    fig.update_layout(xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed", height=420,
                      margin=dict(l=60, r=10, t=10, b=60))
    return fig


def top_k_figure(top: list[tuple[str, float]]) -> go.Figure:
    labels = [c for c, _ in top][::-1]
    values = [p for _, p in top][::-1]
    fig = go.Figure(go.Bar(x=values, y=labels, orientation="h", text=[f"{v:.1%}" for v in values],
                           textposition="auto", marker_color=COLORS[0]))
    fig.update_layout(xaxis=dict(range=[0, 1], tickformat=".0%"), height=60 + 35 * len(top),
                      margin=dict(l=10, r=10, t=10, b=30))
    return fig
