"""The background job manager: queue order, stop, crashes, restarts, concurrent submits."""
from __future__ import annotations

import threading

import pytest

from finetune_core import engine
from finetune_core.config import ConfigError
from finetune_core.jobs import JobManager, wait_until
from finetune_core.runs import RunDir


class FakeTrainer:
    """Stands in for engine.train: records the order runs start in and blocks until released."""

    def __init__(self):
        self.started: list[str] = []
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, config, run, on_event=None, stop_event=None, **options):
        with self.lock:
            self.started.append(config.name)
        run.write_status(state="running")
        while not self.release.is_set():
            on_event({"kind": "batch", "progress": 0.5, "message": "working"})
            if stop_event.wait(0.01):
                return run.write_status(state="stopped", message="stopped by the user")
        if config.name == "boom":
            raise RuntimeError("worker exploded")
        return run.write_status(state="completed", message="done")


@pytest.fixture
def fake():
    return FakeTrainer()


def test_one_job_at_a_time_per_device_in_submission_order(tiny_config, tmp_path, fake):
    mgr = JobManager(tmp_path / "runs", train_fn=fake)
    ids = [mgr.submit(tiny_config.replace(name=f"r{i}", device="cpu")) for i in range(3)]
    assert wait_until(lambda: fake.started == ["r0"])
    states = {j["run_id"]: j for j in mgr.jobs()}
    assert states[ids[0]]["state"] == "running"
    assert [states[i]["queue_position"] for i in ids[1:]] == [1, 2]
    assert RunDir(states[ids[1]]["path"]).read_status()["state"] == "queued"
    fake.release.set()
    for i in ids:
        assert mgr.wait(i, 10)["state"] == "completed"
    assert fake.started == ["r0", "r1", "r2"]


def test_stop_a_running_and_a_queued_job(tiny_config, tmp_path, fake):
    mgr = JobManager(tmp_path / "runs", train_fn=fake)
    first = mgr.submit(tiny_config.replace(name="first", device="cpu"))
    second = mgr.submit(tiny_config.replace(name="second", device="cpu"))
    assert wait_until(lambda: fake.started == ["first"])
    assert mgr.stop(second) == "stopped"
    assert RunDir(mgr.job(second)["path"]).read_status()["state"] == "stopped"
    mgr.stop(first)
    assert mgr.wait(first, 10)["state"] == "stopped"
    assert fake.started == ["first"]  # the queued one never started


def test_a_resumed_run_taken_off_the_queue_says_it_can_still_be_resumed(tiny_config, tmp_path, fake):
    """Stop pressed while a resumed run waits in the queue: it keeps its checkpoint, and its
    message says so instead of "stopped before it started" beside the accuracy it reached."""
    mgr = JobManager(tmp_path / "runs", train_fn=fake)
    first = mgr.submit(tiny_config.replace(name="first", device="cpu"))
    second = mgr.submit(tiny_config.replace(name="second", device="cpu"))
    assert wait_until(lambda: fake.started == ["first"])
    RunDir(mgr.job(second)["path"]).file("checkpoint_last.pt").write_bytes(b"as a resumed run has one")
    mgr.stop(second)
    message = RunDir(mgr.job(second)["path"]).read_status()["message"]
    assert message == "stopped while queued to resume; it can be resumed from its last checkpoint"
    mgr.stop(first)
    mgr.wait(first, 10)


def test_a_crashing_worker_marks_its_run_failed_and_keeps_serving(tiny_config, tmp_path, fake):
    mgr = JobManager(tmp_path / "runs", train_fn=fake)
    fake.release.set()
    boom = mgr.submit(tiny_config.replace(name="boom", device="cpu"))
    after = mgr.submit(tiny_config.replace(name="after", device="cpu"))
    job = mgr.wait(boom, 10)
    assert job["state"] == "failed" and "worker exploded" in job["message"]
    status = RunDir(job["path"]).read_status()
    assert status["state"] == "failed" and "worker exploded" in status["message"]
    assert mgr.wait(after, 10)["state"] == "completed"


def test_a_second_manager_leaves_a_run_its_owner_is_still_training(tiny_config, tmp_path, fake):
    """Before runs had owners, a second manager on the same folder marked this run interrupted
    and offered Resume while the first was still training it: two writers on one folder."""
    mgr = JobManager(tmp_path / "runs", train_fn=fake)
    run_id = mgr.submit(tiny_config.replace(device="cpu"))
    assert wait_until(lambda: fake.started)
    again = JobManager(tmp_path / "runs", train_fn=fake)
    assert again.interrupted == []
    assert RunDir(tmp_path / "runs" / run_id).read_status()["state"] == "running"
    fake.release.set()
    assert mgr.wait(run_id, 10)["state"] == "completed"


def test_shutdown_ends_running_and_queued_runs_stopped(tiny_config, tmp_path, fake):
    mgr = JobManager(tmp_path / "runs", train_fn=fake)
    first = mgr.submit(tiny_config.replace(name="first", device="cpu"))
    second = mgr.submit(tiny_config.replace(name="second", device="cpu"))
    assert wait_until(lambda: fake.started == ["first"])
    mgr.shutdown(timeout=10)
    for run_id in (first, second):
        assert RunDir(tmp_path / "runs" / run_id).read_status()["state"] == "stopped"
    with pytest.raises(RuntimeError, match="shut down"):
        mgr.submit(tiny_config.replace(device="cpu"))


def test_a_run_stopped_by_the_servers_shutdown_says_so_not_stopped_by_the_user(tiny_config, tmp_path):
    mgr = JobManager(tmp_path / "runs")  # the real engine
    run_id = mgr.submit(tiny_config.replace(device="cpu", epochs=200, name="long"))
    run = RunDir(tmp_path / "runs" / run_id)
    assert wait_until(lambda: not run.read_metrics().empty, timeout=120)
    mgr.shutdown(timeout=60)
    status = run.read_status()
    assert status["state"] == "stopped" and status["message"].startswith("stopped: the server shut down")
    assert "by the user" not in status["message"]


def test_shutdown_marks_a_run_that_does_not_stop_in_time_interrupted(tiny_config, tmp_path):
    release = threading.Event()

    def deaf(config, run, on_event=None, stop_event=None, **options):  # never looks at stop_event
        run.write_status(state="running")
        release.wait(30)
        return run.write_status(state="completed")

    mgr = JobManager(tmp_path / "runs", train_fn=deaf)
    run_id = mgr.submit(tiny_config.replace(device="cpu"))
    assert wait_until(lambda: mgr.job(run_id)["state"] == "running")
    mgr.shutdown(timeout=0.2)
    status = RunDir(tmp_path / "runs" / run_id).read_status()
    assert status["state"] == "interrupted" and "shut down" in status["message"]
    release.set()


def test_concurrent_submits_are_all_queued_once(tiny_config, tmp_path, fake):
    mgr = JobManager(tmp_path / "runs", train_fn=fake)
    fake.release.set()
    ids, lock = [], threading.Lock()

    def submit(k):
        run_id = mgr.submit(tiny_config.replace(name=f"c{k}", device="cpu"))
        with lock:
            ids.append(run_id)

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 12
    for i in ids:
        assert mgr.wait(i, 20)["state"] == "completed"
    assert sorted(fake.started) == sorted(f"c{k}" for k in range(12))


def test_bad_settings_are_refused_before_anything_is_created(tiny_config, tmp_path, fake):
    mgr = JobManager(tmp_path / "runs", train_fn=fake)
    with pytest.raises(ConfigError, match="lr"):
        mgr.submit(tiny_config.replace(lr=-1.0))
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_double_click_queues_one_run_and_a_later_click_another(tiny_config, tmp_path, fake, monkeypatch):
    from finetune_core import jobs

    mgr = JobManager(tmp_path / "runs", train_fn=fake)
    first = mgr.submit(tiny_config.replace(name="twice", group="a", device="cpu"))
    with pytest.raises(jobs.DuplicateSubmission, match="twice was queued a moment ago") as refused:
        mgr.submit(tiny_config.replace(name="twice", group="b", device="cpu"))  # each click makes a new group
    assert refused.value.run_id == first
    assert len(list((tmp_path / "runs").iterdir())) == 1
    mgr.submit(tiny_config.replace(name="twice", lr=0.02, device="cpu"))  # other settings: queued
    monkeypatch.setattr(jobs, "DUPLICATE_WINDOW_S", 0.0)  # the same settings later on purpose: queued
    mgr.submit(tiny_config.replace(name="twice", group="c", device="cpu"))
    assert len(list((tmp_path / "runs").iterdir())) == 3
    fake.release.set()


def test_a_rename_shows_in_the_jobs_at_once(tiny_config, tmp_path, fake):
    mgr = JobManager(tmp_path / "runs", train_fn=fake)
    run_id = mgr.submit(tiny_config.replace(name="old name", device="cpu"))
    RunDir(tmp_path / "runs" / run_id).write_meta(name="new name")  # what Compare's Save writes
    assert [j["name"] for j in mgr.jobs()] == ["new name"] and mgr.job(run_id)["name"] == "new name"
    fake.release.set()


@pytest.mark.slow
def test_a_real_run_through_the_manager_then_resume(tiny_config, tmp_path, cache_dir):
    reached_step_4 = threading.Event()

    def train_holding_at_step_4(config, run, on_event=None, stop_event=None, **options):
        """engine.train, except that the first attempt waits at step 4 until it is told to stop:
        the stop then lands mid-run on any machine, however fast."""
        def hold(event):
            on_event(event)
            if event.get("kind") == "batch" and event.get("step") == 4 and not options.get("resume"):
                reached_step_4.set()
                stop_event.wait(60)

        return engine.train(config, run, on_event=hold, stop_event=stop_event, **options)

    mgr = JobManager(tmp_path / "runs", cache_dir=cache_dir, train_fn=train_holding_at_step_4)
    run_id = mgr.submit(tiny_config.replace(epochs=3))  # 3 batches an epoch: step 4 is in epoch 2
    assert reached_step_4.wait(120)
    mgr.stop(run_id)
    job = mgr.wait(run_id, 60)
    assert job["state"] == "stopped", job["message"]
    stopped = RunDir(job["path"]).read_metrics()
    assert stopped[stopped["kind"] == "batch"]["step"].max() == 4
    mgr.resume(run_id)
    job = mgr.wait(run_id, 120)
    assert job["state"] == "completed", job["message"]
    metrics = RunDir(job["path"]).read_metrics()
    assert list(metrics[metrics["kind"] == "epoch"]["epoch"]) == [1, 2, 3]
