"""Runs and the processes that write them: ownership across processes, a writer killed with
SIGKILL, the server stopping, many runs submitted at once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import ROOT, tiny_train_config
from finetune_core.__main__ import main
from finetune_core.jobs import JobManager
from finetune_core.runs import RunDir, RunOwned, delete_run, list_runs, mark_interrupted, run_info, run_owner


def child(code: str) -> subprocess.Popen:
    """A Python process running `code` (with the project importable), its stdout piped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNEBOARD_ALLOCATOR": "default", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, expected: str, timeout: float = 120) -> None:
    line = ""
    deadline = time.monotonic() + timeout
    while expected not in line:
        assert proc.poll() is None, f"the child ended: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"no '{expected}' from the child"
        line = proc.stdout.readline()


@pytest.fixture
def killed():
    """Child processes to SIGKILL at the end of the test, whatever happens."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(30)


@pytest.mark.slow
def test_a_run_another_process_writes_is_left_alone_until_that_process_is_gone(tiny_config, tmp_path, killed,
                                                                               capsys):
    runs = tmp_path / "runs"
    run = RunDir(runs / "20260101-000000-cli")
    run.path.mkdir(parents=True)
    run.write_config({"config": tiny_config.to_dict()})
    owner = child(f"""
        import time
        from finetune_core.runs import RunDir, claim_run
        run = RunDir({str(run.path)!r})
        claim_run(run)
        run.write_status(state="running", message="epoch 1/5")
        print("owned", flush=True)
        time.sleep(120)
    """)
    killed.append(owner)
    wait_for_line(owner, "owned")

    info = run_info(run.path)  # shows as running, from its files, with who writes it
    assert info.state == "running" and f"process {owner.pid} on " in info.owner
    assert run_owner(run)["pid"] == owner.pid
    mgr = JobManager(runs)  # a server starting meanwhile
    assert mgr.interrupted == [] and run.read_status()["state"] == "running"
    with pytest.raises(RunOwned, match=f"process {owner.pid}"):
        mgr.resume(run.id)
    with pytest.raises(RunOwned, match="stop it before deleting it"):
        delete_run(run.path)
    assert main(["resume", str(run.path), "--quiet"]) == 2  # the command line refuses too
    assert f"process {owner.pid}" in capsys.readouterr().err
    assert run.read_status()["state"] == "running"

    owner.send_signal(signal.SIGKILL)
    owner.wait(30)
    assert run_owner(run) is None
    assert run_info(run.path).state == "interrupted"  # listed so at once, before anyone writes it
    assert mark_interrupted(runs) == [run.id]
    assert run.read_status()["state"] == "interrupted"
    delete_run(run.path)
    assert not run.path.exists()


@pytest.mark.slow
def test_a_claim_is_refused_while_another_process_holds_the_run(tmp_path, killed):
    run = RunDir(tmp_path / "run")
    owner = child(f"""
        import time
        from finetune_core.runs import RunDir, claim_run
        claim_run(RunDir({str(run.path)!r}))
        print("owned", flush=True)
        time.sleep(120)
    """)
    killed.append(owner)
    wait_for_line(owner, "owned")
    started = time.monotonic()
    with pytest.raises(RunOwned, match=f"process {owner.pid}"):
        from finetune_core.engine import train  # the library refuses too, before writing
        train(tiny_train_config(tmp_path / "nowhere"), run)
    assert time.monotonic() - started < 10
    assert not run.file("status.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX")
def test_sigkill_mid_run_leaves_an_interrupted_run_that_resumes_to_the_same_end(tiny_config, tmp_path, killed,
                                                                                  cache_dir):
    """A server process (its JobManager) is killed in epoch 2 of 3: a new one finds the run
    interrupted, every metric row written before the kill is there, the epoch-1 checkpoint
    loads, and Resume finishes it with the same 3 epochs."""
    from finetune_core.engine import load_checkpoint

    runs = tmp_path / "runs"
    config = tiny_config.replace(epochs=3, name="killed")  # 3 batches an epoch: step 5 is in epoch 2
    server = child(f"""
        import threading
        from finetune_core import engine
        from finetune_core.config import TrainConfig
        from finetune_core.jobs import JobManager

        def train_holding_at_step_5(config, run, on_event=None, **options):
            def hold(event):
                on_event(event)
                if event.get("kind") == "batch" and event.get("step") == 5:
                    print("step 5", flush=True)
                    threading.Event().wait(120)  # the kill lands here, after the row is written
            return engine.train(config, run, on_event=hold, **options)

        mgr = JobManager({str(runs)!r}, cache_dir="", train_fn=train_holding_at_step_5)
        mgr.submit(TrainConfig.from_dict({config.to_dict()!r}))
        threading.Event().wait(300)
    """)
    killed.append(server)
    wait_for_line(server, "step 5")
    (run_path,) = [p for p in runs.iterdir() if p.is_dir()]
    run = RunDir(run_path)
    logged = run.file("metrics.csv").read_text()
    server.send_signal(signal.SIGKILL)
    server.wait(30)

    mgr = JobManager(runs, cache_dir=cache_dir)  # the restart
    assert mgr.interrupted == [run.id]
    status = run.read_status()
    assert status["state"] == "interrupted" and "can be resumed" in status["message"]
    assert run.file("metrics.csv").read_text() == logged
    metrics = run.read_metrics()
    assert list(metrics[metrics["kind"] == "batch"]["step"]) == [1, 2, 3, 4, 5]
    assert load_checkpoint(run.file("checkpoint_last.pt"))["epoch"] == 1
    assert [i.id for i in list_runs(runs) if i.state == "interrupted" and i.has_checkpoint] == [run.id]

    mgr.resume(run.id)
    job = mgr.wait(run.id, 120)
    assert job["state"] == "completed", job["message"]
    metrics = run.read_metrics()
    assert list(metrics[metrics["kind"] == "epoch"]["epoch"]) == [1, 2, 3]
    assert list(metrics[metrics["kind"] == "batch"]["step"]) == list(range(1, 10))
    assert run.read_config()["config"]["epochs"] == 3


@pytest.mark.slow
def test_runs_submitted_at_once_queue_in_order_and_keep_their_own_state(tiny_dataset, tmp_path, cache_dir):
    """Four tiny real runs from four threads (four browser sessions): one trains at a time on the
    device, they start in the order they were queued, all complete, and each run's folder holds
    its own settings and its own metrics. (Twelve concurrent submits are queued once each in
    test_jobs, with a stand-in trainer.)"""
    from finetune_core import engine

    n_runs = 4
    running, most, order, lock = [0], [0], [], threading.Lock()

    def counted(config, run, **options):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            order.append(run.id)
        try:
            return engine.train(config, run, **options)
        finally:
            with lock:
                running[0] -= 1

    mgr = JobManager(tmp_path / "runs", cache_dir=cache_dir, train_fn=counted)
    configs = {k: tiny_train_config(tiny_dataset, name=f"run{k}", lr=0.001 * (k + 1), seed=k, epochs=1 + k % 2)
               for k in range(n_runs)}
    ids: dict[int, str] = {}
    start = threading.Barrier(n_runs)

    def submit(k):
        start.wait()
        ids[k] = mgr.submit(configs[k])

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(n_runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queued = [j["run_id"] for j in mgr.jobs()]  # the order the manager queued them in
    for k, run_id in ids.items():
        assert mgr.wait(run_id, 300)["state"] == "completed", k
    assert most[0] == 1 and order == queued and len(set(ids.values())) == n_runs
    for k, run_id in ids.items():
        run = RunDir(tmp_path / "runs" / run_id)
        saved = run.read_config()["config"]
        assert (saved["name"], saved["lr"], saved["seed"], saved["epochs"]) == (f"run{k}", 0.001 * (k + 1), k,
                                                                               1 + k % 2)
        metrics = run.read_metrics()
        assert list(metrics[metrics["kind"] == "epoch"]["epoch"]) == list(range(1, 2 + k % 2))
        assert set(metrics["lr"].dropna()) == {0.001 * (k + 1)}
        assert run.read_status()["state"] == "completed" and run_owner(run) is None
