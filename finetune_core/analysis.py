"""What the dashboard computes from run directories and jobs: comparisons, which runs to show,
confusion matrices, per-class metrics and galleries. Pure functions over pandas frames
(scikit-learn does the metrics)."""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pandas as pd

from .config import TrainConfig, compare_settings, inactive_settings, saved_settings
from .runs import ACTIVE_STATES, KEPT_NAME, METRICS, SCORE_NAME, RunDir, RunInfo, run_info

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


GALLERY_SIDE = 256  # pixels: the gallery's pictures are at most this wide and high


def gallery_picture(path: str, side: int = GALLERY_SIDE):
    """(a test image as the gallery shows it, None) or (None, why it cannot be shown, naming the
    file): a test image moved, deleted or damaged since the run must not stop the page."""
    from .data import load_rgb

    try:
        picture = load_rgb(path)
    except FileNotFoundError:
        return None, f"{path}: moved or deleted since the run"
    except (OSError, ValueError) as exc:
        return None, f"{path}: cannot be shown ({exc})"
    picture.thumbnail((side, side))
    return picture, ""


def confusion_cell(predictions: pd.DataFrame, true_class: str, predicted_class: str) -> pd.DataFrame:
    """The test images of one cell of the confusion matrix (true A, predicted B), worst first (the
    highest loss: the most confident mistakes, often a wrong label, come first)."""
    frame = predictions[(predictions["true"].astype(str) == str(true_class))
                        & (predictions["predicted"].astype(str) == str(predicted_class))]
    return frame.sort_values("loss", ascending=False).drop_duplicates("path")  # one card (and key) per image


def run_labels(infos: list[RunInfo]) -> dict[str, str]:
    """{run id: label}: the run's name, with its id added where names repeat."""
    names = [i.name for i in infos]
    return {i.id: i.name if names.count(i.name) == 1 else f"{i.name} · {i.id}" for i in infos}


def job_labels(jobs: list[dict]) -> dict[str, str]:
    """{run id: label} for job snapshots: the name, with the run id added where names repeat (two
    runs drawn under one name would overwrite each other's curves)."""
    names = [j["name"] for j in jobs]
    return {j["run_id"]: j["name"] if names.count(j["name"]) == 1 else f"{j['name']} · {j['run_id']}" for j in jobs}


NOT_APPLICABLE = "-"  # a setting that has no effect in a run, or a metric it does not have

# The Compare table's metric columns after the run's score (runs.SCORE_NAME and which model it
# keeps): (column, status.json field, format). They come first, after the run's name and state,
# so that what was achieved is visible without scrolling.
COMPARE_METRICS = [("final train acc", "train_acc", "{:.3f}"), ("final loss", "loss", "{:.3f}")]


def display_value(value) -> str:
    """A value as a table shows it: "-" for none, on/off, numbers without trailing zeros (10, not
    10.000000; 5e-05; 0.9387), everything else as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_APPLICABLE
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(display_value(v) for v in value)
    return str(value)


def _metric(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_APPLICABLE
    return fmt.format(value)


def refreshed(infos: list[RunInfo]) -> list[RunInfo]:
    """The same runs read again from their folders (state, score, duration as they are now); a run
    deleted or damaged since it was listed keeps what the listing knew."""
    fresh = [run_info(i.path) for i in infos]
    return [listed if info.error else info for listed, info in zip(infos, fresh)]


def compare_table(infos: list[RunInfo]) -> tuple[pd.DataFrame, list[str]]:
    """One row per run, as text ready to show: its name, state, score (the test accuracy of the
    model it keeps, and which epoch that is), final metrics and tags
    first, then its settings ("-" for those that have no effect in that run, e.g. the multiplier
    of a one-group run) and its speed; plus the settings that differ between the runs. Each run's
    state, score and duration are read again from its folder, not taken from `infos`: the Compare
    page's fragment refreshes this table with the list of its last full rerun, and a run that has
    finished since must show it."""
    rows = []
    labels = run_labels(infos)  # a name shared by several runs gets its run's id
    for listed, info in zip(infos, refreshed(infos)):
        run = RunDir(info.path)
        try:
            record = run.read_config()
        except (OSError, ValueError):
            record = {}
        cfg = record.get("config", {})
        status = run.read_status(default={})
        values = saved_settings(cfg)  # older runs: today's defaults for settings they did not have
        inert = inactive_settings(TrainConfig(**values))
        if (record.get("dataset") or {}).get("layout") == "splits":  # the data came with its own test split
            inert["test_fraction"] = "the dataset has its own test split"
        row = {"run": labels[listed.id], "state": info.state, SCORE_NAME: _metric(info.score.test_acc, "{:.3f}"),
               KEPT_NAME: info.kept_text()}
        row.update({column: _metric(status.get(field), fmt) for column, field, fmt in COMPARE_METRICS})
        row["tags"] = ", ".join(info.tags)
        row["review fixes"] = review_fixes_label(record)
        row.update({k: NOT_APPLICABLE if k in inert else display_value(values[k]) for k in COMPARE_SETTINGS})
        row.update({"images/s": _metric(status.get("images_per_s"), "{:.1f}"),
                    "duration (s)": _metric(info.duration_s, "{:.0f}")})
        rows.append(row)
    frame = pd.DataFrame(rows)
    differing = [k for k in COMPARE_SETTINGS if k in frame and frame[k].nunique() > 1]
    trailing = ("images/s", "duration (s)", "review fixes")
    lead = [c for c in frame.columns if c not in COMPARE_SETTINGS and c not in trailing]
    rest = [c for c in frame.columns if c not in lead and c not in differing]
    return frame[lead + differing + rest], differing  # what differs right after the results, in view


def review_fixes_label(record: dict) -> str:
    """What the data review had changed when a run trained: the fixes in force ("3 relabelled, 5
    excluded"); with none, "before review" when the dataset has a fixes file now (the run came
    before it), else "not reviewed" (a set never reviewed was not "before" anything)."""
    from .fixes import fixes_path, summary_text

    dataset = record.get("dataset") or {}
    fixes = dataset.get("fixes")
    if not isinstance(fixes, dict):
        root = dataset.get("root")
        return "before review" if root and fixes_path(root).is_file() else "not reviewed"
    return summary_text(fixes.get("relabelled", 0), fixes.get("excluded", 0), fixes.get("leaks_dropped", 0))


def runs_without_metrics(infos: list[RunInfo]) -> list[RunInfo]:
    """The runs that have no logged point yet (queued, or ended before their first batch): they
    have no curve to draw."""
    return [i for i in infos if RunDir(i.path).read_metrics().empty]


def best_of_newest_group(infos: list[RunInfo]) -> str | None:
    """The run the Predict page opens on (an id, or None without runs): of the runs given (those
    with a model), the newest run's group's best by the test accuracy of the model each keeps
    (runs.run_score, what Predict uses), so that a comparison's scratch twin does not hide its
    fine-tuned run; the newest run when it has no group."""
    if not infos:
        return None
    newest = infos[0]
    members = [i for i in infos if newest.group and i.group == newest.group] or [newest]

    def score(info: RunInfo) -> float:
        return -1.0 if info.score.test_acc is None else info.score.test_acc

    return max(members, key=score).id


def count_text(n: int, noun: str) -> str:
    """ "1 error", "2 errors", "1,438 images": a count with its noun in the right number."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
def last_epoch_speed(metrics: pd.DataFrame) -> float | None:
    """Training images/s of a run's last epoch, from metrics.csv's epoch rows, or None with fewer
    than two. Each row's images_per_s is the run's running average (images / training seconds so
    far), which keeps the slow first epoch (decoding, a streamed view) in every later figure; with
    the same n images each epoch, epoch k took k·n/s_k - (k-1)·n/s_(k-1) seconds, so its speed is
    1 / (k/s_k - (k-1)/s_(k-1)), whatever n is."""
    if metrics is None or "kind" not in metrics or "images_per_s" not in metrics:
        return None
    rows = metrics[metrics["kind"] == "epoch"].dropna(subset=["epoch", "images_per_s"])
    if len(rows) < 2:
        return None
    (k0, s0), (k1, s1) = rows[["epoch", "images_per_s"]].iloc[-2:].itertuples(index=False)
    if k1 != k0 + 1 or s0 <= 0 or s1 <= 0 or k1 / s1 - k0 / s0 <= 0:
        return None
    return 1.0 / (k1 / s1 - k0 / s0)


def recorded_speed(infos: list[RunInfo], config: TrainConfig) -> tuple[float, RunInfo] | None:
    """(training images per second, the run that measured it): the newest completed run that trained
    as `config` would (same backbone, image size, trainable part, batch size and device): the speed
    of its last epoch (last_epoch_speed: the device as it is now, past the first epoch's decoding),
    else the average in its status.json; None without one. Training steps only, not decoding or
    caching."""
    same = ("backbone", "image_size", "train_stages", "batch_size", "device")
    for info in infos:  # newest first
        if info.state != "completed" or info.error:
            continue
        run = RunDir(info.path)
        try:
            cfg = run.read_config().get("config", {})
            speed = run.read_status(default={}).get("images_per_s")
        except (OSError, ValueError, AttributeError):
            continue
        if speed and all(str(cfg.get(k)) == str(getattr(config, k)) for k in same):
            return last_epoch_speed(run.read_metrics()) or float(speed), info
    return None


def cost_estimate(config: TrainConfig, report, infos: list[RunInfo], steps: int | None = None) -> tuple[float | None, str]:
    """(seconds, what they rest on) of training `config` for its epochs on the training images of
    `report` (the scan; less the validation split), or (with `steps`) `steps` batches as the
    learning-rate finder trains, at the speed a recorded run measured (recorded_speed); (None, why
    there is no estimate) without one. Shown before a twin or the finder starts."""
    n_train_images = round(sum(report.splits.get("train", {}).values()) * (1 - config.val_fraction))
    images = steps * config.batch_size if steps else n_train_images * config.epochs
    found = recorded_speed(infos, config)
    if found is None:
        return None, (f"no finished run of {config.backbone} at {config.image_size} px has measured its speed "
                      f"with batch {config.batch_size}, train_stages {config.train_stages} and device {config.device}")
    speed, info = found
    return images / speed, (f"{images:,} training images at {speed:.1f} images/s, the speed of "
                            f"'{info.name}'; decoding and caching come on top the first time")


LONG_RUN_S = 3600.0  # a run estimated to take longer is warned about before launch


def long_run_warning(seconds: float | None, epochs: int) -> str:
    """A sentence for a run estimated to take over LONG_RUN_S ("" otherwise): so that 1000 epochs
    typed for 10 are seen before they start."""
    if seconds is None or seconds <= LONG_RUN_S:
        return ""
    return (f"This run would take about {seconds / 3600:,.1f} hours ({epochs:,} epochs): check the epochs, "
            "or start it knowing it can be stopped and resumed.")


# A run's floor before any run has measured its speed: training images a second at 224 px faster than
# any backbone trains here, per CPU core or per accelerator. The fastest measured on this project's 2-core
# CPU: ResNet-18 in bf16, 32 images/s (16 a core; the GUIDE's figures): 50 a core leaves a 3x margin.
# Fewer pixels go faster in proportion. Only for runs that train every layer: with the frozen part's
# outputs cached (the fast preset), an epoch costs a fraction of that and no floor holds.
FASTEST_IMAGES_PER_S_224 = {"cpu": 50.0, "cuda": 5000.0, "mps": 500.0}  # cpu: per core
MANY_EPOCHS = 100  # more than this, with no estimate, is warned about (the book trains 5; the fast preset 15-30)


def unmeasured_run_warning(config, report, cpu_cores: int | None = None) -> str:
    """A sentence for a run that no recorded run can estimate ("" when there is nothing to say), so
    that 1000 epochs typed for 10 are seen before the first run: at least N hours at a speed no
    backbone reaches here (FASTEST_IMAGES_PER_S_224), for a run that trains every layer; else, over
    MANY_EPOCHS epochs, that its time cannot be known yet. `config` with its epochs resolved."""
    from .engine import training_images
    from .models import resolve_device

    images = training_images(config, report) * config.epochs
    if not images:
        return ""
    if config.train_stages == "all":
        kind = resolve_device(config.device).type
        ceiling = FASTEST_IMAGES_PER_S_224.get(kind, FASTEST_IMAGES_PER_S_224["cuda"])
        if kind == "cpu":
            ceiling *= cpu_cores or os.cpu_count() or 1
        else:  # one process per GPU (distributed.default_processes): each at most the ceiling
            from .distributed import default_processes

            ceiling *= default_processes(config.processes, config.device)
        ceiling *= (224 / config.image_size) ** 2
        least = images / ceiling
        if least > LONG_RUN_S:
            return (f"This run would take at least {least / 3600:,.1f} hours: {images:,} training images "
                    f"({config.epochs:,} epochs) at {ceiling:,.0f} images/s, faster than any backbone trains at "
                    f"{config.image_size} px on this {kind.upper()}. Check the epochs, or start it knowing it can be "
                    "stopped and resumed.")
    if config.epochs > MANY_EPOCHS:
        return (f"{config.epochs:,} epochs is far more than fine-tuning needs (the book trains 5, the fast preset 15 "
                "to 30), and no run has measured this recipe's speed yet, so how long it takes cannot be estimated: "
                "check the epochs, or train a few first to measure it.")
    return ""


MIN_STEPS = 20  # fewer optimiser steps in all than this, and a run learns next to nothing


def too_few_steps_warning(config, report) -> str:
    """A sentence for a run of so few optimiser steps that it cannot learn ("" otherwise): 58 photos
    at batch 64 for 2 epochs is 2 steps, and a first user got a model at chance with no word why.
    `config` with its epochs resolved (engine.resolve_auto); `report` the dataset's scan."""
    from .engine import training_images

    images = training_images(config, report)  # less the validation split
    if not images or config.epochs <= 0:
        return ""
    per_epoch = math.ceil(images / config.batch_size)
    steps = per_epoch * config.epochs
    if steps >= MIN_STEPS:
        return ""
    return (f"Only {steps:,} training step{'s' if steps != 1 else ''} in all ({images:,} training images at batch "
            f"{config.batch_size} is {per_epoch:,} step{'s' if per_epoch != 1 else ''} per epoch, for {config.epochs:,} "
            f"epochs): too few to learn from. Lower the batch size or raise the epochs to at least {MIN_STEPS} steps.")


def page_of(frame: pd.DataFrame, page: int, per_page: int) -> tuple[pd.DataFrame, int]:
    """(the rows of page `page`, counting from 1 and kept within range, and the number of pages)."""
    pages = max(1, math.ceil(len(frame) / per_page))
    page = min(max(1, page), pages)
    return frame.iloc[(page - 1) * per_page:page * per_page], pages


_CODE_LIKE = re.compile(r"(?<![\w`])([^\s`()]*[/*\\<>][^\s`()]*?)(?=[.,;:]?(?:\s|\)|$))")
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]<>#+|~$])")


def _looks_like_code(word: str) -> bool:
    """A path or pattern: a /, * or backslash, or a whole <name> (as in root/<class>/*). A lone <
    or > is not: an exception's "<urlopen error [Errno -2] ...>" spans several words, and code made
    of its first and last ("`<urlopen` error ... not `known>`") read as broken."""
    return any(c in word for c in "/*\\") or ("<" in word and ">" in word.split("<", 1)[1])


def markdown_message(text: str, paths: tuple[str, ...] = ()) -> str:
    """A message (paths, glob patterns, file names; an exception's text) made safe to show as
    Markdown: the given paths (which may hold spaces) and every word that looks like a path or
    pattern (_looks_like_code) as inline code; the rest reads as plain text, Markdown's special
    characters (a lone < or > included) escaped. So `root/<class>/*` stays as written instead of
    turning italic, and "<urlopen error ...>" reads as the exception said it."""
    pieces: list[str] = []
    # a given path only where it stands alone: a relative one typed ("photos") inside the full path the
    # message names ("/data/photos") would cut that path in two pieces of code, "`/data/``photos`"
    pattern = "|".join(rf"(?<![\w/\\.~-]){re.escape(p)}(?![\w/\\-])"
                       for p in sorted(filter(None, paths), key=len, reverse=True))
    parts = re.split(f"((?:{pattern}))", text) if pattern else [text]
    for k, part in enumerate(parts):
        if pattern and k % 2 == 1:
            pieces.append(_code(part))
            continue
        out, last = [], 0
        for m in _CODE_LIKE.finditer(part):
            if not _looks_like_code(m.group(1)):
                continue  # escaped with the text around it
            out.append(_MARKDOWN_SPECIALS.sub(r"\\\1", part[last:m.start()]))
            out.append(_code(m.group(1)))
            last = m.end()
        out.append(_MARKDOWN_SPECIALS.sub(r"\\\1", part[last:]))
        pieces.append("".join(out))
    return "".join(pieces)


def markdown_text(text: str) -> str:
    """A user's text (a run's name) shown as itself in Markdown: its special characters escaped,
    so that `**x**`, `[link](...)` or `<b>` in a name stay as typed."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", str(text))


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}" if fence == "`" else f"{fence} {text} {fence}"


def has_curves(info: RunInfo) -> bool:
    """Whether a run has logged a point (a line under metrics.csv's header), read cheaply."""
    try:
        with open(RunDir(info.path).file(METRICS), "rb") as f:
            return len(f.readline()) > 0 and len(f.readline()) > 0
    except OSError:
        return False


def default_selection(infos: list[RunInfo]) -> list[str]:
    """The runs the Compare page opens on (ids, newest first): of the runs with curves (all of them
    when none has any: a queued run or one that ended before its first batch has nothing to
    compare), the newest run's group when it has companions, else the two newest runs."""
    infos = [i for i in infos if has_curves(i)] or infos
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
    candidates = [j for j in jobs if j["state"] in ACTIVE_STATES] or jobs
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


def not_sure_summary(predictions: pd.DataFrame, threshold: float) -> tuple[float, float | None]:
    """(share of the test images answered "not sure", error rate among those answered) at a
    threshold, from predictions.csv (its confidence is the calibrated top probability)."""
    if predictions.empty:
        return 0.0, None
    answered = predictions["confidence"] >= threshold
    wrong = predictions["true"].astype(str) != predictions["predicted"].astype(str)
    return float(1 - answered.mean()), (float(wrong[answered].mean()) if answered.any() else None)
