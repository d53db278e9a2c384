"""Downloads of a backbone's ImageNet weights as jobs: progress, and a Stop that stops them.

A dashboard run whose weights are in no cache downloads them as its first step, with no progress
and no way to stop only the download. The Train page offers Download instead: a job per backbone
in `WeightsDownloads`, a sibling of jobs.JobManager (a download has no run folder, no device and
no queue, so it is not a training job).

Each download runs `models.download_weights` in a child process, so that Stop ends it at once,
even in the middle of a read (a thread cannot be stopped there); the child reports the bytes so
far and the total through two shared integers, and its outcome through a pipe. huggingface_hub
writes into an `.incomplete` blob that it links into the cache's snapshot only once whole and
checked (torchvision's weights go to a `.part` file renamed once their hash is checked), so a
stopped download never leaves a file that passes as cached; Stop deletes those partial files too
(huggingface_hub would resume one, but a stopped download was not wanted).

The child is started with "spawn": the server has threads, which a fork would copy in whatever
state their locks are. `fetch` is injectable (a module-level function, so the child can import
it): the tests download nothing.
"""
from __future__ import annotations

import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

STOP_WAIT_S = 5.0  # how long Stop waits for the child to end after SIGTERM before it kills it
ACTIVE = "running"


def _fetch_in_child(fetch: Callable, backbone: str, done, total, results) -> None:
    """The child process: run `fetch(backbone, report)` and send ("completed", path) or ("failed",
    a message naming the model) through `results`."""
    def report(so_far: int, size: int | None) -> None:
        done.value, total.value = int(so_far), int(size or 0)

    try:
        path = fetch(backbone, report)
    except BaseException as exc:  # noqa: BLE001 - anything: the parent shows it, naming the model
        results.send(("failed", failure_message(backbone, exc)))
    else:
        results.send(("completed", str(path)))
    finally:
        results.close()


def failure_message(backbone: str, exc: BaseException) -> str:
    """One line that says which model's download failed and why (models' own errors name it)."""
    text = str(exc).strip() or type(exc).__name__
    if backbone in text:
        return text
    return f"The download of {backbone}'s weights failed ({type(exc).__name__}: {text.splitlines()[0]})"


@dataclass
class Download:
    backbone: str
    process: multiprocessing.process.BaseProcess
    done: object   # multiprocessing.Value("q"): bytes so far
    total: object  # multiprocessing.Value("q"): the file's size, 0 while unknown
    state: str = ACTIVE  # running, completed, failed, stopped
    message: str = "starting"
    started: float = field(default_factory=time.monotonic)
    ended: threading.Event = field(default_factory=threading.Event)  # the child is gone, its outcome recorded

    def snapshot(self) -> dict:
        done, total = int(self.done.value), int(self.total.value)
        return {"backbone": self.backbone, "state": self.state, "message": self.message, "bytes": done,
                "total": total or None, "fraction": min(done / total, 1.0) if total else None,
                "seconds": time.monotonic() - self.started}


class WeightsDownloads:
    """One download at a time per backbone: start, follow (`download`), stop."""

    def __init__(self, fetch: Callable | None = None, partial_files: Callable | None = None):
        from . import models

        self.fetch = fetch or models.download_weights
        self.partial_files = partial_files or models.partial_download_files
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._downloads: dict[str, Download] = {}

    def start(self, backbone: str) -> dict:
        """Start downloading `backbone`'s weights (a second Start while one runs is the same one)."""
        with self._lock:
            current = self._downloads.get(backbone)
            if current is not None and current.state == ACTIVE:
                return current.snapshot()
            done, total = self._context.Value("q", 0), self._context.Value("q", 0)
            receive, send = self._context.Pipe(duplex=False)
            process = self._context.Process(target=_fetch_in_child, args=(self.fetch, backbone, done, total, send),
                                            name=f"download {backbone}", daemon=True)
            process.start()
            send.close()  # the child holds the sending end: its exit closes the pipe
            download = Download(backbone, process, done, total, message="downloading")
            self._downloads[backbone] = download
        threading.Thread(target=self._follow, args=(download, receive), daemon=True,
                         name=f"follow download {backbone}").start()
        return download.snapshot()

    def _follow(self, download: Download, receive) -> None:
        """Wait for the child's outcome and record it (a stopped download keeps its own state)."""
        try:
            outcome = receive.recv()
        except (EOFError, OSError):  # ended without a word: stopped, or killed
            outcome = ("failed", f"The download of {download.backbone}'s weights ended unexpectedly "
                                 f"(exit code {download.process.exitcode})")
        finally:
            receive.close()
        download.process.join()  # only here: two threads joining one child race to reap it
        with self._lock:
            if download.state == ACTIVE:
                download.state, download.message = outcome
                if download.state == "completed":
                    download.done.value = max(download.done.value, download.total.value)
                    download.message = f"saved to {outcome[1]}"
        download.ended.set()

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
            download.ended.wait()
        for path in self.partial_files(backbone):
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


MIB = 1024**2  # sizes are shown in MiB, as the _MB environment variables are read (cachestore.megabytes_from_env)


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / MIB:,.1f} MiB"


def progress_text(snapshot: dict) -> str:
    """"12.5 of 88.0 MiB (14%)", or the bytes so far while the size is not known."""
    if snapshot["total"]:
        return f"{snapshot['bytes'] / MIB:,.1f} of {size_text(snapshot['total'])} ({snapshot['fraction']:.0%})"
    return f"{size_text(snapshot['bytes'])} so far"
