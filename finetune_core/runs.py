"""The run directory: the contract between the trainer, the UI, the command line and other tools.

Runs live under one folder, `default_runs_dir()`: `TUNEBOARD_RUNS_DIR` if set, else `runs/` beside
the app. The dashboard and every command of the command line use it.

    <runs_dir>/<run_id>/
      config.json          every setting, dataset, classes, backbone, normalisation, versions, device
      status.json          state, message, progress, times, the kept model's test accuracy (run_score)
      metrics.csv          one row per logged point (kind = batch | epoch), pandas-readable
      checkpoint_last.pt   model, optimiser, scheduler, epoch, config (torch.load weights_only=True)
      checkpoint_best.pt   the same at the best test accuracy so far
      predictions.csv      the final model on the test split: path, true, predicted, confidence, loss,
                           one prob_<class> column per class
      log.txt              what happened, with the traceback of a failure
      meta.json            what the user edits afterwards: display name, tags
      owner.lock           locked by the one process writing the run (queued or training)
      owner.json           who that is: pid, host, the process's start time, its command line

States: queued, running, completed, stopped, failed, diverged, interrupted.
Every file is written atomically (temp file + rename; checkpoints are also fsynced) except the
append-only metrics and log; a metrics row cut short by a kill or a full disk is left out when
read and cut off before the next row is appended.

Ownership: a run has one writer. The process that queues or trains it holds an OS lock on
`owner.lock` (flock on Linux and macOS, msvcrt on Windows) for as long as it does; the system
drops the lock when that process ends, however it ends (SIGKILL and power loss included), so a
lock that can be taken means the writer is gone, whatever became of its PID. A run left queued or
running without a live owner is `interrupted`; one with a live owner (the command line, another
server) is left alone and cannot be resumed or deleted until it ends.
"""
from __future__ import annotations

import csv
import json
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1]  # the project's folder: runs/ and data/ default to beside it

STATES = ("queued", "running", "completed", "stopped", "failed", "diverged", "interrupted")
ACTIVE_STATES = ("queued", "running")
RESUMABLE_STATES = ("stopped", "interrupted")  # with a checkpoint, such a run continues from it
FINISHED_STATES = ("completed", "stopped", "failed", "diverged", "interrupted")

CONFIG, STATUS, METRICS, PREDICTIONS, LOG, META = (
    "config.json", "status.json", "metrics.csv", "predictions.csv", "log.txt", "meta.json")
CHECKPOINT_LAST, CHECKPOINT_BEST = "checkpoint_last.pt", "checkpoint_best.pt"
OWNER, OWNER_LOCK = "owner.json", "owner.lock"

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


# metrics.csv frames parsed in this process: {path: (read at, signature, frame, settled)}, the most
# recently read runs (RunDir.read_metrics).
METRICS_CACHE_RUNS = 32
RACY_S = 2.0  # a file changed this recently may change again within its timestamp's tick
_METRICS_CACHE: OrderedDict = OrderedDict()
_METRICS_LOCK = threading.Lock()


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

    def replace_status(self, status: dict) -> dict:
        """Write status.json as exactly `status` (a refused resume puts the previous one back)."""
        atomic_write_json(self.file(STATUS), status)
        return dict(status)

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

    def read_metrics(self, max_age_s: float = 0.0):
        """metrics.csv as a frame (the rows of a known kind; a torn last row left out). Parsed once
        for as long as the file does not change, for every reader in the process: the pages of
        several sessions, refreshing every second, share one parse. A change is seen by its size,
        modification and status-change times and inode (a file replaced by another of the same size
        and mtime has a new inode and ctime); a parse of a file changed less than RACY_S before it is
        not trusted to stand for the file (a same-size rewrite within one timestamp tick), as git
        treats its "racy" entries. `max_age_s`: a frame read that recently is returned without
        looking at the file (the live views: the curves as of at most that long ago)."""
        path = self.file(METRICS)
        key, now = str(path), time.monotonic()
        with _METRICS_LOCK:
            hit = _METRICS_CACHE.get(key)
        if hit is not None and max_age_s and now - hit[0] < max_age_s:
            return hit[2].copy()
        try:
            info = path.stat()
            signature = (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
            settled = time.time() - max(info.st_mtime_ns, info.st_ctime_ns) / 1e9 > RACY_S
        except OSError:
            signature, settled = None, False
        if hit is not None and signature is not None and hit[1] == signature and hit[3]:
            frame = hit[2]
        else:
            frame = self._parse_metrics(path)
        if signature is not None:
            with _METRICS_LOCK:
                current = _METRICS_CACHE.get(key)
                if current is None or current[0] <= now:  # a slower, older read never replaces a newer one
                    _METRICS_CACHE[key] = (now, signature, frame, settled)
                    _METRICS_CACHE.move_to_end(key)
                while len(_METRICS_CACHE) > METRICS_CACHE_RUNS:
                    _METRICS_CACHE.popitem(last=False)
        return frame.copy()  # a caller may change its copy (any pandas), never the shared frame

    @staticmethod
    def _parse_metrics(path: Path):
        import pandas as pd

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


BEFORE_RESUME = "before_resume"  # status.json while a resume waits: the status it had before (JobManager.resume)


def without_before_resume(status: dict) -> dict:
    return {k: v for k, v in status.items() if k != BEFORE_RESUME}


def status_before_resume(run: RunDir) -> dict:
    """The run's status as it was before a resume was asked for: what a refused resume puts back."""
    status = run.read_status(default={})
    return status.get(BEFORE_RESUME) or without_before_resume(status)


def status_put_back(before: dict, message: str) -> dict:
    """status.json after a resume that did not happen (refused, or taken off the queue): as it was
    before, with `message` saying why (a run left active by a process that is gone reads as
    interrupted, as the run list showed it)."""
    state = before.get("state")
    return {**before, "state": state if state in FINISHED_STATES else "interrupted", "message": message}


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


# --------------------------------------------------------------------------------------------
# Ownership: one writer per run (see the module's docstring)


class RunOwned(RuntimeError):
    """Another live process is writing this run; the message names it."""


CLAIM_WAIT_S = 2.0  # a claim waits this long for a quick look by another process to end

_claims: dict[Path, list] = {}  # run folder -> [its open, locked owner.lock, claims]: this process's runs
_claims_lock = threading.Lock()


def _try_lock(f) -> bool:
    """Take the exclusive OS lock on the open file `f` without waiting; False when another holds it."""
    try:
        if os.name == "nt":
            import msvcrt

            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if os.name == "nt" or exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise  # a filesystem without locks: say so rather than guess who owns what


def _unlock_and_close(f) -> None:
    try:
        if os.name == "nt":
            import msvcrt

            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
    finally:
        f.close()  # on Linux and macOS closing the file drops the lock


def process_started_at() -> str:
    """When this process started (with the PID, it names the process even after the PID is reused)."""
    try:  # Linux: field 22 of /proc/self/stat is the start in clock ticks after boot
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        started = _IMPORTED_AT
    return datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds")


_IMPORTED_AT = time.time()


def owner_record() -> dict:
    """owner.json for a run this process writes."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_started_at": process_started_at(),
            "since": now_iso(), "command": " ".join(getattr(sys, "orig_argv", sys.argv))[:300]}


def describe_owner(owner: dict) -> str:
    return (f"process {owner.get('pid', '?')} on {owner.get('host', '?')} ({owner.get('command') or 'unknown'}, "
            f"since {owner.get('since', '?')})")


def _key(run: RunDir) -> Path:
    return run.path.resolve()


LAUNCH_FILE = "launcher.json"  # in the run directory: the torchrun child the dashboard started


def launched_pid(run: RunDir) -> int | None:
    """The pid of the torchrun child the dashboard started for this run (launcher.json), if it is
    still alive on this machine. It owns the run from its launch, before its rank 0 holds the lock."""
    try:
        record = json.loads(run.file(LAUNCH_FILE).read_text())
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # the pid may have been reused by another program
        try:
            if str(run.path).encode() not in cmdline.read_bytes():
                return None
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":  # a zombie: it has ended
                return None
        except OSError:
            return None
    return pid


def claim_run(run: RunDir) -> None:
    """Make this process the run's writer (again: claims nest, each needs its release_run).
    Raises RunOwned, naming the owner, when another live process writes it."""
    key = _key(run)
    with _claims_lock:
        if key in _claims:
            _claims[key][1] += 1
            return
        child = launched_pid(run)
        if child is not None and child not in (os.getpid(), os.getppid()):  # torchrun's own ranks may claim
            raise RunOwned(f"run {run.id} is being started by torchrun (process {child}): wait for it to end "
                           "or stop it there")
        run.path.mkdir(parents=True, exist_ok=True)
        f = open(run.file(OWNER_LOCK), "a+b")
        deadline = time.monotonic() + CLAIM_WAIT_S
        while not _try_lock(f):  # another process may only be looking (run_owner): wait a moment
            if time.monotonic() > deadline:
                f.close()
                raise RunOwned(f"run {run.id} is being written by {describe_owner(_read_owner(run))}: "
                               "wait for it to end or stop it there")
            time.sleep(0.05)
        try:
            atomic_write_json(run.file(OWNER), owner_record())
        except BaseException:
            _unlock_and_close(f)
            raise
        _claims[key] = [f, 1]


def release_run(run: RunDir) -> None:
    """Undo one claim_run; the last one lets the run go (its files stay as they are)."""
    key = _key(run)
    with _claims_lock:
        held = _claims.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _claims[key]
            _unlock_and_close(held[0])


@contextmanager
def owning(run: RunDir):
    """`with owning(run):` this process writes the run inside the block (RunOwned if another does)."""
    claim_run(run)
    try:
        yield run
    finally:
        release_run(run)


def _read_owner(run: RunDir) -> dict:
    try:
        owner = run.read_json(OWNER)
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


@contextmanager
def _unowned(run: RunDir):
    """Yields True, holding the run's lock for the block, when no live process owns the run;
    False when one does (this process included)."""
    with _claims_lock:
        mine = _key(run) in _claims
    if mine:
        yield False
        return
    try:
        f = open(run.file(OWNER_LOCK), "a+b")
    except OSError:
        yield True  # cannot even open it (e.g. a read-only copy): nobody is writing there
        return
    if not _try_lock(f):
        f.close()
        yield False
        return
    if launched_pid(run) is not None:  # a torchrun child starting up owns it before its rank 0 locks it
        _unlock_and_close(f)
        yield False
        return
    try:
        yield True
    finally:
        _unlock_and_close(f)


def run_owner(run: RunDir | str | os.PathLike) -> dict | None:
    """The owner record (pid, host, process_started_at, since, command) of the live process that
    writes this run, or None when no process does."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    with _unowned(run) as free:
        return None if free else (_read_owner(run) or {"pid": "?"})


KEPT_BEST, KEPT_FINAL = "best validation epoch", "final epoch"
SCORE_NAME = "test acc of the kept model"  # the words every page and the command line use
KEPT_NAME = "kept model"  # a table's column of which epoch that is (RunScore.kept)


@dataclass(frozen=True)
class RunScore:
    """What a run is scored by: the model it keeps, the one Predict, Export and the command line
    use (`selected_checkpoint`): its best validation epoch when it held a validation split out,
    else its final epoch. Never the last epoch of a run that kept an earlier one (worse by
    construction with early stopping), nor the best test epoch (a choice made on the test split).
    `test_acc` is None until the kept model was tested (a run with a validation split is tested
    once, at its end); `val_acc` is the kept model's validation accuracy, None without one."""
    kept: str = KEPT_FINAL
    test_acc: float | None = None
    val_acc: float | None = None

    @property
    def label(self) -> str:
        """What the number is: "test acc of the kept model (best validation epoch)"."""
        return f"{SCORE_NAME} ({self.kept})"

    def text(self) -> str:
        """The score in words: "test acc 0.967 of the kept model (final epoch)"."""
        if self.test_acc is None:
            return f"not tested yet (kept model: {self.kept})"
        return f"test acc {self.test_acc:.3f} of the kept model ({self.kept})"

    def selection(self) -> tuple[float | None, str]:
        """(accuracy, split) to choose between runs by, as a sweep does: the kept model's
        validation accuracy when the run held a validation split out (choosing on the test split
        would make its score optimistic), else its test accuracy."""
        if self.kept == KEPT_BEST:
            return self.val_acc, "validation"
        return self.test_acc, "test"


def selection_label(split: str) -> str:
    """The words for RunScore.selection's number ("validation acc of the kept model (best
    validation epoch)"), as a sweep's heatmap and the command line's grid say it."""
    return f"{split} acc of the kept model ({KEPT_BEST if split == 'validation' else KEPT_FINAL})"


def run_score(status: dict) -> RunScore:
    """A run's score from its status.json (see RunScore): the one definition every listing uses."""
    def number(name: str) -> float | None:
        value = status.get(name)
        return None if value is None else float(value)

    held_out = status.get("selection_split") == "val" or status.get("best_val_acc") is not None
    if held_out and status.get("selected_checkpoint", "best") == "best":
        tested = status.get("selected_checkpoint") is not None  # the end's test of the kept checkpoint
        return RunScore(KEPT_BEST, number("test_acc") if tested else None, number("best_val_acc"))
    return RunScore(KEPT_FINAL, number("test_acc"), number("val_acc"))


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
    score: RunScore = field(default_factory=RunScore)  # what the run keeps, tested (run_score)
    progress: float = 0.0
    started_at: str = ""
    ended_at: str = ""
    duration_s: float | None = None
    tags: list[str] = field(default_factory=list)
    has_checkpoint: bool = False
    owner: str = ""               # the live process writing a queued or running run (describe_owner)
    error: str = ""               # the folder cannot be summarised (status.json or config.json unreadable)
    warning: str = ""             # readable, but part of it is damaged (a missing checkpoint, a torn metrics row)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def kept_text(self) -> str:
        """Which model the run keeps, in words that match its state (a listing's KEPT_NAME column):
        a completed run's score.kept; none before its first checkpoint (queued, its first epoch, or
        ended before it); "so far" while it runs; the latest epoch, not the final one, of a run that
        did not complete. Home said "final epoch" of a run in its first epoch."""
        if self.state == "completed":
            return self.score.kept
        active = self.state in ACTIVE_STATES
        if not self.has_checkpoint:
            return "none yet" if active else "none"
        kept = self.score.kept if self.score.kept == KEPT_BEST else "latest epoch"
        return f"{kept} so far" if active else kept


def _duration(status: dict) -> float | None:
    """The run's wall time, every segment of a resumed run included: the time it had behind it
    when it last resumed (`resumed_after_s`, the wall-time axis at its checkpoint) plus this
    segment's, from its start to its end (or now)."""
    try:
        start = datetime.fromisoformat(status["started_at"])
        end = datetime.fromisoformat(status["ended_at"]) if status.get("ended_at") else datetime.now(timezone.utc)
        return (end - start).total_seconds() + float(status.get("resumed_after_s") or 0.0)
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
    info.score = run_score(status)
    info.progress = float(status.get("progress", 0.0) or 0.0)
    info.started_at = status.get("started_at", "")
    info.ended_at = status.get("ended_at", "")
    info.duration_s = _duration(status)
    info.has_checkpoint = run.has_checkpoint()
    if info.state in ACTIVE_STATES:  # status.json says so; is its writer still alive?
        owner = run_owner(run)
        if owner is None:
            info.state, info.message = "interrupted", interrupted_message(info.state, info.has_checkpoint)
        else:
            info.owner = describe_owner(owner)


# Folders of the runs folder that are Tuneboard's own and not runs: the data reviews kept for the
# Review page (review.py) and the fixes files of read-only datasets (fixes.py).
REVIEWS_FOLDER = "reviews"
DATASET_FIXES_FOLDER = "dataset-fixes"
NOT_RUNS = (REVIEWS_FOLDER, DATASET_FIXES_FOLDER)


def run_folders(runs_dir: Path) -> list[Path]:
    """The folders of runs_dir that hold runs: not hidden ones, not Tuneboard's own (NOT_RUNS)."""
    return [p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_RUNS]


def list_runs(runs_dir: str | os.PathLike) -> list[RunInfo]:
    """Every run under runs_dir, newest first. Damaged folders are listed with their error."""
    runs_dir = Path(runs_dir).expanduser()
    if not runs_dir.is_dir():
        return []
    infos = [run_info(p) for p in run_folders(runs_dir)]
    return sorted(infos, key=lambda i: i.id, reverse=True)


def find_run(runs_dir: str | os.PathLike, run_id: str) -> RunDir:
    path = Path(runs_dir).expanduser() / run_id
    if not path.is_dir():
        raise FileNotFoundError(f"no run '{run_id}' in {runs_dir}")
    return RunDir(path)


def delete_run(path: str | os.PathLike) -> None:
    """Delete a run's folder. Refuses while a live process writes it (queued or running there);
    a run left queued or running by a process that is gone can be deleted."""
    run = RunDir(path)
    with _unowned(run) as free:
        if not free:
            owner = _read_owner(run)
            try:
                state = run.read_status(default={}).get("state", "in use")
            except (OSError, ValueError, AttributeError):  # a damaged status.json
                state = "in use"
            raise RunOwned(f"run {run.id} is {state} in {describe_owner(owner)}: stop it before deleting it")
        for entry in run.path.iterdir():  # all but the lock this holds (Windows cannot delete a locked file)
            if entry.name != OWNER_LOCK:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    shutil.rmtree(run.path, ignore_errors=True)


def resume_clause(has_checkpoint: bool) -> str:
    """How a stopped or interrupted run's message ends: whether it can be resumed, and if not, why
    and what to do (a run stopped in its first epoch showed no Resume and said nothing of it)."""
    return ("; it can be resumed from its last checkpoint" if has_checkpoint else
            "; it ended before its first epoch did, so there is no checkpoint to resume: press Train to start it again")


def interrupted_message(state: str, has_checkpoint: bool) -> str:
    return f"interrupted: the process writing this run ended while it was {state}" + resume_clause(has_checkpoint)


def mark_interrupted(runs_dir: str | os.PathLike, alive: Callable[[RunDir], bool] = lambda run: False) -> list[str]:
    """Runs left queued or running by a process that is gone (a server or command that died):
    mark them interrupted. A run whose writer is alive is left alone, and so is one for which
    `alive(run)` says so (a torchrun child still starting, before its rank 0 owns the run).
    Returns the ids marked."""
    marked = []
    runs_dir = Path(runs_dir).expanduser()
    if not runs_dir.is_dir():
        return marked
    for path in sorted(run_folders(runs_dir)):
        run = RunDir(path)
        try:
            if run.read_status(default={}).get("state") not in ACTIVE_STATES:
                continue
            with _unowned(run) as free:
                state = run.read_status(default={}).get("state")  # again, now that nobody can write it
                if free and state in ACTIVE_STATES and not alive(run):
                    run.write_status(state="interrupted", ended_at=now_iso(),
                                     message=interrupted_message(state, run.has_checkpoint()))
                    marked.append(run.id)
        except (OSError, ValueError):
            continue  # a damaged folder: the listing flags it
    return marked
