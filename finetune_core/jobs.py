"""Background training jobs: one worker thread per device, runs queued in order.

The dashboard keeps one `JobManager` per server process (in `st.cache_resource`). A worker
thread never touches Streamlit: it trains through `engine.train`, which writes to the run
directory, and updates its job's fields under the manager's lock. Pages read both back.

A run with more than one process (the `processes` setting, or auto on a machine with several
GPUs) is started as a torchrun child process instead (distributed.launch); the worker follows it
through its run directory, asks it to stop with the run's stop file, and a manager started later
(a server restart) finds it again from the pid in its launcher.json.

The manager owns each run it queues (runs.claim_run) from submit to its end, so that no other
process resumes or deletes it meanwhile, and a new server marks it interrupted only once this
process is gone. `shutdown()` runs at interpreter exit: queued runs end `stopped`, running ones
are asked to stop and end `stopped` (or `interrupted` if they do not stop in time).

Resume queues only a stopped or interrupted run (NotResumable says why otherwise: a second click,
a stale one); status.json keeps the status the run had (`before_resume`), which a refused resume
or one taken off the queue puts back. The manager remembers the FINISHED_JOBS_KEPT newest
finished jobs and forgets a job whose run folder was deleted; run names (meta.json) are read
again only when the file changes.
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import distributed
from .config import TrainConfig
from .data import ScanReport
from .engine import config_record, resolve_auto, train
from .models import resolve_device
from .phases import PhaseMeter
from .runs import (ACTIVE_STATES, BEFORE_RESUME, META, RESUMABLE_STATES, RunDir, claim_run, launched_pid,
                   resume_clause,
                   list_runs, mark_interrupted, new_run_dir, now_iso, release_run, run_info, status_before_resume,
                   status_put_back)
from .sweep import is_sweep_group

DUPLICATE_WINDOW_S = 5.0  # an identical config submitted again within this is a double click
FINISHED_JOBS_KEPT = 50   # finished jobs the manager remembers (the Live view's groups); older ones are forgotten


class NotResumable(RuntimeError):
    """Resume was asked of a run that cannot resume now (already queued or running, completed,
    failed, damaged): the message says why, for the page to show; nothing was changed."""


class DuplicateSubmission(RuntimeError):
    """The same settings were submitted a moment ago (a double click): `run_id` is the run queued then."""

    def __init__(self, run_id: str, name: str):
        self.run_id = run_id
        super().__init__(f"{name} was queued a moment ago with the same settings (run {run_id}); not queued twice")


@dataclass
class Job:
    run_id: str
    run: RunDir
    config: TrainConfig
    device: str
    resume: bool = False
    report: ScanReport | None = None  # the dataset's scan, when the page already made it
    processes: int = 1                # more than 1: DDP in a torchrun child process
    state: str = "queued"
    message: str = "waiting for the device"
    progress: float = 0.0
    last_event: dict = field(default_factory=dict)
    meter: PhaseMeter | None = None  # the phase and its rates, from the events (set when the run starts)
    submitted_at: str = field(default_factory=now_iso)
    stop_event: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    submitted_monotonic: float = field(default_factory=time.monotonic)

    def snapshot(self, position: int | None = None) -> dict:
        return {"run_id": self.run_id, "path": str(self.run.path), "name": self.config.name or self.run_id,
                "state": self.state, "message": self.message, "progress": self.progress, "device": self.device,
                "backbone": self.config.backbone, "dataset": self.config.data, "queue_position": position,
                "group": self.config.group, "epochs": self.config.epochs, "processes": self.processes,
                "submitted_at": self.submitted_at, "last_event": dict(self.last_event),
                "phase": dict(self.meter.current) if self.meter is not None else None,
                "stopping": self.stop_event.is_set() and self.state == "running"}


def device_key(device: str) -> str:
    d = resolve_device(device)
    if d.type == "cuda":
        return f"cuda:{d.index or 0}"
    return d.type


class JobManager:
    """Submit configs, get run ids; one job at a time per device, the rest wait in order."""

    def __init__(self, runs_dir: str | Path, cache_dir: str | None = None,
                 train_fn: Callable = train):
        self.runs_dir = Path(runs_dir).expanduser()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cache_dir
        self.train_fn = train_fn
        self._lock = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._queues: dict[str, deque[Job]] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._shared_features: dict[str, dict] = {}  # per sweep: the frozen part's outputs, computed once
        self._names = RunNames()
        self._closed = False
        self.interrupted = mark_interrupted(self.runs_dir, alive=self._adopt)
        for info in list_runs(self.runs_dir):  # a torchrun child of an earlier server that owns its run
            if info.state in ACTIVE_STATES and info.id not in self._jobs:
                self._adopt(RunDir(info.path))
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    # --- submitting ----------------------------------------------------------------------------
    def submit(self, config: TrainConfig, report: ScanReport | None = None) -> str:
        """Queue a run. Raises ConfigError (before creating anything) when a setting is invalid.
        `report`: the dataset's scan if the caller has it, so that the run does not scan again.
        Raises DuplicateSubmission when the same settings (whatever their group) were submitted
        less than DUPLICATE_WINDOW_S ago: a double click queues one run."""
        config = resolve_auto(config.check(check_paths=True), report)  # what the run will use, shown at once
        config = config.replace(processes=distributed.default_processes(config.processes, config.device))
        with self._lock:  # the check and the queueing at once: two quick clicks queue it once
            twin = self._recent_twin(config)
            if twin is not None:
                raise DuplicateSubmission(twin.run_id, config.name or twin.run_id)
            run = new_run_dir(self.runs_dir, config.name or config.backbone)
            claim_run(run)  # a fresh folder: nobody else can own it; this process does until the job ends
            try:
                run.write_config(config_record(config, report))
                run.write_status(state="queued", message="waiting for the device", progress=0.0,
                                 submitted_at=now_iso())
                return self._enqueue(Job(run.id, run, config, device_key(config.device), report=report,
                                         processes=config.processes))
            except BaseException:
                release_run(run)
                raise

    def _recent_twin(self, config: TrainConfig) -> Job | None:
        """A job submitted less than DUPLICATE_WINDOW_S ago with the same settings but its group."""
        same = {**config.to_dict(), "group": None}
        now = time.monotonic()
        return next((j for j in self._jobs.values() if not j.resume
                     and now - j.submitted_monotonic < DUPLICATE_WINDOW_S
                     and {**j.config.to_dict(), "group": None} == same), None)

    def resume(self, run_id: str) -> str:
        """Queue an interrupted or stopped run again; it continues from its last checkpoint.
        Raises NotResumable when the run is already queued or running, or is in any state but
        RESUMABLE_STATES (a stale click on a run that completed meanwhile), and RunOwned when
        another process (the command line, another server) writes it. status.json keeps the
        status it had (BEFORE_RESUME) for a refused resume to put back."""
        run = RunDir(self.runs_dir / run_id)
        with self._lock:  # the check and the queueing at once: two quick clicks queue it once
            current = self._jobs.get(run_id)
            if current is not None and current.state in ACTIVE_STATES:
                raise NotResumable(f"{current.config.name or run_id} is already {current.state}")
            info = run_info(run.path)
            if info.error:
                raise NotResumable(f"{info.name} cannot be resumed: {info.error}")
            if info.state not in RESUMABLE_STATES and not info.owner:  # a live owner: RunOwned names it below
                raise NotResumable(f"{info.name} is {info.state}: only a {' or '.join(RESUMABLE_STATES)} run "
                                   "can be resumed")
            config = TrainConfig.from_dict(run.read_config()["config"])
            job = Job(run_id, run, config, device_key(config.device), resume=True,
                      message="waiting for the device (resuming)",
                      processes=config.processes or 1)  # what it used (0: a run from before that was stored)
            claim_run(run)  # RunOwned if another process writes it
            try:
                run.write_status(state="queued", message="waiting for the device (resuming)", ended_at=None,
                                 **{BEFORE_RESUME: status_before_resume(run)})
                return self._enqueue(job)
            except BaseException:
                release_run(run)
                raise

    def _enqueue(self, job: Job) -> str:
        with self._lock:  # re-entrant: resume() already holds it
            if self._closed:
                raise RuntimeError("the job manager is shut down")
            self._jobs.pop(job.run_id, None)  # a resumed run: the newest job, last in submission order
            self._jobs[job.run_id] = job
            self._forget_old_jobs()
            self._queues.setdefault(job.device, deque()).append(job)
            worker = self._workers.get(job.device)
            if worker is None or not worker.is_alive():
                worker = threading.Thread(target=self._work, args=(job.device,), daemon=True,
                                          name=f"tuneboard-worker-{job.device}")
                self._workers[job.device] = worker
                worker.start()
            self._lock.notify_all()
        return job.run_id

    # --- stopping ------------------------------------------------------------------------------
    def stop(self, run_id: str) -> str:
        """Stop a running job (within a batch) or take a queued one off the queue. Returns its state."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is None:
                raise KeyError(f"no job {run_id}")
            if job.state == "queued":
                self._queues[job.device].remove(job)
                self._end_queued(job, "stopped while queued to resume; it can be resumed from its last checkpoint"
                                 if job.run.has_checkpoint() else "stopped before it started")
                self._release_shared(job.config.group)
            elif job.state == "running":
                job.stop_event.set()
                job.message = "stopping..."
            return job.state

    def _end_queued(self, job: Job, message: str) -> None:
        """A job taken off its queue (lock held): `stopped`, or a resume that did not happen puts
        the run's status back as it was (a resumed run keeps what it trained)."""
        if job.resume:
            status = job.run.replace_status(status_put_back(status_before_resume(job.run), message))
        else:
            status = job.run.write_status(state="stopped", message=message, ended_at=now_iso())
        job.state, job.message = status["state"], message
        release_run(job.run)
        job.done.set()

    def stop_group(self, group: str) -> list[str]:
        """Stop every queued or running job of a group (a sweep, a run and its comparisons): the
        queued ones first, so that none starts while the running one stops. Returns their ids."""
        with self._lock:
            members = [j for j in self._jobs.values() if group and j.config.group == group
                       and j.state in ACTIVE_STATES]
            members.sort(key=lambda j: j.state != "queued")
            for job in members:
                self.stop(job.run_id)
            return [j.run_id for j in members]

    def _release_shared(self, group: str) -> None:
        """Free a sweep's shared outputs once none of its runs is queued or running (lock held)."""
        if not any(j.config.group == group and j.state in ACTIVE_STATES for j in self._jobs.values()):
            self._shared_features.pop(group, None)

    def _forget_old_jobs(self) -> None:
        """Keep the FINISHED_JOBS_KEPT newest finished jobs (lock held): a server that runs for
        months does not hold every job it ever ran."""
        finished = [run_id for run_id, j in self._jobs.items() if j.state not in ACTIVE_STATES]
        for run_id in finished[:max(0, len(finished) - FINISHED_JOBS_KEPT)]:
            del self._jobs[run_id]

    # --- reading -------------------------------------------------------------------------------
    def jobs(self) -> list[dict]:
        """Every job this manager knows, queued ones with their place in the queue, under the
        name the user gave it last (a rename in meta.json shows at once). A finished job whose
        run folder was deleted is forgotten."""
        with self._lock:
            gone = [run_id for run_id, j in self._jobs.items()
                    if j.state not in ACTIVE_STATES and not j.run.path.is_dir()]
            for run_id in gone:
                del self._jobs[run_id]
            self._forget_old_jobs()
            positions = {j.run_id: k for q in self._queues.values() for k, j in enumerate(q, start=1)}
            snapshots = [j.snapshot(positions.get(j.run_id)) for j in self._jobs.values()]
        self._names.keep_only([snap["path"] for snap in snapshots])
        return [self._names.named(snap) for snap in snapshots]

    def active(self) -> list[dict]:
        return [j for j in self.jobs() if j["state"] in ACTIVE_STATES]

    def job(self, run_id: str) -> dict | None:
        with self._lock:
            snapshot = self._jobs[run_id].snapshot() if run_id in self._jobs else None
        return self._names.named(snapshot) if snapshot else None

    def wait(self, run_id: str, timeout: float | None = None) -> dict:
        with self._lock:
            job = self._jobs[run_id]
        job.done.wait(timeout)
        return job.snapshot()

    def shutdown(self, stop_running: bool = True, timeout: float = 30.0) -> None:
        """Take every queued job off its queue (`stopped`), ask running ones to stop and wait up
        to `timeout` seconds for them; a run still going then is marked `interrupted`. Called at
        interpreter exit (the server stopping); calling it again does nothing more."""
        with self._lock:
            self._closed = True
            for q in self._queues.values():
                while q:
                    self._end_queued(q.popleft(), "stopped: the server shut down")
            if stop_running:
                for job in self._jobs.values():
                    job.stop_event.reason = "the server shut down"  # the run's message says why, not "the user"
                    job.stop_event.set()
                    if job.processes > 1 and job.state == "running":  # a torchrun child: its stop file
                        distributed.request_stop(job.run)             # (the follow thread may not live on)
            self._lock.notify_all()
            workers = list(self._workers.values())
        deadline = time.monotonic() + timeout
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        if not stop_running:
            return
        with self._lock:
            late = [j for j in self._jobs.values() if j.state == "running"]
        for job in late:  # did not reach a batch boundary in time; the process is about to end
            if job.processes > 1 and launched_pid(job.run) is not None:
                continue  # a torchrun child outlives this server: it owns the run and writes its end itself
            job.run.write_status(state="interrupted", ended_at=now_iso(),
                                 message="interrupted: the server shut down before the run could stop"
                                         + resume_clause(job.run.has_checkpoint()))

    # --- the worker ----------------------------------------------------------------------------
    def _work(self, device: str) -> None:
        while True:
            with self._lock:
                queue = self._queues[device]
                while not queue and not self._closed:
                    self._lock.wait(timeout=1.0)
                if not queue:
                    return
                job = queue.popleft()
                job.state, job.message = "running", "starting"
            self._run(job)

    def _run(self, job: Job) -> None:
        if job.processes > 1:
            self._run_torchrun(job)
            return

        job.meter = PhaseMeter(job.config.batch_size)

        def on_event(event: dict) -> None:
            with self._lock:
                job.last_event = event
                job.meter.update(event)
                if "progress" in event:
                    job.progress = float(event["progress"])
                if "message" in event and not job.stop_event.is_set():
                    job.message = event["message"]

        group = job.config.group
        options = {}
        if is_sweep_group(group) and not job.resume:  # a sweep's cells share what their frozen part outputs
            with self._lock:
                options["shared_features"] = self._shared_features.setdefault(group, {})
        try:
            status = self.train_fn(job.config, job.run, on_event=on_event, stop_event=job.stop_event,
                                   resume=job.resume, cache_dir=self.cache_dir, report=job.report, **options)
            state, message = status.get("state", "failed"), status.get("message", "")
        except BaseException as exc:  # noqa: BLE001 - a crashed worker marks its run and keeps serving
            state, message = "failed", f"the worker crashed: {type(exc).__name__}: {exc}"
            try:
                job.run.log(traceback.format_exc())
                job.run.write_status(state=state, message=message, ended_at=now_iso())
            except OSError:
                pass
        with self._lock:
            job.state, job.message = state, message
            release_run(job.run)
            job.done.set()
            self._release_shared(group)
            self._lock.notify_all()


    # --- runs in a torchrun child process --------------------------------------------------------
    def _run_torchrun(self, job: Job) -> None:
        try:
            job.run.write_status(state="queued", message=f"starting {job.processes} processes (torchrun)")
            child = distributed.launch(job.run, job.processes, resume=job.resume, cache_dir=self.cache_dir)
        except Exception as exc:  # noqa: BLE001 - a launch that fails marks its run and keeps serving
            job.run.write_status(state="failed", message=f"could not start torchrun: {type(exc).__name__}: {exc}",
                                 ended_at=now_iso())
            release_run(job.run)
            self._finish(job)
            return
        # The child owns the run from here: launcher.json names it (runs.launched_pid) until its rank 0
        # holds the lock (engine.train), so no other process can take the run in between.
        release_run(job.run)
        self._follow(job, lambda: child.poll() is None)
        child.wait()

    def _adopt(self, run: RunDir) -> bool:
        """A run that a torchrun child of an earlier server still trains: follow it as a job."""
        if launched_pid(run) is None:
            return False
        try:
            config = TrainConfig.from_dict(run.read_config()["config"])
        except (OSError, ValueError, KeyError):
            return False
        job = Job(run.id, run, config, device_key(config.device), state="running", message="running (torchrun)",
                  processes=max(2, config.processes))
        with self._lock:
            self._jobs[run.id] = job
        threading.Thread(target=self._follow, args=(job, lambda: launched_pid(run) is not None),
                         daemon=True, name=f"tuneboard-follow-{run.id}").start()
        return True

    def _follow(self, job: Job, alive: Callable[[], bool]) -> None:
        """Mirror the run's status.json into the job while its process lives; pass Stop on as the
        run's stop file."""
        with self._lock:
            job.state = "running"
            job.meter = PhaseMeter(job.config.batch_size)
        asked, started = False, time.monotonic()
        while alive():
            if job.stop_event.is_set() and not asked:
                distributed.request_stop(job.run)
                asked = True
            status = job.run.read_status(default={})
            with self._lock:
                job.progress = float(status.get("progress", job.progress) or 0.0)
                if status.get("message") and not job.stop_event.is_set():
                    job.message = status["message"]
                job.last_event = {"kind": "batch" if status.get("step") else "prepare",
                                  **{k: status[k] for k in ("progress", "epoch", "step", "eta_s", "images_per_s",
                                                            "message") if k in status},
                                  "elapsed_s": time.monotonic() - started}
                job.meter.update(job.last_event)
            job.stop_event.wait(0.25)
            time.sleep(0.05 if job.stop_event.is_set() else 0.0)
        status = job.run.read_status(default={})
        if status.get("state") in ACTIVE_STATES:  # it died without saying why (killed, out of memory)
            job.run.write_status(state="failed", ended_at=now_iso(),
                                 message="the torchrun processes ended without a result: "
                                         + (distributed.launcher_tail(job.run) or "no output"))
        self._finish(job)

    def _finish(self, job: Job) -> None:
        status = job.run.read_status(default={})
        with self._lock:
            job.state, job.message = status.get("state", "failed"), status.get("message", "")
            job.progress = float(status.get("progress", job.progress) or 0.0)
            job.done.set()
            self._lock.notify_all()


class RunNames:
    """The names users gave runs (meta.json), read again only when the file changes: every open
    page asks for every job's name every second or two."""

    def __init__(self):
        self._lock = threading.Lock()
        self._read: dict[str, tuple[tuple, str]] = {}  # meta.json path: (its version, the name in it)

    def named(self, snapshot: dict) -> dict:
        """A job's snapshot under the name the user gave the run last (meta.json), if any."""
        run = RunDir(snapshot["path"])
        path = run.file(META)
        try:
            st = path.stat()
        except OSError:  # no meta.json: never renamed
            return snapshot
        version = (st.st_mtime_ns, st.st_ino, st.st_size)  # a rename writes a new file (atomic_write_json)
        with self._lock:
            cached = self._read.get(str(path))
        if cached is None or cached[0] != version:
            cached = (version, run.read_meta().get("name") or "")
            with self._lock:
                self._read[str(path)] = cached
        snapshot["name"] = cached[1] or snapshot["name"]
        return snapshot

    def keep_only(self, run_paths: list[str]) -> None:
        """Forget the names of runs the manager no longer lists."""
        kept = {str(RunDir(p).file(META)) for p in run_paths}
        with self._lock:
            self._read = {k: v for k, v in self._read.items() if k in kept}


def _shutdown_at_exit(ref: "weakref.ref[JobManager]") -> None:
    manager = ref()
    if manager is not None:
        manager.shutdown()


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` passes (for tests and scripts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
