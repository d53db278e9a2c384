"""glibc malloc settings that keep freed memory for reuse: up to ~2x faster CPU training on Linux.

Why: glibc's malloc serves every request over 32 MB (in threads other than the main one, over
64 MB, whatever the settings) with a fresh ``mmap`` and returns it with ``munmap`` on free. A
training step allocates and frees gigabytes of activations, so the kernel faults in and zero-fills
millions of pages per epoch. ``benchmarks/bench_step.py`` shows it: at batch 128 and 224 px, half
of an EfficientNet-Lite0 step's time on a 2-core CPU is spent in the kernel doing exactly that.

The cure is glibc's own tunables: no mmap for large blocks, one arena (so the dashboard's worker
threads allocate from the main heap, where that rule holds), a high trim threshold (so the heap is
not handed back between steps), and no small-block caches (so freed blocks merge and are reused).
The cost: the heap keeps its high-water mark while a run lasts (for the book's recipe, 14.6 GB
instead of a peak of 11.8), and the first epoch pays the page faults once.

The front ends set them in their own process with ``mallopt`` (``tune_in_process``) before any
thread starts: ``serve.py`` for the dashboard, ``python -m finetune_core`` for the command line.
Nothing is re-executed (which Windows cannot do) and no environment variable carries the settings
into child processes. ``mallopt`` has no switch for the per-thread cache (``tcache_count``): a few
hundred MB more stay resident than with ``GLIBC_TUNABLES``, for the same speed (bench_step.py).
``GLIBC_TUNABLES`` (``tuned_environ``, which glibc reads only when a process starts) remains for
benchmarks that compare the two in child processes. After a run, ``release_memory()`` gives the
freed heap back to the system.

``TUNEBOARD_ALLOCATOR=default`` keeps glibc's own behaviour. Nothing here imports torch.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Mapping

TUNABLES: dict[str, str] = {
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.trim_threshold": str(1 << 36),
    # No per-thread cache and no fast bins: the few bytes posix_memalign cuts off each tensor are
    # then merged back at once, so a freed activation fits the next one of its size. Measured on
    # the book's recipe (Lite0, batch 128): 14.1 GB instead of 18.0 GB resident, same speed.
    "glibc.malloc.tcache_count": "0",
    "glibc.malloc.mxfast": "0",
}
# The same settings for mallopt(3), which applies them to the running process:
# tunable -> (mallopt parameter, value). tcache_count has no mallopt parameter.
MALLOPT: dict[str, tuple[int, int]] = {
    "glibc.malloc.mmap_max": (-4, 0),          # M_MMAP_MAX
    "glibc.malloc.arena_max": (-8, 1),         # M_ARENA_MAX: set before any thread starts: one heap for all
    "glibc.malloc.trim_threshold": (-1, -1),   # M_TRIM_THRESHOLD: glibc reads -1 as the largest size: never trim
    "glibc.malloc.mxfast": (1, 0),             # M_MXFAST
}
_tuned_in_process = False
OPT_OUT_VARIABLE = "TUNEBOARD_ALLOCATOR"


def supported() -> bool:
    """True on Linux with glibc, the only place these settings mean anything."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _parse(value: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in value.split(":") if "=" in item)
    return {name: setting for name, setting in pairs}


def untuned_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default: this process's) in which a child starts with glibc's own
    settings: no GLIBC_TUNABLES, no opt-out (benchmarks compare both)."""
    env = dict(os.environ if environ is None else environ)
    for name in ("GLIBC_TUNABLES", OPT_OUT_VARIABLE):
        env.pop(name, None)
    return env


def tuned_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default: this process's) with Tuneboard's tunables added to
    GLIBC_TUNABLES. A tunable the user already set keeps the user's value."""
    env = dict(os.environ if environ is None else environ)
    current = env.get("GLIBC_TUNABLES", "")
    have = _parse(current)
    extra = [f"{name}={value}" for name, value in TUNABLES.items() if name not in have]
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [current, *extra]))
    return env


def is_tuned(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a process started with ``environ`` runs with Tuneboard's settings."""
    if environ is None and _tuned_in_process:
        return True
    env = os.environ if environ is None else environ
    have = _parse(env.get("GLIBC_TUNABLES", ""))
    return all(have.get(name) == value for name, value in TUNABLES.items())


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the settings apply and were not turned off with TUNEBOARD_ALLOCATOR=default."""
    env = os.environ if environ is None else environ
    return supported() and env.get(OPT_OUT_VARIABLE, "").strip().lower() != "default"


def tune_in_process() -> bool:
    """Apply the settings to this process with mallopt(3), once, when they are wanted: no re-exec,
    no environment variable for child processes to inherit. Call it before any thread starts (a
    thread that started earlier keeps its own arena). A setting the user gave in GLIBC_TUNABLES
    keeps the user's value. True when they are in force."""
    global _tuned_in_process
    if _tuned_in_process or not wanted():
        return _tuned_in_process
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    users = _parse(os.environ.get("GLIBC_TUNABLES", ""))
    _tuned_in_process = all(mallopt(param, value) == 1 for name, (param, value) in MALLOPT.items()
                            if name not in users)
    return _tuned_in_process


def release_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``); False where there is
    nothing to call. Cheap, and safe to call at any time from any thread."""
    if not supported():
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def describe(environ: Mapping[str, str] | None = None) -> str:
    """One line for the dashboard and the run log."""
    if not supported():
        return "system allocator"
    if is_tuned(environ):
        return "memory: glibc keeps freed memory (fast CPU training)"
    if not wanted(environ):
        return f"memory: glibc defaults ({OPT_OUT_VARIABLE}=default)"
    return ("memory: glibc defaults; CPU training is up to 2x slower: start with `python serve.py` "
            "(dashboard) or `python -m finetune_core` (command line)")
