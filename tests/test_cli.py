"""The command line, called in-process (`main([...])`) except where a fresh interpreter is the point."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from conftest import ROOT
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
    code = main(train_args("--data", str(tiny_dataset), "--backbone", "resnet18", "--weights", "none",
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
    code = main(["lr-find", "--data", str(tiny_dataset), "--backbone", "resnet18", "--weights", "none",
                 "--loss-reduction", "mean", "--batch-size", "8", "--image-size", "32", "--steps", "8", "--json",
                 "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and 1 <= len(result["lrs"]) <= 8 and len(result["losses"]) == len(result["lrs"])
    assert result["lrs"] == sorted(result["lrs"])  # exponentially increasing
    assert not runs_env.exists()
