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

# Four training steps of a small conv net on 67 MB activations in a worker thread (where the
# dashboard trains), counting the page faults of the last three, then the heap before and after
# release_memory().
PROBE = """
import json, resource, threading, torch
from finetune_core import memory
out = {}
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
def work():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, padding=1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.rand(8, 3, 256, 256)
    for i in range(4):
        if i == 1:
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


def probe(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


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
def test_the_settings_stop_the_page_faults_of_large_tensors_in_a_worker_thread():
    default = probe(clean_env())
    tuned = probe(memory.tuned_environ(clean_env()))
    # By default every step maps fresh zeroed pages for its activations (measured: ~880k faults);
    # with the settings the freed blocks are reused (~16k).
    assert default["faults"] > 3 * 67 * 2**20 // 4096, default
    assert tuned["faults"] * 10 < default["faults"], (tuned, default)
    # ... and release_memory() hands the kept heap back to the system.
    assert tuned["rss_kept"] - tuned["rss_after_release"] > 300 * 2**20, tuned


@needs_glibc
def test_the_command_line_restarts_itself_with_the_settings_unless_told_not_to():
    def info(env):
        out = subprocess.run([sys.executable, "-m", "finetune_core", "info", "--json"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert info(clean_env())["allocator_tuned"] is True
    off = info(clean_env(**{memory.OPT_OUT_VARIABLE: "default"}))
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
