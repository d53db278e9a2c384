"""The command line, called in-process (`main([...])`) except where a fresh interpreter is the point."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_BACKBONE
from finetune_core.__main__ import ProgressBar, build_parser, config_from_args, main
from finetune_core.config import PRESETS
from finetune_core.runs import default_runs_dir


def train_args(*args: str) -> list[str]:
    return ["train", *args]


@pytest.fixture
def runs_env(tmp_path, monkeypatch):
    """TUNEBOARD_RUNS_DIR set, as the dashboard's is; the command line must use it too."""
    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("TUNEBOARD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "runs"


def test_flags_follow_the_settings_and_a_preset(tmp_path):
    parse = build_parser().parse_args
    config = config_from_args(parse(train_args("--data", "d", "--lr", "0.01", "--no-param-groups", "--freeze-backbone",
                                               "--label-smoothing", "0.1", "--tta-flip", "--val-fraction", "0.2",
                                               "--patience", "3")))
    assert (config.lr, config.param_groups, config.train_stages, config.label_smoothing, config.tta_flip,
            config.val_fraction, config.patience) == (0.01, False, "head", 0.1, True, 0.2, 3)
    fast = config_from_args(parse(train_args("--data", "d", "--preset", "fast", "--train-stages", "2",
                                             "--no-tta-flip")))
    expected = {**PRESETS["fast"], "train_stages": "2", "tta_flip": False}  # the flags override, the rest is the preset
    assert fast.preset == "fast" and {k: getattr(fast, k) for k in expected} == expected
    assert config_from_args(parse(train_args("--data", "d"))).train_stages == "all"


@pytest.mark.parametrize("args,text", [
    (["--lr", "-1"], "Learning rate must be greater than zero, got -1"),
    (["--batch-size", "0"], "Batch size must be at least 1, got 0"),
    (["--train-stages", "9"], "Trainable part must be head, all or a number of stages from 1 to 4 for resnet18"),
    (["--backbone", "vgg99"], "unknown backbone 'vgg99'"),
    (["--weights", "/no/such/file.pt"], "no such weights file"),
])
def test_bad_settings_are_refused_in_one_line_without_a_run_folder(tiny_dataset, runs_env, capsys, args, text):
    assert main(train_args("--data", str(tiny_dataset), *args)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and text in err, err
    assert not runs_env.exists()


def test_train_then_runs_use_the_dashboards_runs_folder(tiny_dataset, runs_env, capsys):
    code = main(train_args("--data", str(tiny_dataset), "--backbone", TINY_BACKBONE, "--weights", "none",
                           "--lr", "0.01", "--loss-reduction", "mean", "--batch-size", "8", "--epochs", "1",
                           "--image-size", "32", "--name", "cli test", "--json", "--quiet"))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["status"] == "completed", result
    run = runs_env / result["run_dir"].split("/")[-1]
    assert run.is_dir() and run.name.endswith("cli-test")  # in TUNEBOARD_RUNS_DIR, not ./runs
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["name"] == "cli test" and saved["train_stages"] == "all"

    assert main(["runs", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["state"]) for r in listing] == [(run.name, "completed")]


def test_the_runs_folder_is_one_place_whatever_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("TUNEBOARD_RUNS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_runs_dir() == (ROOT / "runs").resolve()
    runs_flag = next(a for a in build_parser()._subparsers._group_actions[0].choices["runs"]._actions
                     if "--runs-dir" in a.option_strings)
    assert runs_flag.default == str((ROOT / "runs").resolve())
    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert default_runs_dir() == tmp_path / "elsewhere"


def test_listing_runs_does_not_import_torch(tmp_path):
    """A fresh interpreter: the point is what gets imported."""
    probe = ("import sys; from finetune_core.__main__ import main; "
             f"code = main(['runs', '--runs-dir', {str(tmp_path)!r}]); "
             "print(code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stdout + out.stderr


def test_the_progress_bar_shows_batches_and_prints_each_epoch():
    out = io.StringIO()
    bar = ProgressBar(file=out, mininterval=0)
    bar({"kind": "prepare", "message": "decoding images (3/10)", "progress": 0.0})
    bar({"kind": "batch", "message": "epoch 1/2, batch 1/4", "progress": 0.125, "eta_s": 12.0, "images_per_s": 7.5})
    bar({"kind": "epoch", "message": "epoch 1/2: loss 0.500, train acc 0.800, test acc 0.750", "images_per_s": 7.5,
         "progress": 0.5})
    bar({"kind": "end", "state": "completed"})
    text = out.getvalue()
    assert "epoch 1/2, batch 1/4" in text and "12 s left" in text
    assert "epoch 1/2: loss 0.500, train acc 0.800, test acc 0.750 (7.5 img/s)\n" in text


def test_lr_find_suggests_a_rate_and_writes_no_run(tiny_dataset, runs_env, capsys):
    code = main(["lr-find", "--data", str(tiny_dataset), "--backbone", TINY_BACKBONE, "--weights", "none",
                 "--loss-reduction", "mean", "--batch-size", "8", "--image-size", "32", "--steps", "8", "--json",
                 "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and 1 <= len(result["lrs"]) <= 8 and len(result["losses"]) == len(result["lrs"])
    assert result["lrs"] == sorted(result["lrs"])  # exponentially increasing
    assert not runs_env.exists()


def lr_find_args(data, *args: str) -> list[str]:
    return ["lr-find", "--data", str(data), "--backbone", TINY_BACKBONE, "--weights", "none", "--batch-size", "8",
            "--image-size", "32", "--quiet", *args]


@pytest.mark.parametrize("args,text", [
    (["--steps", "4"], "--steps must be at least 5 (the suggestion needs five points), got 4"),
    (["--start-lr", "0"], "--start-lr must be a number greater than zero, got 0"),
    (["--start-lr", "0.1", "--end-lr", "0.01"], "--end-lr must be greater than --start-lr (0.1), got 0.01"),
    (["--lr", "-1"], "Learning rate must be greater than zero"),
])
def test_lr_find_refuses_bad_input_in_one_line(tiny_dataset, capsys, monkeypatch, args, text):
    from finetune_core import lr_find

    def never(*a, **k):
        raise AssertionError("the sweep must not start")

    monkeypatch.setattr(lr_find, "find_lr", never)
    assert main(lr_find_args(tiny_dataset, *args)) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and text in captured.err, captured.err
    assert captured.out == ""


def test_lr_find_reports_a_failure_in_one_line(tiny_dataset, capsys, monkeypatch):
    import torch

    from finetune_core import lr_find
    from finetune_core.data import DatasetError
    from finetune_core.models import WeightsUnavailable

    cases = [(WeightsUnavailable("no ImageNet weights for resnet18: place resnet18-f37072fd.pth in /hub"), 1,
              "place resnet18-f37072fd.pth in /hub"),
             (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nGPU 0 has ..."), 1,
              "out of memory: try a smaller batch size or image size (CUDA out of memory. Tried to allocate 2.00 GiB)"),
             (RuntimeError("something broke\nwith details"), 1, "the learning-rate finder failed: RuntimeError: something broke"),
             (DatasetError("no usable images in the training split"), 2, "no usable images in the training split")]
    for error, code, text in cases:
        def failing(*a, error=error, **k):
            raise error

        monkeypatch.setattr(lr_find, "find_lr", failing)
        assert main(lr_find_args(tiny_dataset)) == code, error
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and text in err, err


def test_resume_finishes_a_stopped_run_and_refuses_a_completed_one(tiny_config, tmp_path, capsys):
    import threading

    from finetune_core.engine import train
    from finetune_core.runs import RunDir

    stop = threading.Event()
    train(tiny_config.replace(epochs=2), tmp_path / "run", cache_dir="", stop_event=stop,
          on_event=lambda e: e["kind"] == "epoch" and stop.set())
    assert RunDir(tmp_path / "run").read_status()["state"] == "stopped"
    assert main(["resume", str(tmp_path / "run"), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "completed"
    metrics = RunDir(tmp_path / "run").read_metrics()
    assert list(metrics[metrics["kind"] == "epoch"]["epoch"]) == [1, 2]
    assert main(["resume", str(tmp_path / "run")]) == 2  # completed: nothing to resume
    assert "only a stopped or interrupted run can be resumed" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "nowhere")]) == 2
