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
Every file is written atomically (temp file + rename) except the append-only metrics and log.
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


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


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
        new = not path.exists()
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
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("epoch") and float(r["epoch"]) <= max_epoch + 1e-9]
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
        return pd.read_csv(path)

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
    error: str = ""

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
    run = RunDir(path)
    info = RunInfo(path=str(run.path), id=run.id, name=run.id)
    try:
        status = run.read_status()
        config = run.read_config()
    except FileNotFoundError as exc:
        info.error = f"damaged run folder: {Path(exc.filename).name} is missing"
        return info
    except (OSError, ValueError) as exc:
        info.error = f"damaged run folder: {exc}"
        return info
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
    return info


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
    state = run.read_status(default={}).get("state")
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
