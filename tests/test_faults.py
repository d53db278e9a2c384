"""Faults inflicted on purpose: a kill mid-write, a full disk, damaged run folders, hostile
uploads and checkpoints. Each test says what must still hold afterwards."""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from conftest import ROOT, TINY_BACKBONE
from finetune_core.engine import load_checkpoint, train
from finetune_core.runs import RunDir


def hidden_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- a kill and a full disk while the run writes -------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX")
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = textwrap.dedent("""
        import os, signal, sys
        import torch
        from torch import nn
        from finetune_core.engine import save_checkpoint

        path = sys.argv[1]
        model = nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        save_checkpoint(path, model, optimizer, 1, 0.5, {}, ["a", "b"])

        def killed_mid_write(obj, f, *args, **kwargs):
            f = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
            f.write(b"PK\\x03\\x04 the first bytes of a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = killed_mid_write
        save_checkpoint(path, model, optimizer, 2, 0.6, {}, ["a", "b"])
    """)
    path = tmp_path / "checkpoint_last.pt"
    done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    ckpt = load_checkpoint(path)  # weights_only=True
    assert ckpt["epoch"] == 1 and ckpt["classes"] == ["a", "b"]


def disk_full(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_while_writing_metrics_fails_the_run_and_keeps_what_was_logged(tiny_config, tmp_path, cache_dir,
                                                                                 monkeypatch):
    real = RunDir.append_metrics
    calls = []

    def append_until_the_disk_is_full(self, row):
        calls.append(row["kind"])
        if len(calls) == 5:  # three batches and the first epoch's row went in; the next is cut short
            with open(self.file("metrics.csv"), "a", encoding="utf-8") as f:
                f.write("batch,1.3")
            raise disk_full(self.file("metrics.csv"))
        real(self, row)

    monkeypatch.setattr(RunDir, "append_metrics", append_until_the_disk_is_full)
    status = train(tiny_config.replace(epochs=2), tmp_path / "run", cache_dir=cache_dir)
    assert status["state"] == "failed"
    assert status["message"].startswith("the disk is full writing ") and "metrics.csv" in status["message"]
    run = RunDir(tmp_path / "run")
    assert run.read_status()["state"] == "failed"
    metrics = run.read_metrics()
    assert list(metrics["kind"]) == ["batch", "batch", "batch", "epoch"]  # the torn row is not read
    assert load_checkpoint(run.file("checkpoint_last.pt"))["epoch"] == 1

    monkeypatch.setattr(RunDir, "append_metrics", real)  # space again: the run resumes on the same file
    status = train(tiny_config.replace(epochs=2), run.path, cache_dir=cache_dir, resume=True)
    assert status["state"] == "completed", status["message"]
    metrics = run.read_metrics()
    assert list(metrics[metrics["kind"] == "epoch"]["epoch"]) == [1, 2]
    assert len(metrics) == 8 and metrics["loss"].notna().all()


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tiny_config, tmp_path, cache_dir, monkeypatch):
    real = torch.save
    saves = []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        saves.append(obj.get("epoch") if isinstance(obj, dict) else None)
        if len(saves) == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # write() names no file
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    status = train(tiny_config.replace(epochs=2), tmp_path / "run", cache_dir=cache_dir)
    assert status["state"] == "failed" and status["message"].startswith("the disk is full"), status["message"]
    run = RunDir(tmp_path / "run")
    assert load_checkpoint(run.file("checkpoint_last.pt"))["epoch"] == 1  # the previous one, whole
    assert [p for p in hidden_files(run.path) if p.endswith(".tmp")] == []  # no half-written file left
    epochs = run.read_metrics().query("kind == 'epoch'")
    assert list(epochs["epoch"]) == [1, 2]  # what was logged before the failure is kept


def test_a_torn_metrics_row_is_skipped_and_the_next_row_starts_on_its_own_line(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"kind": "batch", "epoch": 0.5, "step": 1, "loss": 0.7})
    with open(run.file("metrics.csv"), "a", encoding="utf-8") as f:
        f.write("epoch,1,2,0.6,0.5,0.4,0.9,,,0.01,0.1,55.5,3.2,7,8,9")  # torn and garbled
    run.append_metrics({"kind": "batch", "epoch": 1.5, "step": 3, "loss": 0.5})
    metrics = run.read_metrics()
    assert list(metrics["step"]) == [1, 3] and list(metrics["loss"]) == [0.7, 0.5]
    assert isinstance(pd.read_csv(run.file("metrics.csv"), on_bad_lines="skip"), pd.DataFrame)
    run.truncate_metrics(1.0)
    assert list(run.read_metrics()["step"]) == [1]
    run.file("metrics.csv").write_bytes(b"\xff\xfe\x00\x81 not text")  # not even a header
    assert run.read_metrics().empty


# --- a checkpoint crafted to run code when unpickled ---------------------------------------------


class RunsCode:
    """Unpickling this runs code: it writes the marker file (what an attacker's payload would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the checkpoint ran code')",)


def crafted_checkpoint(path, marker):
    torch.save({"model": {"fc.weight": torch.zeros(2, 512), "payload": RunsCode(marker)}, "epoch": 1,
                "classes": ["cat", "dog"]}, path)
    return path


def test_a_crafted_checkpoint_as_user_weights_runs_nothing_and_is_refused(tmp_path):
    from finetune_core.models import WeightsError, load_weights_file

    marker = tmp_path / "ran"
    evil = crafted_checkpoint(tmp_path / "weights.pt", marker)
    with pytest.raises(WeightsError, match="weights.pt: cannot be loaded as weights") as refused:
        load_weights_file(evil)
    assert "it refers to exec, which loading would have to run" in str(refused.value)
    assert "weights_only=False" not in str(refused.value) and "\n" not in str(refused.value)  # no unsafe advice
    assert not marker.exists()


def test_a_crafted_run_checkpoint_runs_nothing_on_resume_or_predict(dashboard_env, tiny_config, cache_dir):
    from conftest import page
    from finetune_core.predict import PredictError, Predictor

    tmp_path = dashboard_env
    run = RunDir(tmp_path / "runs" / "20260101-000000-crafted")
    train(tiny_config.replace(epochs=1), run.path, cache_dir=cache_dir)
    marker = tmp_path / "ran"
    crafted_checkpoint(run.file("checkpoint_last.pt"), marker)
    with pytest.raises(PredictError, match="checkpoint_last.pt cannot be loaded as a checkpoint"):
        Predictor.from_run(run.path, "last")
    predict = page("pages/3_Predict.py").run()  # the Predict page says so instead of a traceback
    assert not predict.exception, predict.exception
    assert any("cannot be loaded as a checkpoint" in e.value for e in predict.error), [e.value for e in predict.error]
    status = train(tiny_config.replace(epochs=2), run.path, cache_dir=cache_dir, resume=True)
    assert status["state"] == "completed"  # a refused resume: the run's status is put back, with the reason
    assert "not resumed" in status["message"]
    assert "checkpoint_last.pt cannot be loaded as a checkpoint: it refers to exec" in status["message"], \
        status["message"]
    assert "\n" not in status["message"]
    assert not marker.exists()


@pytest.mark.parametrize("as_zip", [False, True])
def test_a_crafted_bundle_runs_nothing_and_is_refused(tmp_path, as_zip):
    import json
    import zipfile

    from finetune_core.predict import PredictError, Predictor

    marker = tmp_path / "ran"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.json").write_text(json.dumps({"backbone": "resnet18", "classes": ["cat", "dog"], "preprocessing": {
        "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}}))
    crafted_checkpoint(bundle / "weights.safetensors", marker)  # a pickle in the safetensors' place
    if as_zip:
        with zipfile.ZipFile(tmp_path / "bundle.zip", "w") as zf:
            for f in bundle.iterdir():
                zf.write(f, f.name)
    before = set(os.listdir(tmp_path))
    import tempfile
    temp_before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(PredictError, match="weights.safetensors is not a safetensors file"):
        Predictor.load(tmp_path / "bundle.zip" if as_zip else bundle)
    assert not marker.exists()
    assert set(os.listdir(tmp_path)) == before
    assert not [n for n in set(os.listdir(tempfile.gettempdir())) - temp_before if n.startswith("tuneboard-bundle")]


# --- damaged run folders -------------------------------------------------------------------------


def damaged_runs(runs, config) -> dict[str, str]:
    """A good run and four copies of it, each damaged one way: {run id: the file the flag names}."""
    import shutil

    good = runs / "20260101-000000-good"
    train(config.replace(name="good"), good, cache_dir="")
    damage = {}

    def copy(name):
        return shutil.copytree(good, runs / name)

    status = copy("20260102-000000-status-truncated") / "status.json"
    status.write_bytes(status.read_bytes()[: status.stat().st_size // 2])
    damage[status.parent.name] = "status.json"
    config_file = copy("20260103-000000-config-unreadable") / "config.json"
    config_file.write_bytes(b"\xff\xfe\x00garbage")
    damage[config_file.parent.name] = "config.json"
    missing = copy("20260104-000000-checkpoint-missing")
    for f in missing.glob("checkpoint_*.pt"):
        f.unlink()
    damage[missing.name] = "checkpoint_last.pt"
    metrics = copy("20260105-000000-metrics-torn") / "metrics.csv"
    metrics.write_bytes(metrics.read_bytes()[:-25])  # the last row cut in half
    damage[metrics.parent.name] = "metrics.csv"
    return damage


def test_damaged_run_folders_are_flagged_by_the_runs_command_and_every_page(dashboard_env, tiny_dataset, capsys):
    import json

    from conftest import page, tiny_train_config
    from finetune_core.__main__ import main as cli_main
    from finetune_core.runs import delete_run, list_runs

    runs = dashboard_env / "runs"
    damage = damaged_runs(runs, tiny_train_config(tiny_dataset, epochs=1))
    infos = {i.id: i for i in list_runs(runs)}
    assert not infos["20260101-000000-good"].error and not infos["20260101-000000-good"].warning
    for run_id, name in damage.items():
        flag = infos[run_id].error or infos[run_id].warning
        assert flag.startswith("damaged run folder") and name in flag, (run_id, flag)
    metrics = RunDir(runs / "20260105-000000-metrics-torn").read_metrics()
    assert list(metrics["kind"]) == list(RunDir(runs / "20260101-000000-good").read_metrics()["kind"])[:-1]

    assert cli_main(["runs", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    for run_id in damage:
        assert (infos[run_id].error or infos[run_id].warning) in out, out
    assert cli_main(["runs", "--runs-dir", str(runs), "--json"]) == 0
    listed = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert all(listed[i]["error"] or listed[i]["warning"] for i in damage)

    home = page("app.py").run()
    assert not home.exception, home.exception
    table = home.dataframe[0].value
    flagged = table[table["message"].str.startswith("damaged run folder")]
    assert len(flagged) == len(damage)
    train_page = page("pages/1_Train.py").run()
    assert not train_page.exception, train_page.exception
    compare = page("pages/2_Compare.py").run()
    assert not compare.exception, compare.exception
    notice = " ".join(w.value for w in compare.warning)
    assert all(run_id in notice for run_id in damage), notice
    assert compare.get("plotly_chart")  # the readable runs, the torn metrics' one among them, are drawn
    predict = page("pages/3_Predict.py").run()
    assert not predict.exception, predict.exception
    offered = predict.selectbox(key="predict_run").options
    assert any("good" in o for o in offered) and any("metrics-torn" in o for o in offered)
    assert not any(run_id in o for o in offered for run_id in list(damage)[:3])

    delete_run(runs / "20260102-000000-status-truncated")  # a damaged folder can still be deleted
    assert not (runs / "20260102-000000-status-truncated").exists()


# --- found by review after the merges -------------------------------------------------------------

def tiny_config(data, **changes):
    from finetune_core.config import TrainConfig

    return TrainConfig(**{**dict(data=str(data), backbone=TINY_BACKBONE, weights="none", image_size=32, batch_size=8,
                                 epochs=2, lr=0.02, loss_reduction="mean", train_stages="1", feature_views=2,
                                 eval_batch_size=16), **changes})


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from conftest import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "tiny", per_class=8, test_per_class=4)


def test_a_resume_past_the_last_epoch_tests_the_averaged_weights_as_the_run_did(small_data, tmp_path):
    """A kill between the last checkpoint and `completed` leaves nothing to train on resume: the
    final test must still use the moving average, as the uninterrupted run did."""
    import shutil

    config = tiny_config(small_data, ema_decay=0.9)
    straight = train(config, tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    RunDir(tmp_path / "resumed").write_status(state="interrupted")
    resumed = train(config, tmp_path / "resumed", resume=True)
    assert straight["state"] == resumed["state"] == "completed"
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], abs=1e-5)
    a = pd.read_csv(tmp_path / "straight" / "predictions.csv")
    b = pd.read_csv(tmp_path / "resumed" / "predictions.csv")
    assert (a["loss"] - b["loss"]).abs().max() < 1e-5


@contextlib.contextmanager
def launched_torchrun_child(run: RunDir, state: str):
    """A run folder as the dashboard leaves it after launching a torchrun child: launcher.json
    naming a live process whose command line names the run (a sleeping Python stands in)."""
    import socket
    from pathlib import Path

    from finetune_core.jobs import wait_until

    run.path.mkdir(parents=True)
    run.write_config({"config": {"name": run.id, "processes": 2}})
    run.write_status(state=state, message="torchrun")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(run.path)])
    try:
        run.file("launcher.json").write_text(f'{{"pid": {child.pid}, "host": "{socket.gethostname()}"}}')
        if Path("/proc").is_dir():  # the child's command line (which names the run) is set once it has started
            assert wait_until(lambda: str(run.path).encode() in Path(f"/proc/{child.pid}/cmdline").read_bytes(), 10)
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_torchrun_child_starting_up_owns_its_run_before_its_rank_0_locks_it(tmp_path):
    """Between the launch (launcher.json) and rank 0's lock, nobody may delete or take the run."""
    from finetune_core.runs import RunOwned, claim_run, delete_run, list_runs, run_owner

    run = RunDir(tmp_path / "runs" / "ddp-run")
    with launched_torchrun_child(run, "queued"):
        assert run_owner(run) is not None
        with pytest.raises(RunOwned):
            delete_run(run.path)
        with pytest.raises(RunOwned, match="torchrun"):
            claim_run(run)
        assert [i.state for i in list_runs(tmp_path / "runs")] == ["queued"]  # not shown as interrupted
    assert run_owner(run) is None  # the child is gone: the run is free again
    delete_run(run.path)
    assert not run.path.exists()


def test_a_stop_request_is_consumed_by_the_run_it_stopped(small_data, tmp_path):
    """A stop file left by the dashboard must not stop the next process that resumes the run. The
    runs here read the file as a torchrun run's rank 0 does (distributed.StopFlag)."""
    from finetune_core.distributed import Distributed, StopFlag, request_stop

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    request_stop(run)  # the dashboard's Stop, as the run starts (read at its first check)
    config = tiny_config(small_data, epochs=1)
    status = train(config, run, stop_event=StopFlag(Distributed(), run))
    assert status["state"] == "stopped", status["message"]  # it read the request...
    assert not run.file("stop_request").exists()  # ...and consumed it
    status = train(config, run, stop_event=StopFlag(Distributed(), run), resume=True)
    assert status["state"] == "completed", status["message"]


def test_a_run_whose_first_write_fails_is_not_left_claimed(small_data, tmp_path, monkeypatch):
    from finetune_core.runs import delete_run, run_owner

    def disk_full(self, **fields):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.file("status.json")))

    monkeypatch.setattr(RunDir, "write_status", disk_full)
    with pytest.raises(OSError):
        train(tiny_config(small_data), tmp_path / "run")
    monkeypatch.undo()
    assert run_owner(RunDir(tmp_path / "run")) is None
    delete_run(tmp_path / "run")


def test_sweep_and_lr_find_refuse_to_run_once_per_torchrun_rank(monkeypatch, capsys):
    from finetune_core.__main__ import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["sweep", "--data", "x", "--lr", "0.1", "--head-lr-mult", "1"]) == 2
    assert main(["lr-find", "--data", "x"]) == 2
    assert capsys.readouterr().err.count("not torchrun") == 2


def test_a_server_shutting_down_asks_its_torchrun_child_to_stop_and_leaves_it_the_last_word(tmp_path):
    """The child outlives the server: the server must not mark the run `interrupted` under it."""
    from finetune_core.config import TrainConfig
    from finetune_core.jobs import Job, JobManager

    manager = JobManager(tmp_path / "runs")
    run = RunDir(tmp_path / "runs" / "ddp-run")
    with launched_torchrun_child(run, "running"):
        manager._jobs[run.id] = Job(run.id, run, TrainConfig(name="ddp-run"), "cpu", processes=2, state="running")
        manager.shutdown(timeout=0.1)
        assert run.file("stop_request").exists()
        assert run.read_status()["state"] == "running"  # the child writes how it ended
