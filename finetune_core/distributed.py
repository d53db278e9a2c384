"""Training on several processes with PyTorch DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node=N -m finetune_core train --data DIR ...     (or python -m torch.distributed.run)

torchrun starts N copies of the command and sets RANK, WORLD_SIZE and LOCAL_RANK; `Distributed.from_env()`
joins them into one process group (NCCL on GPUs, gloo on CPUs). The engine asks the `Distributed` it is
given (a single-process one by default, where every method is the identity) at the few places where
DDP differs from one process:

- Each step's batch is the one-process batch (`batch_size` images, the same shuffled order on every
  rank), cut into N interleaved shares: rank r takes images r, r+N, ... So every rank trains on its
  own shard of the training set each epoch, the union is the whole set, and the global batch, the
  learning rate and the loss reduction keep their meaning. DDP averages the gradients over the
  ranks, so each rank's loss is scaled (x N for a summed loss, x N / global batch for a mean) that
  the average is the one-process gradient: N ranks x B/N give the update of 1 x B.
- The trainable part is wrapped in DistributedDataParallel for training only; evaluation runs the
  plain module on a contiguous 1/N of the split on each rank, and the logits are gathered, so the
  whole split is evaluated exactly once and every rank sees the same accuracy (the same best
  checkpoint and early stopping).
- One all_reduce per step carries the running loss, accuracy and image count (the metrics of every
  rank) and the stop flag: a stop request (the run's stop file, read by rank 0; Ctrl-C; another
  rank's request through the rendezvous store) ends every rank after the same batch.
- Only rank 0 writes the run directory (`FollowerRunDir` for the others). A checkpoint to resume
  from and the best checkpoint are read by rank 0 and broadcast, so the other machines need only
  the code and the data.
- A rank that fails publishes its message in the rendezvous store and exits; torchrun then ends
  the others (SIGTERM, turned into `Terminated`), and rank 0 marks the run `failed` with the first
  failing rank's message. Collectives time out after TUNEBOARD_DDP_TIMEOUT_S seconds (default 900).

The dashboard starts such runs as a torchrun child process (`launch`, used by jobs.JobManager) and
follows them through the run directory; `launcher.json` there names the child so that a restarted
server finds it again, and the file `stop_request` asks it to stop.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .runs import APP_DIR, LAUNCH_FILE, RunDir, now_iso

TIMEOUT_VARIABLE = "TUNEBOARD_DDP_TIMEOUT_S"   # how long a rank waits for the others in a collective
DEFAULT_TIMEOUT_S = 900
FAIL_VARIABLE = "TUNEBOARD_DDP_FAIL_RANK"     # fault injection for the tests: this rank raises at its first step
STOP_FILE = "stop_request"                    # in the run directory: the dashboard asks a torchrun run to stop
LAUNCH_LOG = "launcher.log"                   # in the run directory: that child's output
STORE_STOP, STORE_FAILURE = "tuneboard/stop", "tuneboard/failure"
STOP_POLL_S = 0.2                             # how often a rank looks at the stop file and the store


class Terminated(Exception):
    """torchrun ended this rank (SIGTERM): another rank failed, or the launcher was stopped."""


def launched_by_torchrun(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return int(env.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in env


def timeout_s(environ=None) -> float:
    env = os.environ if environ is None else environ
    value = env.get(TIMEOUT_VARIABLE, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_VARIABLE} must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_VARIABLE} must be greater than zero, got {value!r}")
    return seconds


def shares(n: int, world_size: int) -> list[int]:
    """How many of n rows each rank evaluates: contiguous blocks, as equal as they come."""
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


class Distributed:
    """This process's place among the ranks. `Distributed()` is one process alone: every method
    then does what a single process does (nothing to reduce, gather or broadcast)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, backend: str = ""):
        self.rank, self.world_size, self.local_rank, self.backend = rank, world_size, local_rank, backend
        self._wrapped: tuple[str, nn.Module] | None = None
        self.fail_rank = int(os.environ.get(FAIL_VARIABLE, "-1") or -1) if world_size > 1 else -1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- joining and leaving -------------------------------------------------------------------
    @classmethod
    def from_env(cls) -> "Distributed":
        """Join the process group torchrun set up (gloo for CPU tensors, NCCL for CUDA ones when
        this machine has a GPU), or one process alone when not started by torchrun."""
        if not launched_by_torchrun():
            return cls()
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        if cuda and local < torch.cuda.device_count():
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s()))
        return cls(rank, world, local, backend="gloo")

    def close(self) -> None:
        self._wrapped = None
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def device_for(self, device: torch.device) -> torch.device:
        """Each rank's device: the GPU of its local rank on CUDA (NCCL), the CPU otherwise (gloo)."""
        if not self.enabled:
            return device
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this machine but only "
                                   f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU "
                                   "(torchrun --nproc_per_node)")
            self.backend = "nccl"
            return torch.device("cuda", self.local_rank)
        if device.type != "cpu":
            raise RuntimeError(f"DistributedDataParallel runs on CUDA (NCCL) or the CPU (gloo), not on {device}")
        self.backend = "gloo"
        return device

    def _tensor_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    # --- what the run directory records --------------------------------------------------------
    def record(self) -> dict:
        """config.json's `distributed` entry ({} for one process)."""
        if not self.enabled:
            return {}
        return {"distributed": {"world_size": self.world_size, "backend": self.backend or "gloo",
                                "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)),
                                "nodes": int(os.environ.get("GROUP_WORLD_SIZE", 1) or 1),
                                "timeout_s": timeout_s()}}

    def status_fields(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend or "gloo"} if self.enabled else {}

    def check_sizes(self, batch_size: int, n_train: int) -> None:
        """Every rank needs at least 2 images of every batch (BatchNorm in training mode)."""
        if not self.enabled:
            return
        if batch_size < 2 * self.world_size:
            raise ValueError(f"batch size {batch_size} is too small for {self.world_size} processes: each needs at "
                             f"least 2 images of every batch (batch size {2 * self.world_size} or more)")
        if n_train < 2 * self.world_size:
            raise ValueError(f"{n_train} training images are too few for {self.world_size} processes (each needs at "
                             "least 2 per batch)")

    # --- training ------------------------------------------------------------------------------
    def wrap(self, module: nn.Module, key: str) -> nn.Module:
        """The trainable part in DistributedDataParallel (one wrapper at a time: a new one when
        what trains changes, after warm-up)."""
        if not self.enabled:
            return module
        if self._wrapped is None or self._wrapped[0] != key:
            self._wrapped = None  # drop the old wrapper's gradient hooks first
            device_ids = [self.local_rank] if self.backend == "nccl" else None
            self._wrapped = (key, nn.parallel.DistributedDataParallel(module, device_ids=device_ids))
        return self._wrapped[1]

    def scaled_loss(self, loss_fn: Callable, reduction: str, global_sizes: list[int]) -> Callable:
        """loss_fn for this rank's share of each step: DDP averages the ranks' gradients, so the
        share's summed loss is scaled by N (reduction sum) or N / the global batch (mean): the
        average is then the gradient of the one-process loss over the whole batch."""
        if not self.enabled:
            return loss_fn
        sizes = iter(global_sizes)

        def share_loss(logits, labels):
            _, losses = loss_fn(logits, labels)
            n = next(sizes)
            return losses.sum() * (self.world_size / (n if reduction == "mean" else 1)), losses
        return share_loss

    def step_totals(self, stop: bool, loss_sum: float, correct: int, seen: int) -> tuple[bool, float, int, int]:
        """After each step: (whether any rank was asked to stop, and every rank's running loss
        sum, correct count and images seen), in one all_reduce."""
        if not self.enabled:
            return stop, loss_sum, correct, seen
        if self.rank == self.fail_rank:
            raise RuntimeError(f"planted failure on rank {self.rank} ({FAIL_VARIABLE})")
        t = torch.tensor([float(stop), loss_sum, correct, seen], dtype=torch.float64, device=self._tensor_device())
        dist.all_reduce(t)
        total_stop, total_loss, total_correct, total_seen = t.tolist()
        return total_stop > 0, total_loss, int(round(total_correct)), int(round(total_seen))

    # --- evaluation ----------------------------------------------------------------------------
    def rows(self, n: int) -> tuple[int, int]:
        """This rank's contiguous block [start, stop) of a split of n rows."""
        if not self.enabled:
            return 0, n
        counts = shares(n, self.world_size)
        start = sum(counts[:self.rank])
        return start, start + counts[self.rank]

    def gather_rows(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's block of rows (rows()), concatenated in order: the whole split, on every rank."""
        if not self.enabled:
            return part
        counts = shares(n, self.world_size)
        device = self._tensor_device()
        padded = torch.zeros((max(counts), *part.shape[1:]), dtype=part.dtype, device=device)
        padded[:len(part)] = part.to(device)
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded)
        return torch.cat([p[:c] for p, c in zip(pieces, counts)]).cpu()

    # --- rank 0's files, for everyone ----------------------------------------------------------
    def from_main(self, read: Callable[[], object]):
        """What `read()` returns on rank 0 (a checkpoint, whether a file exists), on every rank:
        the other machines need not see the run directory."""
        if not self.enabled:
            return read()
        box = [read() if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._tensor_device())
        return box[0]

    # --- stop and failure ----------------------------------------------------------------------
    def _store(self):
        # The rendezvous store torchrun's agent keeps: it outlives a failed rank, so one rank's
        # message and stop request reach the others even when no collective is running.
        return dist.distributed_c10d._get_default_store()

    def stop_flag(self, run: RunDir) -> "StopFlag":
        return StopFlag(self, run)

    def publish_failure(self, message: str, log: str = "", state: str = "failed") -> dict:
        """Record this rank's failure unless another rank's came first; returns the first one."""
        if not self.enabled:
            return {"rank": self.rank, "message": message, "log": log, "state": state}
        try:
            store = self._store()
            mine = json.dumps({"rank": self.rank, "host": socket.gethostname(), "message": message, "log": log,
                               "state": state})
            first = store.compare_set(STORE_FAILURE, "", mine)
            return json.loads(first.decode() if isinstance(first, bytes) else first)
        except Exception:  # noqa: BLE001 - the store went away with torchrun: keep our own message
            return {"rank": self.rank, "message": message, "log": log, "state": state}

    def settle(self, run: RunDir, status: dict, wait_s: float = 5.0) -> dict:
        """After train() returned on a rank: a failure is published (rank > 0) or, on rank 0,
        the run is marked failed with the first failing rank's message."""
        if not self.enabled or status.get("state") not in ("failed", "diverged"):
            return status
        log = "\n".join(getattr(run, "lines", [])[-40:])
        if not self.is_main:
            self.publish_failure(status.get("message", ""), log, status["state"])
            return status
        if status["state"] != "failed":
            return status
        first = self._peer_failure(wait_s if self._peer_may_report(status) else 0.0)
        if first is None:  # rank 0 failed first: its own message stands
            self.publish_failure(status.get("message", ""))
            return status
        state = first.get("state", "failed")
        message = f"rank {first['rank']} ({first.get('host', '?')}) {state}: {first['message']}"
        if first.get("log"):
            run.log(f"rank {first['rank']}'s log:\n{first['log']}")
        run.log(f"ended {state}: {message}")
        return run.write_status(state=state, message=message)

    def _peer_failure(self, wait_s: float) -> dict | None:
        """Another rank's published failure, waiting up to wait_s for it to arrive."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                store = self._store()
                if store.check([STORE_FAILURE]):
                    value = store.get(STORE_FAILURE)
                    return json.loads(value.decode() if isinstance(value, bytes) else value)
            except Exception:  # noqa: BLE001 - the store went away with torchrun
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    @staticmethod
    def _peer_may_report(status: dict) -> bool:
        """Rank 0's own failure came from the others (a dropped connection, torchrun's SIGTERM)."""
        message = status.get("message", "")
        return message.startswith(("Terminated", "DistBackendError")) or "Connection" in message \
            or "connection" in message

    @contextlib.contextmanager
    def signals(self, stop: "StopFlag"):
        """While training: Ctrl-C asks every rank to stop after the current batch (torchrun passes
        it on); SIGTERM (torchrun ending the ranks) raises Terminated, once. Yields a function that
        ends the training part: a later SIGTERM is then only noted (the failure is being reported)."""
        armed = [True]

        def disarm() -> None:
            armed[0] = False

        if not self.enabled or threading.current_thread() is not threading.main_thread():
            yield disarm
            return

        def on_sigint(signum, frame):
            stop.set(interrupt=True)

        def on_sigterm(signum, frame):
            if armed[0]:
                armed[0] = False
                raise Terminated("torchrun ended this process (SIGTERM): another rank failed or the launch was stopped")

        old = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, on_sigint), (signal.SIGTERM, on_sigterm))}
        try:
            yield disarm
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # --- the run directory ---------------------------------------------------------------------
    def run_dir(self, create: Callable[[], RunDir]) -> RunDir:
        """Rank 0 creates the run folder; every other rank gets a FollowerRunDir of the same path."""
        if not self.enabled:
            return create()
        path = self.from_main(lambda: str(create().path))
        return RunDir(path) if self.is_main else FollowerRunDir(path)

    def follower(self, run: RunDir) -> RunDir:
        return run if self.is_main or not self.enabled or isinstance(run, FollowerRunDir) else FollowerRunDir(run.path)


class StopFlag:
    """A DDP rank's stop request, set by Ctrl-C, by the run's stop file (rank 0 looks for it) or by
    another rank (the rendezvous store). Checked like a threading.Event (`is_set()`)."""

    def __init__(self, distributed: Distributed, run: RunDir):
        self.distributed, self.run = distributed, run
        self.interrupted = False
        self._event = threading.Event()
        self._published = False
        self._last_poll = 0.0

    def set(self, interrupt: bool = False) -> None:
        self.interrupted = self.interrupted or interrupt
        self._event.set()

    def is_set(self) -> bool:
        now = time.monotonic()
        if now - self._last_poll >= STOP_POLL_S:
            self._last_poll = now
            try:
                if self.distributed.is_main and self.run.file(STOP_FILE).exists():
                    self._event.set()
                store = self.distributed._store() if self.distributed.enabled else None
                if store is not None and not self._event.is_set() and store.check([STORE_STOP]):
                    self._event.set()
                if store is not None and self._event.is_set() and not self._published:
                    store.set(STORE_STOP, str(self.distributed.rank))
                    self._published = True
            except (OSError, RuntimeError):
                pass
        return self._event.is_set()


class FollowerRunDir(RunDir):
    """The run directory as a rank other than 0 sees it: it may read (nothing it needs is only
    there), it never writes; its status and log are kept in memory (a failure's log goes to rank 0
    through the store)."""

    def __init__(self, path):
        super().__init__(path)
        self._status: dict = {}
        self.lines: list[str] = []

    def write_config(self, data: dict) -> None:
        pass

    def write_status(self, **fields) -> dict:
        self._status.update(fields)
        return dict(self._status)

    def replace_status(self, status: dict) -> dict:
        self._status = dict(status)
        return dict(self._status)

    def read_status(self, default=None) -> dict:
        return dict(self._status)

    def append_metrics(self, row: dict) -> None:
        pass

    def truncate_metrics(self, max_epoch: float) -> None:
        pass

    def log(self, message: str) -> None:
        self.lines.append(message)

    def write_meta(self, **fields) -> dict:
        return {}


# --------------------------------------------------------------------------------------------
# The dashboard's side: a torchrun child process per run, found again after a restart


def default_processes(config_processes: int, device: str) -> int:
    """How many processes a run uses: the setting, or with 0 (auto) one per GPU when the run is
    on CUDA and this machine has several, else 1."""
    if config_processes:
        return config_processes
    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return torch.cuda.device_count()
    return 1


def torchrun_command(run: RunDir, processes: int, resume: bool = False) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "finetune_core", "start", str(run.path), "--quiet"]
    return command + (["--resume"] if resume else [])


def launch(run: RunDir, processes: int, resume: bool = False, cache_dir: str | None = None) -> subprocess.Popen:
    """Start `torchrun ... -m finetune_core start RUN_DIR` as a child process (its output in
    launcher.log) and record it in launcher.json."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(APP_DIR), env.get("PYTHONPATH", "")) if p)
    if cache_dir:
        env["TUNEBOARD_CACHE"] = str(cache_dir)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    run.file(STOP_FILE).unlink(missing_ok=True)
    command = torchrun_command(run, processes, resume)
    with open(run.file(LAUNCH_LOG), "ab") as log:
        child = subprocess.Popen(command, cwd=APP_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    from .runs import atomic_write_json

    atomic_write_json(run.file(LAUNCH_FILE), {"pid": child.pid, "host": socket.gethostname(), "processes": processes,
                                              "command": command, "started_at": now_iso()})
    return child


def request_stop(run: RunDir) -> None:
    """Ask a torchrun run to stop: rank 0 sees the file within a batch and tells the others."""
    run.file(STOP_FILE).touch()




def launcher_tail(run: RunDir, lines: int = 12) -> str:
    try:
        text = run.file(LAUNCH_LOG).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())
