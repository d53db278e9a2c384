"""glibc's malloc settings (finetune_core.memory): what they change, and that every front end
starts Python with them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import serve
from conftest import ROOT
from finetune_core import engine, memory

needs_glibc = pytest.mark.skipif(not memory.supported(), reason="glibc's malloc settings exist on Linux/glibc only")

ACTIVATION = 8 * 32 * 256 * 256 * 4  # bytes: 67 MB, over glibc's 32 MB mmap threshold
STEPS, MEASURED_STEPS = 3, 1

# Three training steps of a small conv net on 67 MB activations in a worker thread (where the
# dashboard trains), counting the page faults of the last one (the first two fault the heap in
# once whatever the settings), then the heap before and after release_memory(). The convolutions
# are 1x1 so that the arithmetic stays small: what is measured is the allocator, not the maths.
PROBE = f"""
import json, resource, threading, torch
from finetune_core import memory
out = {{}}
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
def work():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.rand(8, 3, 256, 256)
    for i in range({STEPS}):
        if i == {STEPS - MEASURED_STEPS}:
            out['faults_before'] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    out['faults'] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - out['faults_before']
    del net, opt, x
    out['rss_kept'] = rss()
    out['released'] = memory.release_memory()
    out['rss_after_release'] = rss()
t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps(out))
"""


def clean_env(**extra) -> dict:
    return {**memory.untuned_environ(), **extra}


def run_together(commands: list[tuple[list[str], dict]]) -> list[str]:
    """Start the processes at once (each imports torch: seconds), wait for all; their stdouts."""
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv, env in commands]
    outputs = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, stderr
        outputs.append(stdout)
    return outputs


def last_json(stdout: str) -> dict:
    return json.loads(stdout.splitlines()[-1])


def test_tuned_environ_adds_the_settings_and_keeps_the_users_own():
    env = memory.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "HOME": "/h"})
    have = dict(item.split("=", 1) for item in env["GLIBC_TUNABLES"].split(":"))
    assert have["glibc.malloc.arena_max"] == "4"  # the user's value wins
    assert have["glibc.malloc.mmap_max"] == "0" and env["HOME"] == "/h"
    assert not memory.is_tuned(env)  # one arena per thread again: not Tuneboard's settings
    assert memory.is_tuned(memory.tuned_environ({}))
    assert not memory.is_tuned({})
    plain = memory.untuned_environ({**env, memory.OPT_OUT_VARIABLE: "default"})
    assert plain == {"HOME": "/h"}  # what a benchmark's "glibc defaults" child starts with


@needs_glibc
@pytest.mark.slow
def test_the_settings_stop_the_page_faults_of_large_tensors_in_a_worker_thread():
    # Two processes: glibc reads its settings only when a process starts.
    default, tuned = map(last_json, run_together([([sys.executable, "-c", PROBE], clean_env()),
                                                  ([sys.executable, "-c", PROBE], memory.tuned_environ(clean_env()))]))
    # By default every step maps fresh zeroed pages for its activations (measured: ~164k faults in
    # the last step); with the settings the freed blocks are reused (measured: 0).
    assert default["faults"] > MEASURED_STEPS * ACTIVATION // 4096, default
    assert tuned["faults"] * 10 < default["faults"], (tuned, default)
    # ... and release_memory() hands the kept heap back to the system (measured: ~390 MB).
    assert tuned["released"] is True
    assert tuned["rss_kept"] - tuned["rss_after_release"] > 4 * ACTIVATION, tuned


@needs_glibc
@pytest.mark.slow
def test_the_command_line_restarts_itself_with_the_settings_unless_told_not_to():
    # A subprocess is the point here: the command re-executes its own interpreter.
    info = [sys.executable, "-m", "finetune_core", "info", "--json"]
    on, off = map(last_json, run_together([(info, clean_env()),
                                           (info, clean_env(**{memory.OPT_OUT_VARIABLE: "default"}))]))
    assert on["allocator_tuned"] is True
    assert off["allocator_tuned"] is False and "TUNEBOARD_ALLOCATOR=default" in off["allocator"]


def test_reexec_happens_once_and_only_when_wanted(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.setattr(memory, "supported", lambda: True)
    for name in ("GLIBC_TUNABLES", memory.OPT_OUT_VARIABLE, "TUNEBOARD_REEXECUTED"):
        monkeypatch.delenv(name, raising=False)
    memory.reexec_tuned(["python", "-m", "finetune_core", "train"])
    (exe, argv, env), = calls
    assert exe == sys.executable and argv[-2:] == ["finetune_core", "train"]
    assert memory.is_tuned(env) and env["TUNEBOARD_REEXECUTED"] == "1"
    monkeypatch.setenv("TUNEBOARD_REEXECUTED", "1")  # glibc ignored it: never loop
    memory.reexec_tuned(["x"])
    monkeypatch.delenv("TUNEBOARD_REEXECUTED")
    monkeypatch.setenv(memory.OPT_OUT_VARIABLE, "default")
    memory.reexec_tuned(["x"])
    assert len(calls) == 1


def test_serve_starts_streamlit_on_app_py_with_the_settings(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.setattr(memory, "supported", lambda: True)
    monkeypatch.delenv(memory.OPT_OUT_VARIABLE, raising=False)
    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", "my-runs")
    monkeypatch.chdir(tmp_path)
    serve.main(["--server.port", "8600"])
    (exe, argv, env), = calls
    assert argv[1:5] == ["-m", "streamlit", "run", str(ROOT / "app.py")] and argv[-2:] == ["--server.port", "8600"]
    assert memory.is_tuned(env)
    assert env["TUNEBOARD_RUNS_DIR"] == str(tmp_path / "my-runs")  # relative to where it was typed
    assert os.getcwd() == str(ROOT)  # where .streamlit/config.toml (127.0.0.1) is read


def test_a_run_gives_its_memory_back_when_it_ends(tiny_config, tmp_path, cache_dir, monkeypatch):
    released = []
    monkeypatch.setattr(engine, "release_memory", lambda: released.append(True))
    status = engine.train(tiny_config, tmp_path / "run", cache_dir=cache_dir)
    assert status["state"] == "completed" and released == [True]
