"""Resume: a stopped run always resumes from its checkpoint, or is refused with nothing changed.

Each test stops a tiny run after its first epoch (a random-init ResNet-18 at 32 px, on the CPU),
breaks what a resume might need, and resumes it the way a user would (the engine, the command
line, the dashboard's job manager)."""
from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch

from conftest import make_tiny_dataset, tiny_train_config
from finetune_core.__main__ import main
from finetune_core.engine import train
from finetune_core.jobs import JobManager, NotResumable, wait_until
from finetune_core.runs import RESUMABLE_STATES, RunDir, list_runs, run_info


def stopped_after_one_epoch(config, run_dir, **options) -> RunDir:
    """A run of `config` stopped by the user at the end of its first epoch (its checkpoint there)."""
    stop = threading.Event()
    train(config, run_dir, stop_event=stop, on_event=lambda e: e["kind"] == "epoch" and stop.set(), **options)
    run = RunDir(run_dir)
    assert run.read_status()["state"] == "stopped" and run.has_checkpoint()
    return run


def folder_bytes(run: RunDir) -> dict[str, bytes]:
    """Every file of the run folder but its log (a refusal writes why there too), status.json
    (compared on its own) and who owns the run (owner.json: whichever process resumes it)."""
    return {p.name: p.read_bytes() for p in sorted(run.path.iterdir())
            if p.is_file() and p.name not in ("log.txt", "status.json", "owner.json", "owner.lock")}


@pytest.fixture
def data(tmp_path):
    return make_tiny_dataset(tmp_path / "tiny")


@pytest.mark.slow
def test_a_resume_needs_no_starting_weights_in_the_engine_and_the_command_line(data, tmp_path, capsys):
    """Bug 1: the checkpoint replaces the starting weights, so a weights file that has gone since
    (or an ImageNet download that fails offline) must not fail the resume."""
    weights = tmp_path / "start.pt"
    config = tiny_train_config(data, epochs=2)
    torch.save(torch.nn.Linear(1, 1).state_dict(), weights)  # stands in: never read on resume
    first = stopped_after_one_epoch(config.replace(weights="none"), tmp_path / "engine")
    shutil.copytree(first.path, tmp_path / "cli")
    for run_dir in (first.path, tmp_path / "cli"):  # as if the run had started from the file, now gone
        record = RunDir(run_dir).read_config()
        record["config"]["weights"] = str(weights)
        RunDir(run_dir).write_config(record)
    weights.unlink()

    status = train(config.replace(weights=str(weights)), first.path, resume=True)
    assert status["state"] == "completed", status["message"]
    assert main(["resume", str(tmp_path / "cli"), "--quiet"]) == 0, capsys.readouterr()
    assert RunDir(tmp_path / "cli").read_status()["state"] == "completed"
    assert RunDir(tmp_path / "cli").read_config()["config"]["weights"] == str(weights)  # still what it started from


@pytest.mark.slow
def test_a_resume_with_its_dataset_missing_is_refused_and_changes_nothing(data, tmp_path):
    """Bugs 2 and 3: an error before the checkpoint is restored (here the dataset folder is gone)
    leaves the run resumable, says why, and changes no file: status.json's progress and start
    time included (only its message says why). Once the folder is back, the resume works."""
    run = stopped_after_one_epoch(tiny_train_config(data, epochs=2), tmp_path / "runs" / "run")
    status_before, files_before = run.read_status(), folder_bytes(run)
    assert 0 < status_before["progress"] < 1
    shutil.move(data, tmp_path / "elsewhere")

    manager = JobManager(tmp_path / "runs")
    manager.resume(run.id)
    ended = manager.wait(run.id, timeout=60)
    status = run.read_status()
    assert ended["state"] == status["state"] == "stopped", status["message"]
    assert status["message"].startswith("not resumed: ") and "DatasetError" in status["message"]
    assert str(data) in status["message"]  # names the folder it looked for
    assert {**status, "message": None} == {**status_before, "message": None}  # nothing else changed
    assert folder_bytes(run) == files_before
    assert [i.id for i in list_runs(tmp_path / "runs") if i.state in RESUMABLE_STATES] == [run.id]

    shutil.move(tmp_path / "elsewhere", data)
    manager.resume(run.id)
    assert manager.wait(run.id, timeout=60)["state"] == "completed"
    manager.shutdown()


@pytest.mark.slow
def test_a_second_resume_click_or_a_stale_one_is_a_refusal_not_a_traceback(data, tmp_path):
    """Bug 4: resume only a stopped or interrupted run; another state is a message."""
    release = threading.Event()

    def held(config, run, on_event=None, stop_event=None, **options):
        run.write_status(state="running")
        release.wait(30)
        return run.write_status(state="completed", message="done")

    stopped = stopped_after_one_epoch(tiny_train_config(data, epochs=2), tmp_path / "runs" / "run")
    manager = JobManager(tmp_path / "runs", train_fn=held)
    manager.resume(stopped.id)
    with pytest.raises(NotResumable, match="is already (queued|running)"):
        manager.resume(stopped.id)  # the second click
    release.set()
    assert manager.wait(stopped.id, timeout=30)["state"] == "completed"
    with pytest.raises(NotResumable, match="is completed: only a stopped or interrupted run can be resumed"):
        manager.resume(stopped.id)  # a click drawn before it completed
    assert stopped.read_status()["state"] == "completed"
    manager.shutdown()


@pytest.mark.slow
def test_a_single_process_run_resumes_as_one_process_on_a_machine_with_several_gpus(data, tmp_path,
                                                                                     monkeypatch):
    """Bug 5: `processes` is stored as what the run used (1), never as auto, so a resume on a
    machine with GPUs does not relaunch it under torchrun."""
    run = stopped_after_one_epoch(tiny_train_config(data, processes=0), tmp_path / "runs" / "run")
    assert run.read_config()["config"]["processes"] == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    run.write_config({**run.read_config(), "config": {**run.read_config()["config"], "device": "auto"}})
    manager = JobManager(tmp_path / "runs", train_fn=lambda config, run, **options: run.write_status(
        state="stopped", message="not trained here"))
    manager.resume(run.id)
    assert manager.wait(run.id, timeout=30)["processes"] == 1
    run.write_config({**run.read_config(), "config": {**run.read_config()["config"], "processes": 0}})
    run.write_status(state="stopped")  # a run from before `processes` was stored as what it used: auto
    manager.resume(run.id)
    assert manager.wait(run.id, timeout=30)["processes"] == 1
    manager.shutdown()


@pytest.mark.slow
def test_a_resumed_runs_duration_counts_every_segment(data, tmp_path):
    """Home's duration: the wall time of all the run's segments, not its last one only."""
    def slow_first_batch(event):
        if event["kind"] == "batch" and event["step"] == 1:
            import time

            time.sleep(3.0)  # the first segment takes over 3 s; the resumed one about 1 s

    stop = threading.Event()
    config = tiny_train_config(data, epochs=2)
    train(config, tmp_path / "run", stop_event=stop,
          on_event=lambda e: (slow_first_batch(e), e["kind"] == "epoch" and stop.set()))
    train(config, tmp_path / "run", resume=True)
    info = run_info(tmp_path / "run")
    whole = float(RunDir(tmp_path / "run").read_metrics()["elapsed_s"].max())  # the wall-time axis, both segments
    assert info.state == "completed" and whole > 3.0
    assert info.duration_s >= whole - 1.0, (info.duration_s, whole)  # status times are in whole seconds


def test_the_best_checkpoint_is_a_link_that_the_next_last_checkpoint_leaves_alone(tmp_path, monkeypatch):
    from finetune_core.checkpoints import keep_as_best, load_checkpoint, save_checkpoint

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(run.file("checkpoint_last.pt"), model, optimizer, 1, 0.9, {}, ["a", "b"])
    keep_as_best(run)
    best, last = run.file("checkpoint_best.pt"), run.file("checkpoint_last.pt")
    assert os.path.samefile(best, last)  # no second copy of the bytes
    save_checkpoint(last, model, optimizer, 2, 0.9, {}, ["a", "b"])  # the next epoch, not better
    assert load_checkpoint(best)["epoch"] == 1 and load_checkpoint(last)["epoch"] == 2
    assert not os.path.samefile(best, last)

    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # a file system without hard links: a copy
    keep_as_best(run)
    assert load_checkpoint(best)["epoch"] == 2 and not os.path.samefile(best, last)
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoint_best.pt", "checkpoint_last.pt"]


def finished_jobs(manager: JobManager, names: list[str], config) -> list[str]:
    """Queue a run per name through a trainer that completes at once; wait for them all."""
    ids = [manager.submit(config.replace(name=name)) for name in names]
    assert wait_until(lambda: all(manager.job(i)["state"] == "completed" for i in ids), 30)
    return ids


def instant(config, run, **options):
    return run.write_status(state="completed", message="done")


def test_the_job_manager_forgets_old_and_deleted_runs_and_reads_a_name_once(data, tmp_path, monkeypatch):
    """Train -> Live stops listing a deleted run; a long-lived server keeps a bounded history;
    the names of runs (meta.json) are read again only when a rename changed the file."""
    from finetune_core import jobs
    from finetune_core.runs import delete_run

    monkeypatch.setattr(jobs, "FINISHED_JOBS_KEPT", 2)
    manager = JobManager(tmp_path / "runs", train_fn=instant)
    first, second, third = finished_jobs(manager, ["a", "b", "c"], tiny_train_config(data))
    assert [j["run_id"] for j in manager.jobs()] == [second, third]  # the oldest is forgotten

    delete_run(RunDir(tmp_path / "runs" / second).path)
    assert [j["run_id"] for j in manager.jobs()] == [third]  # a deleted run leaves the Live view

    RunDir(tmp_path / "runs" / third).write_meta(name="renamed")
    reads = []
    real_read_meta = RunDir.read_meta
    monkeypatch.setattr(RunDir, "read_meta", lambda self: reads.append(self.id) or real_read_meta(self))
    assert [j["name"] for j in manager.jobs()] == ["renamed"]
    assert [j["name"] for j in manager.jobs()] == ["renamed"]
    assert reads == [third]  # once, not on every refresh
    RunDir(tmp_path / "runs" / third).write_meta(name="again")
    assert [j["name"] for j in manager.jobs()] == ["again"]
    manager.shutdown()


def test_two_quick_start_clicks_an_hour_apart_are_two_groups():
    from finetune_core.config import quick_start_config

    first, later = (quick_start_config("/data/digits", ["efficientnet_lite0"]) for _ in range(2))
    assert first.group.startswith("quick-start") and later.group.startswith("quick-start")
    assert first.group != later.group


@pytest.mark.slow
def test_a_stale_resume_click_on_the_train_page_is_a_message(dashboard_env):
    """The page drew a stopped run's Resume button; the run completed elsewhere before the click."""
    from conftest import page

    data = make_tiny_dataset(dashboard_env / "tiny")
    run = stopped_after_one_epoch(tiny_train_config(data, epochs=2), dashboard_env / "runs" / "run")
    at = page("pages/1_Train.py").run()
    assert not at.exception, at.exception
    run.write_status(state="completed", message="finished from the command line")
    at.button(key=f"resume-{run.id}").click().run()
    assert not at.exception, at.exception
    assert any("Not resumed" in w.value and "is completed" in w.value for w in at.warning), \
        [w.value for w in at.warning]
    assert run.read_status()["state"] == "completed"


@pytest.mark.slow
def test_a_resumed_run_with_dropout_equals_its_uninterrupted_self(data, tmp_path):
    """The run's own dropout stream, reseeded from (seed, epoch) each epoch: a resume draws what
    the uninterrupted run drew (MobileNet-V3 has dropout before its head)."""
    config = tiny_train_config(data, backbone="mobilenet_v3_large", train_stages="all", epochs=2)
    train(config, tmp_path / "straight")
    stopped_after_one_epoch(config, tmp_path / "resumed")
    torch.rand(1000)  # whatever the process draws in between
    assert train(config, tmp_path / "resumed", resume=True)["state"] == "completed"
    losses = [RunDir(tmp_path / name).read_metrics().query("kind == 'epoch'")["loss"].tolist()
              for name in ("straight", "resumed")]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-6)
