"""glibc's malloc settings (finetune_core.memory): what they change, and that every front end
starts Python with them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import serve
from conftest import ROOT
from finetune_core import engine, memory

needs_glibc = pytest.mark.skipif(not memory.supported(), reason="glibc's malloc settings exist on Linux/glibc only")

SIDE = 192  # 38 MB activations: over glibc's largest mmap threshold (32 MiB), so that by default every one
# is a fresh mmap (256 px, 67 MB, showed the same with 1.8 times the page faults to pay for in each probe)
ACTIVATION = 8 * 32 * SIDE * SIDE * 4  # bytes
STEPS, MEASURED_STEPS = 3, 1

# Three training steps of a small conv net on 38 MB activations in a worker thread (where the
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
    x = torch.rand(8, 3, {SIDE}, {SIDE})
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
    in_process = "from finetune_core import memory as m; assert m.tune_in_process()\n" + PROBE  # mallopt, no env
    default, tuned, mallopt = map(last_json, run_together([
        ([sys.executable, "-c", PROBE], clean_env()),
        ([sys.executable, "-c", PROBE], memory.tuned_environ(clean_env())),
        ([sys.executable, "-c", in_process], clean_env())]))
    # By default every step maps fresh zeroed pages for its activations (measured: ~92k faults in
    # the last step); with the settings the freed blocks are reused (measured: 0).
    assert default["faults"] > MEASURED_STEPS * ACTIVATION // 4096, default
    assert tuned["faults"] * 10 < default["faults"], (tuned, default)
    # The same settings set in-process by mallopt (serve.py, the command line): the heap is reused
    # too, but without the tunables' tcache_count=0 it still grows now and then (measured at 256 px: 0 to 49k
    # faults in the last step, against 164k; at 192 px: 0 against 92k).
    assert mallopt["faults"] * 2 < default["faults"], (mallopt, default)
    # ... and release_memory() hands the kept heap back to the system (measured: ~270 MB).
    assert tuned["released"] is True
    assert tuned["rss_kept"] - tuned["rss_after_release"] > 4 * ACTIVATION, tuned
    assert mallopt["released"] is True and mallopt["rss_kept"] - mallopt["rss_after_release"] > 4 * ACTIVATION


@needs_glibc
@pytest.mark.slow
def test_the_command_line_runs_with_the_settings_unless_told_not_to(monkeypatch, capsys):
    # A subprocess is the point here: the settings are made when the command starts.
    info = [sys.executable, "-m", "finetune_core", "info", "--json"]
    on = last_json(run_together([(info, clean_env())])[0])
    assert on["allocator_tuned"] is True
    # Told not to: the same command in this process, as a fresh one starts (nothing tuned, no
    # GLIBC_TUNABLES), instead of a second interpreter (5 s of CPU): with the opt-out,
    # tune_in_process() sets nothing, so what `info` reports is all there is to see.
    import runpy

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv(memory.OPT_OUT_VARIABLE, "default")
    monkeypatch.setattr(memory, "_tuned_in_process", False)
    monkeypatch.setattr(sys, "argv", ["finetune_core", "info", "--json"])
    monkeypatch.delitem(sys.modules, "finetune_core.__main__", raising=False)  # run it afresh, as -m does
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("finetune_core", run_name="__main__")
    off = last_json(capsys.readouterr().out)
    assert exit_.value.code == 0 and memory._tuned_in_process is False
    assert off["allocator_tuned"] is False and "TUNEBOARD_ALLOCATOR=default" in off["allocator"]


def test_the_command_line_sets_the_settings_in_its_own_process(monkeypatch, capsys):
    import runpy

    tuned = []
    monkeypatch.setattr(memory, "tune_in_process", lambda: tuned.append(True) or True)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("the command line must not re-execute Python"))
    monkeypatch.setattr(sys, "argv", ["finetune_core", "runs", "--json"])
    monkeypatch.delitem(sys.modules, "finetune_core.__main__", raising=False)  # run it afresh, as -m does
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("finetune_core", run_name="__main__")
    assert exit_.value.code == 0 and tuned == [True]


def test_serve_starts_streamlit_in_this_process_with_the_settings_and_the_address(monkeypatch, tmp_path):
    from streamlit.web import cli

    calls, tuned = [], []
    monkeypatch.setattr(cli, "main", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(memory, "tune_in_process", lambda: tuned.append(True) or True)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("serve.py must not re-execute Python"))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(serve.ADDRESS_VARIABLE, raising=False)
    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", "my-runs")
    monkeypatch.chdir(tmp_path)
    serve.main(["--server.port", "8600", "--theme.base", "a value with spaces"])
    assert tuned == [True] and "GLIBC_TUNABLES" not in os.environ  # nothing for child processes to inherit
    assert calls == [{"prog_name": "streamlit", "args": ["run", str(ROOT / "app.py"), "--server.address", "127.0.0.1",
                                                         "--runner.postScriptGC", "false", "--server.port", "8600", "--theme.base", "a value with spaces"]}]
    assert os.environ["TUNEBOARD_RUNS_DIR"] == str(tmp_path / "my-runs")  # relative to where it was typed
    assert os.getcwd() == str(ROOT)  # where .streamlit/config.toml is read
    monkeypatch.setenv(serve.ADDRESS_VARIABLE, "0.0.0.0")
    assert serve.streamlit_args([])[2:4] == ["--server.address", "0.0.0.0"]
    assert "--server.address" not in serve.streamlit_args(["--server.address=10.0.0.1"])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_server_listens_on_tuneboard_address_and_ends_cleanly_on_sigterm(tmp_path):
    """A real start: the address comes from TUNEBOARD_ADDRESS, no GLIBC_TUNABLES in the server's
    environment, and SIGTERM ends it through the interpreter's exit, where JobManager.shutdown
    stops the run in progress at its next batch and takes a queued one off the queue: both end
    `stopped`, neither stays `running` or `queued`. (This test also stands for the server that
    exits normally mid-run, which test_processes started a process of its own for.)"""
    import signal
    import time
    import urllib.request

    from finetune_core.runs import RunDir

    port = free_port()
    code = textwrap.dedent(f"""
        import atexit, serve
        from finetune_core.jobs import JobManager
        from finetune_core.config import TrainConfig

        def endless(config, run, on_event=None, stop_event=None, **options):
            run.write_status(state="running")
            while not stop_event.wait(0.05):
                pass
            return run.write_status(state="stopped", message="stopped by the user")

        atexit.register(lambda: print('EXITED CLEANLY', flush=True))
        manager = JobManager({str(tmp_path / "runs")!r}, train_fn=endless)
        config = TrainConfig(data={str(ROOT)!r}, backbone="resnet18", weights="none", device="cpu")
        manager.submit(config.replace(name="first"))
        manager.submit(config.replace(name="second"))  # queued behind the first
        serve.main(['--server.port', '{port}'])
    """)
    env = clean_env(TUNEBOARD_ADDRESS="127.0.0.1", TUNEBOARD_RUNS_DIR=str(tmp_path / "runs"),
                    TUNEBOARD_DATA_ROOT=str(tmp_path / "data"))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, healthy = time.monotonic() + 90, False
        while not healthy and time.monotonic() < deadline and proc.poll() is None:
            try:
                healthy = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200
            except OSError:
                time.sleep(0.5)
        assert healthy, proc.stdout.read() if proc.poll() is not None else "no answer"
        if memory.supported():
            environ = open(f"/proc/{proc.pid}/environ", "rb").read()
            assert b"GLIBC_TUNABLES" not in environ
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"127.0.0.1:{port}" in out and "EXITED CLEANLY" in out, out
    states = {RunDir(run).read_config()["config"]["name"]: RunDir(run).read_status()["state"]
              for run in (tmp_path / "runs").iterdir()}
    assert states == {"first": "stopped", "second": "stopped"}, states


def test_a_run_gives_its_memory_back_when_it_ends(tiny_config, tmp_path, cache_dir, monkeypatch):
    released = []
    monkeypatch.setattr(engine, "release_memory", lambda: released.append(True))
    status = engine.train(tiny_config, tmp_path / "run", cache_dir=cache_dir)
    assert status["state"] == "completed" and released == [True]


def test_tune_in_process_calls_mallopt_once_and_keeps_the_users_tunables(monkeypatch):
    calls = []

    class Mallopt:  # a C function as ctypes hands it out: it takes argtypes and restype
        def __call__(self, param, value):
            calls.append((param, value))
            return 1

    class FakeLibc:
        mallopt = Mallopt()

    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(memory, "supported", lambda: True)
    monkeypatch.setattr(memory, "_tuned_in_process", False)
    monkeypatch.delenv(memory.OPT_OUT_VARIABLE, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    assert memory.tune_in_process() and memory.tune_in_process()
    assert sorted(calls) == sorted([(-4, 0), (-1, -1), (1, 0)])  # M_ARENA_MAX stays the user's 4
    assert memory.is_tuned() and "GLIBC_TUNABLES" in os.environ  # nothing added for children
    monkeypatch.setattr(memory, "_tuned_in_process", False)
    monkeypatch.setenv(memory.OPT_OUT_VARIABLE, "default")
    assert memory.tune_in_process() is False and len(calls) == 3
