"""Faults inflicted on purpose: a kill mid-write, a full disk, damaged run folders, hostile
uploads and checkpoints. Each test says what must still hold afterwards."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from conftest import ROOT
from finetune_core.engine import load_checkpoint, train
from finetune_core.runs import RunDir


def hidden_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- a kill and a full disk while the run writes -------------------------------------------------


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
