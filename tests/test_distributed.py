"""DistributedDataParallel through torchrun: 2 CPU processes (gloo) on tiny data, against one process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY_BACKBONE, tiny_train_config
from finetune_core.distributed import FAIL_VARIABLE, Distributed, shares
from finetune_core.engine import batch_slices, load_checkpoint, tensor_batches, train
from finetune_core.jobs import JobManager, wait_until
from finetune_core.models import head_parameter_names
from finetune_core.runs import RunDir, list_runs


def torchrun(*args: str, env: dict | None = None, timeout: float = 240, wait: bool = True):
    """`python -m torch.distributed.run --standalone --nproc_per_node=2 -m finetune_core ARGS`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "finetune_core", *args]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    if not wait:  # in a session of its own: Ctrl-C goes to the whole group, as from a terminal
        return subprocess.Popen(command, cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    return subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout)


def train_flags(config, runs_dir) -> list[str]:
    flags = ["train", "--runs-dir", str(runs_dir), "--quiet", "--json"]
    for name in ("data", "backbone", "weights", "image_size", "batch_size", "epochs", "lr", "loss_reduction",
                 "eval_batch_size", "device", "train_stages", "feature_views", "momentum", "seed"):
        flags += ["--" + name.replace("_", "-"), str(getattr(config, name))]
    return flags


def only_run(runs_dir) -> RunDir:
    runs = list_runs(runs_dir)
    assert len(runs) == 1, [r.id for r in runs]
    return RunDir(runs[0].path)


# --- pieces, without processes ---------------------------------------------------------------


def test_the_ranks_shares_of_each_batch_make_up_the_one_process_batch():
    inputs, labels = torch.arange(15.0).reshape(15, 1), torch.arange(15)
    order = [3, 1, 4, 10, 5, 9, 2, 6, 8, 0, 7, 14, 11, 13, 12]
    one = [y.tolist() for _, y in tensor_batches(inputs, labels, order, 5, torch.device("cpu"), False)]
    ranks = [[y.tolist() for _, y in tensor_batches(inputs, labels, order, 5, torch.device("cpu"), False, (r, 2))]
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 3  # the same number of steps on every rank
    for step, batch in enumerate(one):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)  # 3 + 2 images of the same 5
        assert not set(ranks[0][step]) & set(ranks[1][step])
    # a last batch with fewer than 2 images per process joins the one before
    assert [s.stop - s.start for s in batch_slices(10, 4, 2)] == [4, 6]
    assert [s.stop - s.start for s in batch_slices(9, 4, 1)] == [4, 5]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_scaled_share_losses_average_to_the_one_process_gradient(reduction):
    """What DDP computes (the average of the ranks' gradients) equals one process's gradient."""
    from finetune_core.engine import batch_loss

    torch.manual_seed(0)
    w = torch.randn(3, 5, requires_grad=True)
    x, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    loss, _ = batch_loss(x @ w.T, y, reduction)
    one = torch.autograd.grad(loss, w)[0]
    grads = []
    for rank in range(2):
        share = Distributed(rank, 2).scaled_loss(lambda lo, la: batch_loss(lo, la, reduction), reduction, [7])
        part_loss, _ = share(x[rank::2] @ w.T, y[rank::2])
        grads.append(torch.autograd.grad(part_loss, w)[0])
    assert torch.allclose((grads[0] + grads[1]) / 2, one, atol=1e-6)


def test_evaluation_blocks_cover_the_split_once():
    assert shares(7, 2) == [4, 3] and shares(1, 3) == [1, 0, 0]
    blocks = [Distributed(r, 3).rows(8) for r in range(3)]
    assert blocks == [(0, 3), (3, 6), (6, 8)]


def test_processes_setting_needs_two_images_per_process(tiny_config):
    errors = tiny_config.replace(processes=8, batch_size=8).validate()
    assert errors["processes"].startswith("Processes need a batch size of at least 16")
    assert "processes" not in tiny_config.replace(processes=2, batch_size=8).validate()


# --- 2 processes through torchrun --------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_make_the_one_process_updates_and_metrics(tiny_dataset, tmp_path, cache_dir):
    """Deterministic setup (the head on cached centre views: no BatchNorm and no random crop in
    what trains): 2 ranks x batch 4 give the updates of 1 process x batch 8, step after step;
    one run folder, world size 2, test accuracy once per epoch. With the default loss reduction,
    sum: the two reductions differ only in how a rank scales its share's loss, which
    test_scaled_share_losses_average_to_the_one_process_gradient checks for both."""
    config = tiny_train_config(tiny_dataset, train_stages="head", feature_views=1, loss_reduction="sum", lr=0.002,
                               momentum=0.9, epochs=2)
    one = train(config, tmp_path / "one", cache_dir=cache_dir)
    assert one["state"] == "completed", one["message"]
    done = torchrun(*train_flags(config, tmp_path / "runs"), env={"TUNEBOARD_CACHE": cache_dir})
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "completed"
    run = only_run(tmp_path / "runs")  # rank 1 wrote nothing
    status, record = run.read_status(), run.read_config()
    assert status["world_size"] == 2 and status["backend"] == "gloo"
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["backend"] == "gloo"
    assert record["config"]["processes"] == 2  # the dashboard resumes it as 2 processes

    single, double = RunDir(tmp_path / "one").read_metrics(), run.read_metrics()
    for kind in ("batch", "epoch"):
        a, b = single[single["kind"] == kind], double[double["kind"] == kind]
        assert len(a) == len(b) == (6 if kind == "batch" else 2)  # 3 steps of 8 images per epoch, 2 epochs
        for column in ("loss", "train_acc") + (("test_loss", "test_acc") if kind == "epoch" else ()):
            assert list(b[column]) == pytest.approx(list(a[column]), rel=1e-4, abs=1e-6), column
    first = load_checkpoint(tmp_path / "one" / "checkpoint_last.pt")["model"]
    second = load_checkpoint(run.file("checkpoint_last.pt"))["model"]
    for name in head_parameter_names(config.backbone):
        assert torch.allclose(second[name], first[name], atol=1e-6), name
    predictions = run.read_predictions()  # the whole test split, gathered from both ranks
    assert len(predictions) == 8 and predictions["path"].is_unique
    assert (predictions["true"] == predictions["predicted"]).mean() == pytest.approx(status["test_acc"])


@pytest.mark.parametrize("where", ["while train() writes its end", "as training ends"])
def test_torchruns_sigterm_landing_anywhere_leaves_the_run_failed_with_the_failing_ranks_message(
        tmp_path, monkeypatch, where):
    """torchrun ends rank 0 with SIGTERM when rank 1 fails; the signal can land while rank 0's
    train() is writing why it failed (seen in CI: the run then stayed `running` for good) or as
    train() has returned and the handler is being disarmed. Either way the run ends `failed` with
    rank 1's message."""
    import argparse
    import contextlib

    from finetune_core import __main__ as cli, engine
    from finetune_core.distributed import Terminated

    class RankZero(Distributed):  # rank 0 of 2, with rank 1's failure published
        def __init__(self):
            super().__init__(rank=0, world_size=2)

        def _peer_failure(self, wait_s):
            return {"rank": 1, "host": "node-b", "message": "planted failure on rank 1", "state": "failed"}

        @contextlib.contextmanager
        def signals(self, stop):
            def disarm():  # the signal arrives just before the handler is disarmed
                if where == "as training ends":
                    raise Terminated("torchrun ended this process (SIGTERM)")
            yield disarm

    run = RunDir(tmp_path / "run")
    run.path.mkdir()

    def fake_train(config, run_dir, **kwargs):
        run_dir.write_status(state="running", message="epoch 1")
        if where == "while train() writes its end":
            raise Terminated("torchrun ended this process (SIGTERM)")
        return run_dir.write_status(state="failed", message="DistBackendError: connection closed by peer")

    monkeypatch.setattr(engine, "train", fake_train)
    args = argparse.Namespace(quiet=True, json=True)
    assert cli.run_to_the_end(None, run, args, distributed=RankZero()) == 1
    status = run.read_status()
    assert status["state"] == "failed"
    assert status["message"] == "rank 1 (node-b) failed: planted failure on rank 1"


@pytest.mark.slow
def test_a_failure_on_rank_1_fails_the_run_with_its_message(tiny_dataset, tmp_path, cache_dir):
    config = tiny_train_config(tiny_dataset, epochs=3)
    start = time.monotonic()
    done = torchrun(*train_flags(config, tmp_path / "runs"), env={FAIL_VARIABLE: "1", "TUNEBOARD_CACHE": cache_dir},
                    timeout=120)
    assert done.returncode != 0
    status = only_run(tmp_path / "runs").read_status()
    assert status["state"] == "failed", (status, done.stderr[-3000:])  # what torchrun and the ranks said
    assert status["message"].startswith("rank 1 (") and "planted failure on rank 1" in status["message"]
    ended = time.monotonic() - start
    assert ended < 90, f"the failure took {ended:.0f} s to end the run"
    assert "rank 1's log" in only_run(tmp_path / "runs").file("log.txt").read_text()  # its traceback


@pytest.mark.slow
def test_ctrl_c_ends_both_ranks_and_the_run_resumes(tiny_dataset, tmp_path, cache_dir):
    """The every-layer path (augmented images, BatchNorm): Ctrl-C (SIGINT to torchrun and its ranks,
    as a terminal sends it) ends both ranks after the same batch, the run `stopped`; `torchrun ...
    resume` continues it to its end. (The dashboard's stop file: the job manager tests.)"""
    config = tiny_train_config(tiny_dataset, epochs=6)
    child = torchrun(*train_flags(config, tmp_path / "runs"), env={"TUNEBOARD_CACHE": cache_dir}, wait=False)
    try:
        assert wait_until(lambda: len(list_runs(tmp_path / "runs")) == 1 and
                          only_run(tmp_path / "runs").read_status(default={}).get("epochs_done", 0) >= 1, 120)
        run = only_run(tmp_path / "runs")
        os.killpg(child.pid, signal.SIGINT)
        asked = time.monotonic()
        child.wait(60)
        stopped_after = time.monotonic() - asked
    finally:
        if child.poll() is None:
            child.kill()
    status = run.read_status()
    assert status["state"] == "stopped" and "(Ctrl-C)" in status["message"], status
    assert stopped_after < 30
    assert status["epochs_done"] < 6 and run.has_checkpoint()

    done = torchrun("resume", str(run.path), "--quiet", "--json", env={"TUNEBOARD_CACHE": cache_dir})
    assert done.returncode == 0, done.stdout + done.stderr
    status = run.read_status()
    assert status["state"] == "completed" and status["world_size"] == 2
    epochs = run.read_metrics().query("kind == 'epoch'")
    assert list(epochs["epoch"]) == list(range(1, 7))


@pytest.mark.slow
def test_the_train_page_runs_two_processes_live_and_a_restart_finds_and_stops_them(dashboard_env):
    """Processes 2 on the Train page starts a torchrun child; a second session (a refresh) shows it
    live from its run folder; a restarted server finds it still running and stops both processes
    (its stop file). (One torchrun launch for what were a page test and a job-manager test: the
    page's Stop calls the same JobManager.stop.) What Resume then does is proven without a second
    launch: the manager relaunches it as 2 processes with --resume
    (test_the_dashboard_resumes_a_two_process_run_as_two_processes), and 2 ranks restore a
    checkpoint and train on to the end (test_ctrl_c_ends_both_ranks_and_the_run_resumes)."""
    from conftest import make_dataset, page
    from test_pages import tiny_recipe, use_folder
    from tuneboard_ui import manager

    data = make_dataset(dashboard_env / "tiny", per_class=12, test_per_class=4)
    at = use_folder(page("pages/1_Train.py").run(), data)
    tiny_recipe(at)
    at.number_input(key="f_epochs").set_value(200)
    at.number_input(key="f_processes").set_value(2)
    at.run()
    assert not at.button(key="train_button").disabled, [e.value for e in at.error]
    at.button(key="train_button").click().run()

    shown = [""]  # what the last look at the page showed

    def live_text() -> str:
        other = page("pages/1_Train.py").run()
        shown[0] = " ".join(str(p.proto.text) for p in other.get("progress")).replace("\\_", "_")  # markdown's escape
        return shown[0]
    def batches_in_status() -> bool:  # the ranks have trained a batch: cheap to read, unlike the page
        runs = list_runs(dashboard_env / "runs")
        return len(runs) == 1 and RunDir(runs[0].path).read_status(default={}).get("images_per_s") is not None
    assert wait_until(batches_in_status, 120, interval=0.2)
    # then the page, once a second (each look runs the whole page: polled back to back, it cost ~15 s of CPU)
    assert wait_until(lambda: "images/s" in live_text(), 60, interval=1.0), shown[0]  # batches, from status.json
    assert TINY_BACKBONE in shown[0] and "epoch" in shown[0]
    run = only_run(dashboard_env / "runs")
    assert run.read_status()["world_size"] == 2 and run.file("launcher.json").exists()

    restarted = JobManager(dashboard_env / "runs", cache_dir=str(dashboard_env / "cache"))  # a server restart
    assert restarted.interrupted == []
    found = restarted.job(run.id)
    assert found is not None and found["state"] == "running"
    assert wait_until(lambda: run.read_status().get("epochs_done", 0) >= 1, 120)  # a checkpoint to resume from
    restarted.stop(run.id)
    assert restarted.wait(run.id, 60)["state"] == "stopped"
    assert manager().wait(run.id, 30)["state"] == "stopped"  # the page's server, which launched it, sees it too
    assert run.read_status()["state"] == "stopped"
    assert wait_until(lambda: subprocess.run(["pgrep", "-f", str(run.path)], capture_output=True).returncode == 1, 30)
    assert run.has_checkpoint() and run.read_config()["config"]["processes"] == 2  # what Resume starts from


def test_the_dashboard_resumes_a_two_process_run_as_two_processes(tiny_dataset, tmp_path, monkeypatch):
    """Resume on a stopped 2-process run launches `torchrun --nproc_per_node=2 ... start RUN --resume`
    (the launch itself recorded instead of made: the ranks' side of a resume is the Ctrl-C test's)."""
    from finetune_core import distributed

    run = RunDir(tmp_path / "runs" / "ddp-run")
    run.path.mkdir(parents=True)
    run.write_config({"config": tiny_train_config(tiny_dataset, processes=2).to_dict()})
    run.write_status(state="stopped", message="stopped by the user")
    launched = []

    class Ended:  # the torchrun child, gone once it has written its end
        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    def launch(run_dir, processes, resume=False, cache_dir=None):
        launched.append(distributed.torchrun_command(run_dir, processes, resume))
        run_dir.write_status(state="completed", message="resumed by the ranks")
        return Ended()

    monkeypatch.setattr(distributed, "launch", launch)
    manager = JobManager(tmp_path / "runs")
    manager.resume(run.id)
    assert manager.wait(run.id, 30)["state"] == "completed"
    assert len(launched) == 1 and "--nproc_per_node=2" in launched[0]
    assert launched[0][-4:] == ["start", str(run.path), "--quiet", "--resume"]
    manager.shutdown()
