"""The run directory: the contract between the trainer, the UI, the command line and other tools.

Runs live under one folder, `default_runs_dir()`: `TUNEBOARD_RUNS_DIR` if set, else `runs/` beside
the app. The dashboard and every command of the command line use it.

    <runs_dir>/<run_id>/
      config.json          every setting, dataset, classes, backbone, normalisation, versions, device
      status.json          state, message, progress, times, best test accuracy
      metrics.csv          one row per logged point (kind = batch | epoch), pandas-readable
      checkpoint_last.pt   model, optimiser, scheduler, epoch, config (torch.load weights_only=True)
      checkpoint_best.pt   the same at the best test accuracy so far
      predictions.csv      the final model on the test split: path, true, predicted, confidence, loss,
                           one prob_<class> column per class
      log.txt              what happened, with the traceback of a failure
      meta.json            what the user edits afterwards: display name, tags

States: queued, running, completed, stopped, failed, diverged, interrupted.
Every file is written atomically (temp file + rename; checkpoints are also fsynced) except the
append-only metrics and log; a metrics row cut short by a kill or a full disk is left out when
read and cut off before the next row is appended.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1]

STATES = ("queued", "running", "completed", "stopped", "failed", "diverged", "interrupted")
ACTIVE_STATES = ("queued", "running")
FINISHED_STATES = ("completed", "stopped", "failed", "diverged", "interrupted")

CONFIG, STATUS, METRICS, PREDICTIONS, LOG, META = (
    "config.json", "status.json", "metrics.csv", "predictions.csv", "log.txt", "meta.json")
CHECKPOINT_LAST, CHECKPOINT_BEST = "checkpoint_last.pt", "checkpoint_best.pt"

METRIC_COLUMNS = ["kind", "epoch", "step", "loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc",
                  "lr", "head_lr", "images_per_s", "elapsed_s"]


def default_runs_dir() -> Path:
    """Where runs live: `TUNEBOARD_RUNS_DIR` if set, else `runs/` beside the app (whatever the
    current directory), for the dashboard and the command line alike."""
    return Path(os.environ.get("TUNEBOARD_RUNS_DIR") or APP_DIR / "runs").expanduser().resolve()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_file(path: Path, write, durable: bool = True) -> None:
    """Write a file through `write(binary file)` atomically: into a new temporary file beside it
    (a unique name: two writers never share one), flushed to the disk (fsync) when `durable`, then
    renamed over `path`. A process killed at any point leaves the previous file whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable and hasattr(os, "O_DIRECTORY"):  # the rename itself reaches the disk too (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        except OSError:
            pass  # some file systems cannot sync a folder; the file itself is synced
        finally:
            os.close(dir_fd)


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _ends_without_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _drop_torn_row(path: Path) -> None:
    """Cut an append-only CSV back to its last whole line (its header at least)."""
    if not _ends_without_newline(path):
        return
    with open(path, "r+b") as f:
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:48]


class RunDir:
    """One run's folder. Cheap to create: it only names paths."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    # --- writing (the trainer) -----------------------------------------------------------------
    def write_config(self, data: dict) -> None:
        atomic_write_json(self.file(CONFIG), data)

    def write_status(self, **fields) -> dict:
        """Merge `fields` into status.json (created if missing) and write it atomically."""
        status = self.read_status(default={})
        status.update(fields)
        status["updated_at"] = now_iso()
        atomic_write_json(self.file(STATUS), status)
        return status

    def append_metrics(self, row: dict) -> None:
        path = self.file(METRICS)
        if path.exists():
            _drop_torn_row(path)  # a row cut short by a kill or a full disk goes before the next one
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})

    def truncate_metrics(self, max_epoch: float) -> None:
        """Keep only the rows up to `max_epoch` (used when resuming from a checkpoint)."""
        path = self.file(METRICS)
        if not path.exists():
            return
        def kept(row: dict) -> bool:  # a torn row (a kill, a full disk) goes too
            try:
                return row.get("kind") in ("batch", "epoch", "test") and float(row["epoch"]) <= max_epoch + 1e-9
            except (KeyError, TypeError, ValueError):
                return False

        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if kept(r)]
        fd, tmp = tempfile.mkstemp(dir=self.path, suffix=".tmp")
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)

    def log(self, message: str) -> None:
        with open(self.file(LOG), "a", encoding="utf-8") as f:
            f.write(f"{now_iso()} {message}\n")

    # --- reading (everyone) --------------------------------------------------------------------
    def read_json(self, name: str, default=None):
        try:
            return json.loads(self.file(name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            if default is not None:
                return default
            raise

    def read_status(self, default=None) -> dict:
        return self.read_json(STATUS, default=default)

    def read_config(self) -> dict:
        return self.read_json(CONFIG)

    def read_meta(self) -> dict:
        try:
            return self.read_json(META, default={})
        except (OSError, ValueError):
            return {}

    def write_meta(self, **fields) -> dict:
        meta = self.read_meta()
        meta.update(fields)
        atomic_write_json(self.file(META), meta)
        return meta

    def read_metrics(self):
        import pandas as pd

        path = self.file(METRICS)
        if not path.exists() or path.stat().st_size == 0:
            return pd.DataFrame(columns=METRIC_COLUMNS)
        try:
            frame = pd.read_csv(path, on_bad_lines="skip")  # a garbled line is skipped
        except ValueError:  # not text, no header: nothing can be read from it
            return pd.DataFrame(columns=METRIC_COLUMNS)
        if len(frame) and _ends_without_newline(path):
            frame = frame.iloc[:-1]  # a row cut short (a kill, a full disk) or still being written
        if "kind" in frame:
            frame = frame[frame["kind"].isin(("batch", "epoch", "test"))].reset_index(drop=True)
            for column in frame.columns.drop("kind"):
                if frame[column].dtype == object:  # damage left text in a column of numbers
                    frame[column] = pd.to_numeric(frame[column], errors="coerce")
        return frame

    def read_predictions(self):
        import pandas as pd

        return pd.read_csv(self.file(PREDICTIONS))

    def has_checkpoint(self) -> bool:
        return self.file(CHECKPOINT_LAST).exists()


def new_run_dir(runs_dir: str | os.PathLike, name: str = "") -> RunDir:
    """Create a fresh, uniquely named run folder: <UTC time>-<name>."""
    runs_dir = Path(runs_dir).expanduser()
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{slugify(name) or 'run'}"
    for i in range(1000):
        path = runs_dir / (base if i == 0 else f"{base}-{i}")
        try:
            path.mkdir()
            return RunDir(path)
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run folder under {runs_dir}")


@dataclass
class RunInfo:
    """A summary of one run for listings. `error` is set when the folder is damaged."""
    path: str
    id: str
    name: str = ""
    state: str = ""
    message: str = ""
    dataset: str = ""
    backbone: str = ""
    preset: str = ""
    group: str = ""               # runs launched together share it
    best_test_acc: float | None = None
    final_test_acc: float | None = None
    progress: float = 0.0
    started_at: str = ""
    ended_at: str = ""
    duration_s: float | None = None
    tags: list[str] = field(default_factory=list)
    has_checkpoint: bool = False
    error: str = ""               # the folder cannot be summarised (status.json or config.json unreadable)
    warning: str = ""             # readable, but part of it is damaged (a missing checkpoint, a torn metrics row)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _duration(status: dict) -> float | None:
    try:
        start = datetime.fromisoformat(status["started_at"])
        end = datetime.fromisoformat(status["ended_at"]) if status.get("ended_at") else datetime.now(timezone.utc)
        return (end - start).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def run_info(path: str | os.PathLike) -> RunInfo:
    """A run's summary. Never raises for a damaged folder: `error` says what cannot be read,
    `warning` what is damaged in a folder that can still be read."""
    run = RunDir(path)
    info = RunInfo(path=str(run.path), id=run.id, name=run.id)
    name = STATUS
    try:
        status = run.read_status()
        name = CONFIG
        config = run.read_config()
    except FileNotFoundError as exc:
        info.error = f"damaged run folder: {Path(exc.filename).name} is missing"
        return info
    except (OSError, ValueError) as exc:  # truncated, not JSON, not UTF-8, unreadable
        info.error = f"damaged run folder: {name} cannot be read ({type(exc).__name__}: {exc})"
        return info
    for name, value in ((STATUS, status), (CONFIG, config)):
        if not isinstance(value, dict):
            info.error = f"damaged run folder: {name} does not hold a JSON object"
            return info
    try:
        _fill_info(info, run, status, config)
    except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong type in a hand-edited file
        info.error = f"damaged run folder: unexpected values in {STATUS} or {CONFIG} ({type(exc).__name__}: {exc})"
        return info
    try:
        info.warning = _damage(run, info, status)
    except OSError as exc:
        info.warning = f"damaged run folder: {exc}"
    return info


def _damage(run: RunDir, info: RunInfo, status: dict) -> str:
    """What is damaged in a readable run folder: '' when nothing is."""
    problems = []
    if info.state not in ACTIVE_STATES and status.get("epochs_done") and not info.has_checkpoint:
        n = status["epochs_done"]
        problems.append(f"{CHECKPOINT_LAST} is missing (the run finished {n} epoch{'' if n == 1 else 's'})")
    metrics = run.file(METRICS)
    if info.state not in ACTIVE_STATES and metrics.exists() and _ends_without_newline(metrics):
        problems.append(f"{METRICS} ends in a half-written row (left out when read)")
    return "damaged run folder: " + "; ".join(problems) if problems else ""


def _fill_info(info: RunInfo, run: RunDir, status: dict, config: dict) -> None:
    cfg = config.get("config", {}) if isinstance(config, dict) else {}
    meta = run.read_meta()
    info.name = meta.get("name") or cfg.get("name") or run.id
    info.tags = list(meta.get("tags", []))
    info.state = status.get("state", "")
    info.message = status.get("message", "")
    info.dataset = config.get("dataset", {}).get("root", cfg.get("data", ""))
    info.backbone = cfg.get("backbone", "")
    info.preset = cfg.get("preset", "")
    info.group = cfg.get("group", "")
    info.best_test_acc = status.get("best_test_acc")
    info.final_test_acc = status.get("test_acc")
    info.progress = float(status.get("progress", 0.0) or 0.0)
    info.started_at = status.get("started_at", "")
    info.ended_at = status.get("ended_at", "")
    info.duration_s = _duration(status)
    info.has_checkpoint = run.has_checkpoint()


def list_runs(runs_dir: str | os.PathLike) -> list[RunInfo]:
    """Every run under runs_dir, newest first. Damaged folders are listed with their error."""
    runs_dir = Path(runs_dir).expanduser()
    if not runs_dir.is_dir():
        return []
    infos = [run_info(p) for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(infos, key=lambda i: i.id, reverse=True)


def find_run(runs_dir: str | os.PathLike, run_id: str) -> RunDir:
    path = Path(runs_dir).expanduser() / run_id
    if not path.is_dir():
        raise FileNotFoundError(f"no run '{run_id}' in {runs_dir}")
    return RunDir(path)


def delete_run(path: str | os.PathLike) -> None:
    """Delete a finished run's folder. Refuses a queued or running one."""
    run = RunDir(path)
    try:
        state = run.read_status(default={}).get("state")
    except (OSError, ValueError, AttributeError):  # a damaged status.json: nothing says it is running
        state = None
    if state in ACTIVE_STATES:
        raise RuntimeError(f"run {run.id} is {state}: stop it before deleting it")
    shutil.rmtree(run.path)


def mark_interrupted(runs_dir: str | os.PathLike, alive=lambda info: False) -> list[str]:
    """Runs left queued or running by a server that died: mark them interrupted. Returns their ids.
    `alive(info)`: a run still trained by a process of its own (a torchrun child) is left alone."""
    marked = []
    for info in list_runs(runs_dir):
        if info.state in ACTIVE_STATES and not info.error and not alive(info):
            RunDir(info.path).write_status(
                state="interrupted", ended_at=now_iso(),
                message=f"interrupted: the server stopped while this run was {info.state}"
                        + ("; it can be resumed from its last checkpoint" if info.has_checkpoint else ""))
            marked.append(info.id)
    return marked
