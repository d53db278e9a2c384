"""Downloads of a backbone's ImageNet weights as jobs: progress, and a Stop that stops them.

A dashboard run whose weights are in no cache downloads them as its first step, with no progress
and no way to stop only the download. The Train page offers Download instead: a job per backbone
in `WeightsDownloads`, a sibling of jobs.JobManager (a download has no run folder, no device and
no queue, so it is not a training job).

Each download runs `models.download_weights` in a child process (`python -m
finetune_core.downloads FETCH BACKBONE`), so that Stop ends it at once, even in the middle of a
read (a thread cannot be stopped there). The child prints the bytes so far and the total, then
its outcome, one JSON line each; a thread of the server reads them. huggingface_hub writes into an
`.incomplete` blob that it links into the cache's snapshot only once whole and checked
(torchvision's weights go to a `.part` file renamed once their hash is checked), so a stopped
download never leaves a file that passes as cached; Stop deletes those partial files too
(huggingface_hub would resume one, but a stopped download was not wanted).

A new interpreter rather than multiprocessing: its "spawn" start re-imports the parent's
`__main__`, which in a Streamlit server is the page that was running (the Train page, with torch
and the whole dashboard: seconds, and its code run again). `fetch` names the function
("module:function"): the tests give a fake one, and download nothing.
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

STOP_WAIT_S = 5.0  # how long Stop waits for the child to end after SIGTERM before it kills it
ACTIVE = "running"
FETCH = "finetune_core.models:download_weights"
LINE_PREFIX = "tuneboard-download "  # the child's lines that are for the parent (a library may print too)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def failure_message(backbone: str, exc: BaseException) -> str:
    """One line that says which model's download failed and why (models' own errors name it)."""
    text = str(exc).strip() or type(exc).__name__
    if backbone in text:
        return text
    return f"The download of {backbone}'s weights failed ({type(exc).__name__}: {text.splitlines()[0]})"


def _say(message: dict) -> None:
    print(LINE_PREFIX + json.dumps(message), flush=True)


def main(argv: list[str]) -> int:
    """The child: `python -m finetune_core.downloads FETCH BACKBONE` runs fetch(backbone, report)."""
    fetch_name, backbone = argv
    module, _, function = fetch_name.partition(":")
    try:
        path = getattr(importlib.import_module(module), function)(
            backbone, lambda done, total: _say({"bytes": int(done), "total": int(total or 0)}))
    except BaseException as exc:  # noqa: BLE001 - anything: the parent shows it, naming the model
        _say({"failed": failure_message(backbone, exc)})
        return 1
    _say({"completed": str(path)})
    return 0


@dataclass
class Download:
    backbone: str
    process: subprocess.Popen
    bytes: int = 0
    total: int = 0       # the file's size, 0 while unknown
    state: str = ACTIVE  # running, completed, failed, stopped
    message: str = "starting"
    started: float = field(default_factory=time.monotonic)
    ended: threading.Event = field(default_factory=threading.Event)  # the child is gone, its outcome recorded
    partial_before: set = field(default_factory=set)  # partial files there before it started: not its own

    def snapshot(self) -> dict:
        return {"backbone": self.backbone, "state": self.state, "message": self.message, "bytes": self.bytes,
                "total": self.total or None, "fraction": min(self.bytes / self.total, 1.0) if self.total else None,
                "seconds": time.monotonic() - self.started}


class WeightsDownloads:
    """One download at a time per backbone: start, follow (`download`), stop."""

    def __init__(self, fetch: str | None = None, partial_files: Callable | None = None):
        from . import models

        self.fetch = fetch or FETCH
        self.partial_files = partial_files or models.partial_download_files
        self._lock = threading.Lock()
        self._downloads: dict[str, Download] = {}
        atexit.register(_shutdown_at_exit, weakref.ref(self))  # no download child outlives the server

    def start(self, backbone: str) -> dict:
        """Start downloading `backbone`'s weights (a second Start while one runs is the same one)."""
        with self._lock:
            current = self._downloads.get(backbone)
            if current is not None and current.state == ACTIVE:
                return current.snapshot()
            path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]))
            before = set(self.partial_files(backbone))  # another's partial file (a run fetching) is not ours
            process = subprocess.Popen([sys.executable, "-m", "finetune_core.downloads", self.fetch, backbone],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                       errors="replace", env={**os.environ, "PYTHONPATH": path})
            download = Download(backbone, process, message="downloading", partial_before=before)
            self._downloads[backbone] = download
        threading.Thread(target=self._follow, args=(download,), daemon=True,
                         name=f"follow download {backbone}").start()
        return download.snapshot()

    def _follow(self, download: Download) -> None:
        """Read the child's lines until it ends; record its outcome (a stopped download keeps its own).
        Whatever the child prints, the download ends here (`ended` is set), so Stop never waits forever."""
        outcome = None
        try:
            for line in download.process.stdout:
                try:
                    message = json.loads(line[len(LINE_PREFIX):]) if line.startswith(LINE_PREFIX) else None
                except ValueError:
                    message = None  # a garbled line is not progress
                if not isinstance(message, dict):
                    continue
                with self._lock:
                    if "bytes" in message:
                        download.bytes, download.total = message.get("bytes", 0), message.get("total", 0)
                    else:
                        outcome = message
            download.process.wait()
            download.process.stdout.close()
        finally:
            self._record_end(download, outcome)
            download.ended.set()

    def _record_end(self, download: Download, outcome: dict | None) -> None:
        with self._lock:
            if download.state == "stopped" and outcome is not None and "completed" in outcome:
                download.state = ACTIVE  # it finished before Stop reached it: the weights are there, say so
            if download.state == ACTIVE:
                if outcome is not None and "completed" in outcome:
                    download.state, download.message = "completed", f"saved to {outcome['completed']}"
                    download.bytes = max(download.bytes, download.total)
                else:
                    download.state = "failed"
                    download.message = (outcome or {}).get("failed") or (
                        f"The download of {download.backbone}'s weights ended unexpectedly "
                        f"(exit code {download.process.returncode})")

    def stop(self, backbone: str) -> dict | None:
        """End a running download now and delete what it had written: nothing it leaves passes as
        cached weights."""
        with self._lock:
            download = self._downloads.get(backbone)
            if download is None or download.state != ACTIVE:
                return download.snapshot() if download else None
            download.state, download.message = "stopped", "stopped: nothing was kept"
        download.process.terminate()
        if not download.ended.wait(STOP_WAIT_S):
            download.process.kill()
            download.ended.wait(STOP_WAIT_S)
        for path in set(self.partial_files(backbone)) - download.partial_before:  # only what it wrote
            path.unlink(missing_ok=True)
        return download.snapshot()

    def download(self, backbone: str) -> dict | None:
        """The latest download of this backbone (running or ended), or None."""
        with self._lock:
            download = self._downloads.get(backbone)
            return download.snapshot() if download else None

    def active(self) -> list[dict]:
        with self._lock:
            return [d.snapshot() for d in self._downloads.values() if d.state == ACTIVE]

    def shutdown(self) -> None:
        """Stop every running download (the server is exiting)."""
        for snapshot in self.active():
            self.stop(snapshot["backbone"])


def _shutdown_at_exit(ref: "weakref.ref[WeightsDownloads]") -> None:
    downloads = ref()
    if downloads is not None:
        downloads.shutdown()


def launch_refusal(snapshot: dict | None, backbone: str, offline: list[str]) -> str:
    """Why a run of `backbone` with its ImageNet weights is refused before launch ("" if it is not),
    for weights still not on this machine (`models.weights_to_download`): the last download of them
    failed (no network, most often), so the run, which would fetch them as its first step, would
    fail the same way (a first user pressed Train and got that failure). What to do, named."""
    if snapshot is None or snapshot.get("state") != "failed":
        return ""
    return (f"the download of {backbone}'s ImageNet weights failed (the message above says why): press Download "
            f"to try again, choose a backbone whose weights are here ({', '.join(offline) or 'none'}), or set the "
            "weights to 'none (random init)'")


MIB = 1024**2  # sizes are shown in MiB, as the _MB environment variables are read (cachestore.megabytes_from_env)


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / MIB:,.1f} MiB"


def progress_text(snapshot: dict) -> str:
    """"12.5 of 88.0 MiB (14%)", or the bytes so far while the size is not known."""
    if snapshot["total"]:
        return f"{snapshot['bytes'] / MIB:,.1f} of {size_text(snapshot['total'])} ({snapshot['fraction']:.0%})"
    return f"{size_text(snapshot['bytes'])} so far"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
