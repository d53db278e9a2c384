"""What the dashboard computes from run directories and jobs: comparisons, which runs to show,
confusion matrices, per-class metrics and galleries. Pure functions over pandas frames
(scikit-learn does the metrics)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .config import compare_settings, saved_settings
from .runs import RunDir, RunInfo

COMPARE_SETTINGS = compare_settings()  # from the settings' definitions (config.Setting.compare)


def confusion(predictions: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """Rows: true class; columns: predicted class (the order of `classes`)."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(predictions["true"].astype(str), predictions["predicted"].astype(str),
                            labels=[str(c) for c in classes])


def per_class_metrics(predictions: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    from sklearn.metrics import precision_recall_fscore_support

    labels = [str(c) for c in classes]
    p, r, f, s = precision_recall_fscore_support(predictions["true"].astype(str), predictions["predicted"].astype(str),
                                                 labels=labels, zero_division=0)
    return pd.DataFrame({"class": labels, "precision": p, "recall": r, "f1": f, "support": s})


def gallery(predictions: pd.DataFrame, mistakes_only: bool = False, true_class: str | None = None,
            sort: str = "loss") -> pd.DataFrame:
    """Test images to show: optionally only the mistakes or one true class, sorted by
    'loss' (worst first), 'confidence' (most confident first) or 'least confident'."""
    frame = predictions
    if mistakes_only:
        frame = frame[frame["true"] != frame["predicted"]]
    if true_class is not None:
        frame = frame[frame["true"].astype(str) == str(true_class)]
    if sort == "loss":
        frame = frame.sort_values("loss", ascending=False)
    elif sort == "confidence":
        frame = frame.sort_values("confidence", ascending=False)
    elif sort == "least confident":
        frame = frame.sort_values("confidence", ascending=True)
    return frame


def run_labels(infos: list[RunInfo]) -> dict[str, str]:
    """{run id: label}: the run's name, with its id added where names repeat."""
    names = [i.name for i in infos]
    return {i.id: i.name if names.count(i.name) == 1 else f"{i.name} · {i.id}" for i in infos}


def job_labels(jobs: list[dict]) -> dict[str, str]:
    """{run id: label} for job snapshots: the name, with the run id added where names repeat (two
    runs drawn under one name would overwrite each other's curves)."""
    names = [j["name"] for j in jobs]
    return {j["run_id"]: j["name"] if names.count(j["name"]) == 1 else f"{j['name']} · {j['run_id']}" for j in jobs}


def compare_table(infos: list[RunInfo]) -> tuple[pd.DataFrame, list[str]]:
    """One row per run: its settings and final metrics; plus the settings that differ."""
    rows = []
    for info in infos:
        run = RunDir(info.path)
        try:
            cfg = run.read_config().get("config", {})
        except (OSError, ValueError):
            cfg = {}
        status = run.read_status(default={})
        row = {"run": info.name, "state": info.state}
        values = saved_settings(cfg)  # older runs: today's defaults for settings they did not have
        row.update({k: values[k] for k in COMPARE_SETTINGS})
        row.update({"final loss": status.get("loss"), "final train acc": status.get("train_acc"),
                    "final test acc": status.get("test_acc"), "best test acc": status.get("best_test_acc"),
                    "images/s": status.get("images_per_s"), "duration (s)": info.duration_s})
        rows.append(row)
    frame = pd.DataFrame(rows)
    differing = [k for k in COMPARE_SETTINGS if k in frame and frame[k].astype(str).nunique() > 1]
    return frame, differing


def default_selection(infos: list[RunInfo]) -> list[str]:
    """The runs the Compare page opens on (ids, newest first): the newest run's group when it has
    companions, else the two newest runs."""
    if not infos:
        return []
    group = infos[0].group
    chosen = [i.id for i in infos if group and i.group == group]
    return chosen if len(chosen) >= 2 else [i.id for i in infos[:2]]


def current_group(jobs: list[dict], preferred: str = "") -> str:
    """The group of jobs the Train page follows: `preferred` (the one launched from this tab) while
    the server knows it, else the newest active group, else the newest group (so a refresh or a
    second tab shows the same running job). "" when there are no jobs."""
    if preferred and any(j["group"] == preferred for j in jobs):
        return preferred
    candidates = [j for j in jobs if j["state"] in ("running", "queued")] or jobs
    return max(candidates, key=lambda j: j["submitted_at"])["group"] if candidates else ""


def metrics_of(infos: list[RunInfo]) -> pd.DataFrame:
    """Every logged point of several runs in one frame, with a `run` column (for CSV download)."""
    frames = []
    for info in infos:
        m = RunDir(info.path).read_metrics()
        if not m.empty:
            frames.append(m.assign(run=info.name, run_id=info.id))
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)
