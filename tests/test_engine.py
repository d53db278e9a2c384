"""The training engine and its run directories, on tiny generated datasets."""
from __future__ import annotations

import json
import random
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from finetune_core import prepare
from finetune_core.data import scan_dataset
from finetune_core.engine import load_checkpoint, train
from finetune_core.models import BACKBONES, resolve_device
from finetune_core.predict import Predictor
from finetune_core.runs import RunDir, list_runs, mark_interrupted


def epoch_rows(run_dir):
    m = pd.read_csv(run_dir / "metrics.csv")
    return m[m["kind"] == "epoch"].reset_index(drop=True)


def test_a_tiny_run_writes_the_whole_run_directory(tiny_config, tmp_path, cache_dir):
    events = []
    status = train(tiny_config, tmp_path / "run", on_event=events.append, cache_dir=cache_dir)
    run = tmp_path / "run"
    assert status["state"] == "completed", status["message"]
    assert {"config.json", "status.json", "metrics.csv", "checkpoint_last.pt", "checkpoint_best.pt",
            "predictions.csv", "log.txt"} <= {p.name for p in run.iterdir()}

    config = json.loads((run / "config.json").read_text())
    assert config["config"]["lr"] == tiny_config.lr and config["classes"] == ["cat", "dog"]
    spec = BACKBONES[tiny_config.backbone]
    assert config["backbone"]["name"] == spec.name and config["normalisation"]["mean"] == list(spec.mean)
    assert {"torch", "torchvision", "python"} <= set(config["versions"])
    assert config["device"] == str(resolve_device(tiny_config.device))

    metrics = pd.read_csv(run / "metrics.csv")
    batches = metrics[metrics["kind"] == "batch"]
    assert len(batches) == 2 * 3  # 24 training images, batch 8, 2 epochs
    assert list(batches["epoch"])[:3] == pytest.approx([1 / 3, 2 / 3, 1.0], abs=1e-3)
    epochs = epoch_rows(run)
    assert list(epochs["epoch"]) == [1, 2] and epochs["test_acc"].between(0, 1).all()
    assert (batches["images_per_s"] > 0).all() and (batches["lr"] == 0.01).all()
    assert np.allclose(batches["head_lr"], 0.1)

    kinds = {e["kind"] for e in events}
    assert {"prepare", "batch", "epoch", "end"} <= kinds
    batch_event = next(e for e in events if e["kind"] == "batch")
    assert {"loss", "train_acc", "lr", "head_lr", "images_per_s", "elapsed_s", "epoch", "progress", "eta_s"} <= set(batch_event)

    preds = pd.read_csv(run / "predictions.csv")
    assert len(preds) == 8 and {"path", "true", "predicted", "confidence", "loss", "prob_cat", "prob_dog"} <= set(preds)
    assert np.allclose(preds[["prob_cat", "prob_dog"]].sum(axis=1), 1.0, atol=1e-5)
    assert (preds["true"] == preds["predicted"]).mean() == pytest.approx(epochs["test_acc"].iloc[-1])

    ckpt = load_checkpoint(run / "checkpoint_last.pt")  # weights_only=True
    assert ckpt["epoch"] == 2 and ckpt["classes"] == ["cat", "dog"] and "optimizer" in ckpt
    assert status["best_test_acc"] == epochs["test_acc"].max()


def test_predictions_from_the_checkpoint_equal_the_live_model(tiny_config, tmp_path, cache_dir):
    train(tiny_config, tmp_path / "run", cache_dir=cache_dir)
    preds = pd.read_csv(tmp_path / "run" / "predictions.csv")
    predictor = Predictor.from_run(tmp_path / "run")
    results = predictor.predict_files(list(preds["path"]), top_k=2)
    for (_, row), result in zip(preds.iterrows(), results):
        probs = dict(result.top)
        assert result.top[0][0] == row["predicted"]
        assert probs["cat"] == pytest.approx(row["prob_cat"], abs=1e-4)


def test_frozen_backbone_trains_only_the_head_on_cached_features(tiny_dataset, tmp_path, cache_dir):
    from finetune_core.config import preset_config
    from finetune_core.models import build_model

    config = preset_config("fast", data=str(tiny_dataset), backbone="efficientnet_lite0", image_size=64, epochs=4,
                           batch_size=8, train_stages="head", val_fraction=0.0)
    torch.manual_seed(config.seed)  # the engine seeds the same way before it builds the model
    initial_head = build_model("efficientnet_lite0", 2, "auto").classifier.weight.detach().clone()
    before = {k: v.clone() for k, v in load_lite0_body().items()}
    status = train(config, tmp_path / "run", cache_dir=cache_dir)
    assert status["state"] == "completed", status["message"]
    assert status["test_acc"] == 1.0  # each class is one colour: a pretrained network separates them at once
    state = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["model"]
    changed = [k for k in before if not torch.equal(before[k], state[k])]
    assert changed == []  # every backbone tensor (BN statistics included) is untouched
    assert not torch.equal(state["classifier.weight"], initial_head)  # the head trained


def load_lite0_body():
    from finetune_core.models import pretrained_state_dict

    return {k: v for k, v in pretrained_state_dict("efficientnet_lite0").items() if not k.startswith("classifier")}


def test_warmup_epochs_then_full_fine_tuning(tiny_config, tmp_path, cache_dir):
    """Epoch 1 trains the head alone (the body is untouched, no body rate is logged); then all of it."""
    from finetune_core.models import build_model, head_parameter_names

    config = tiny_config.replace(epochs=3, warmup_epochs=1)
    torch.manual_seed(config.seed)  # the engine seeds the same way before it builds the model
    initial = build_model(config.backbone, 2, "none").state_dict()
    head = head_parameter_names(config.backbone)
    after_warmup = {}

    def on_event(e):
        if e["kind"] == "batch" and e["step"] == 4 and not after_warmup:  # 3 batches an epoch
            after_warmup.update(load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["model"])

    status = train(config, tmp_path / "run", cache_dir=cache_dir, on_event=on_event)
    assert status["state"] == "completed", status["message"]
    final = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["model"]
    body = [k for k in initial if k not in head and k.endswith("weight")]
    assert all(torch.equal(initial[k], after_warmup[k]) for k in body)
    assert all(not torch.equal(initial[k], after_warmup[k]) for k in head)
    assert not all(torch.equal(initial[k], final[k]) for k in body)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    batches = metrics[metrics["kind"] == "batch"]
    assert batches[batches["step"] <= 3]["lr"].isna().all() and batches[batches["step"] > 3]["lr"].notna().all()
    assert list(epoch_rows(tmp_path / "run")["epoch"]) == [1, 2, 3]


def test_stop_is_honoured_within_a_batch_and_keeps_metrics(tiny_config, tmp_path, cache_dir):
    stop = threading.Event()
    seen = []

    def on_event(e):
        if e["kind"] == "batch":
            seen.append(e["step"])
            if e["step"] == 4:
                stop.set()

    status = train(tiny_config, tmp_path / "run", on_event=on_event, stop_event=stop, cache_dir=cache_dir)
    assert status["state"] == "stopped" and "stopped by the user" in status["message"]
    assert seen[-1] == 4  # no batch ran after the stop was asked for
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert len(metrics[metrics["kind"] == "batch"]) == 4 and len(epoch_rows(tmp_path / "run")) == 1


def test_a_stop_while_decoding_ends_the_run_without_decoding_the_rest(tmp_path, monkeypatch):
    import os
    import time

    from conftest import make_dataset, tiny_train_config

    data = make_dataset(tmp_path / "many", per_class=100, test_per_class=2)
    stop = threading.Event()
    started_after_stop = []
    real_decode = prepare.decode_train

    def slow_decode(*args):  # a photo's decode time, so that the decoding threads do not race ahead
        if stop.is_set():
            started_after_stop.append(1)
        time.sleep(0.02)
        return real_decode(*args)

    monkeypatch.setattr(prepare, "decode_train", slow_decode)

    def on_event(e):
        if "decoding images" in e.get("message", ""):
            stop.set()

    status = train(tiny_train_config(data), tmp_path / "run", on_event=on_event, stop_event=stop, cache_dir="")
    assert status["state"] == "stopped"
    # nothing to resume, and the run says so (a first user saw no Resume button and no reason)
    assert status["message"].endswith("there is no checkpoint to resume: press Train to start it again")
    workers = min(8, os.cpu_count() or 1)
    # At most the images until the next progress call (which raises) and those already in hand.
    assert len(started_after_stop) <= prepare.PROGRESS_EVERY + workers, len(started_after_stop)


def test_a_stop_while_caching_activations_lands_within_a_layer(tiny_config, tmp_path, monkeypatch):
    """The frozen layers run over large batches (eval_batch_size images at once, seconds on a CPU
    with a real backbone): a stop asked during that pass must not wait for the batch to end."""
    from finetune_core import engine

    stop = threading.Event()
    layers_run_after_stop = []
    real_build = engine.build_model

    def build_counting(*args, **kwargs):
        model = real_build(*args, **kwargs)
        for m in model.modules():
            m.register_forward_hook(lambda *_: layers_run_after_stop.append(1) if stop.is_set() else None)  # output kept
        return model

    monkeypatch.setattr(engine, "build_model", build_counting)

    def on_event(e):
        if "frozen layers' output" in e.get("message", ""):
            stop.set()

    config = tiny_config.replace(train_stages="1", eval_batch_size=256)
    status = train(config, tmp_path / "run", on_event=on_event, stop_event=stop, cache_dir="")
    assert status["state"] == "stopped", status["message"]
    assert layers_run_after_stop == []  # the whole frozen bottom ran over the batch before


def test_divergence_ends_the_run_naming_step_and_learning_rate(tiny_config, tmp_path, cache_dir):
    status = train(tiny_config.replace(lr=1e12, loss_reduction="sum"), tmp_path / "run", cache_dir=cache_dir)
    assert status["state"] == "diverged"
    assert "at step" in status["message"]
    assert "backbone 1e+12" in status["message"] and "head 1e+13" in status["message"]  # each group's rate
    metrics = RunDir(tmp_path / "run").read_metrics()
    assert np.isfinite(metrics["loss"]).all()  # no row logs the non-finite loss


@pytest.mark.parametrize("lr", [100.0, 1.0])
def test_a_loss_that_blows_up_but_stays_finite_ends_the_run_diverged(tiny_config, tmp_path, cache_dir, lr):
    """lr 100 used to run to `completed` with a training loss near 25,000 (finite, so never caught)."""
    from finetune_core.engine import diverged_loss

    # ResNet-18, with which the blow-up was seen: the tiny test backbone stays below the limit here
    config = tiny_config.replace(backbone="resnet18", lr=lr, loss_reduction="mean", epochs=2)
    status = train(config, tmp_path / "run", cache_dir=cache_dir)
    assert status["state"] == "diverged", status["message"]
    assert "per image, over the limit of 100" in status["message"] and "at step 2 (epoch 1)" in status["message"]
    assert f"backbone {lr:g}" in status["message"] and f"head {lr * 10:g}" in status["message"]
    assert diverged_loss(2) == 100 and diverged_loss(1000) == pytest.approx(100 * np.log(1000))
    metrics = RunDir(tmp_path / "run").read_metrics()
    assert (metrics["loss"] < diverged_loss(2)).all()  # the rows before the blow-up are kept; none logs it


def test_an_exception_fails_the_run_with_its_message_and_keeps_metrics(tiny_config, tmp_path, cache_dir):
    def on_event(e):
        if e["kind"] == "batch" and e["step"] == 3:
            raise RuntimeError("disk on fire")

    status = train(tiny_config, tmp_path / "run", on_event=on_event, cache_dir=cache_dir)
    assert status["state"] == "failed" and "disk on fire" in status["message"]
    assert "Traceback" in (tmp_path / "run" / "log.txt").read_text()
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert len(metrics) >= 3


def test_a_missing_weights_file_fails_with_a_clear_message(tiny_config, tmp_path, cache_dir):
    from finetune_core.config import ConfigError

    bad = tiny_config.replace(weights=str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match="no such weights file"):
        bad.check(check_paths=True)
    status = train(bad, tmp_path / "run", cache_dir=cache_dir)
    assert status["state"] == "failed" and "nope.pt" in status["message"]


def test_resume_continues_exactly_where_the_run_stopped(tiny_config, tmp_path, cache_dir):
    config = tiny_config.replace(epochs=3)
    train(config, tmp_path / "straight", cache_dir=cache_dir)

    stop = threading.Event()
    status = train(config, tmp_path / "resumed", cache_dir=cache_dir, stop_event=stop,
                   on_event=lambda e: e["kind"] == "batch" and e["step"] == 5 and stop.set())
    assert status["state"] == "stopped"
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint_last.pt")["epoch"] == 1
    status = train(config, tmp_path / "resumed", cache_dir=cache_dir, resume=True)
    assert status["state"] == "completed"
    a, b = epoch_rows(tmp_path / "straight"), epoch_rows(tmp_path / "resumed")
    assert list(b["epoch"]) == [1, 2, 3]
    for col in ("loss", "train_acc", "test_acc", "test_loss"):
        assert np.allclose(a[col], b[col], atol=1e-5), col
    elapsed = RunDir(tmp_path / "resumed").read_metrics()["elapsed_s"]
    assert elapsed.is_monotonic_increasing  # the wall-time axis continues on resume, never restarts at zero


def test_resume_refuses_a_dataset_whose_classes_changed_and_names_the_change(tmp_path, cache_dir):
    import shutil

    from conftest import make_dataset, tiny_train_config

    data = make_dataset(tmp_path / "data", classes=("bird", "cat", "dog"), per_class=4, test_per_class=2)
    config = tiny_train_config(data, epochs=2)
    stop = threading.Event()
    train(config, tmp_path / "run", cache_dir=cache_dir, stop_event=stop,
          on_event=lambda e: e["kind"] == "epoch" and stop.set())
    run = RunDir(tmp_path / "run")
    assert run.read_status()["state"] == "stopped"
    before = {name: run.file(name).read_bytes() for name in ("checkpoint_last.pt", "config.json", "metrics.csv")}
    status_before = run.read_status()

    added = shutil.copytree(data, tmp_path / "added")
    make_dataset(tmp_path / "emu", classes=("emu",), per_class=4, test_per_class=2)
    shutil.copytree(tmp_path / "emu" / "train" / "emu", added / "train" / "emu")
    shutil.copytree(tmp_path / "emu" / "test" / "emu", added / "test" / "emu")
    removed = shutil.copytree(data, tmp_path / "removed")
    shutil.rmtree(removed / "train" / "bird")
    shutil.rmtree(removed / "test" / "bird")
    for folder, change in ((added, "added 'emu'"), (removed, "removed 'bird'")):
        status = train(config.replace(data=str(folder)), run.path, cache_dir=cache_dir, resume=True)
        assert status["state"] == "stopped", status["message"]  # still resumable once the folders are back
        assert "classes changed" in status["message"] and change in status["message"], status["message"]
        assert {name: run.file(name).read_bytes() for name in before} == before  # nothing touched
        assert {**run.read_status(), "message": ""} == {**status_before, "message": ""}  # progress, times...

    status = train(config, run.path, cache_dir=cache_dir, resume=True)  # the data as it was: it resumes
    assert status["state"] == "completed", status["message"]
    assert list(epoch_rows(run.path)["epoch"]) == [1, 2]


def test_class_change_names_added_removed_and_reordered_classes():
    from finetune_core.engine import class_change

    assert class_change(["a", "b"], ["a", "b"]) == ""
    assert class_change(["a", "b"], ["a", "b", "c"]) == "added 'c'"
    assert class_change(["a", "b", "c"], ["a", "c"]) == "removed 'b'"
    assert class_change(["a", "b"], ["a", "x"]) == "added 'x'; removed 'b'"
    assert class_change(["a", "b"], ["b", "a"]) == "reordered from ['a', 'b'] to ['b', 'a']"


def test_a_device_this_machine_lacks_is_refused_before_any_run_folder_exists(tiny_config, tmp_path, cache_dir,
                                                                           monkeypatch):
    from finetune_core import models
    from finetune_core.config import ConfigError

    train(tiny_config.replace(epochs=1), tmp_path / "done", cache_dir=cache_dir)
    checkpoint = (tmp_path / "done" / "checkpoint_last.pt").read_bytes()
    monkeypatch.setattr(models, "available_devices", lambda: ["auto", "cpu"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="cuda is not on this machine"):
        train(tiny_config.replace(device="cuda"), tmp_path / "run", cache_dir=cache_dir)
    assert not (tmp_path / "run").exists()
    status = train(tiny_config.replace(epochs=2, device="cuda"), tmp_path / "done", cache_dir=cache_dir, resume=True)
    assert status["state"] == "completed"  # a refused resume puts the run's status back as it was
    assert "not resumed: Device cuda is not on this machine" in status["message"]
    assert (tmp_path / "done" / "checkpoint_last.pt").read_bytes() == checkpoint


def test_a_run_seeds_no_process_wide_generator(tiny_config, tmp_path, cache_dir):
    """A CPU run draws its dropout from a generator of its own: it neither reseeds nor draws from
    the process's CPU generator (its state after the run is its state before), and another user
    of that generator between the run's steps (the learning-rate finder, a second run) does not
    change the run's draws. MobileNet-V3 trains with dropout before its head."""
    config = tiny_config.replace(backbone="mobilenet_v3_large", train_stages="all", epochs=1)
    torch.default_generator.manual_seed(123)
    outside, python_state = torch.get_rng_state(), random.getstate()
    quiet = train(config, tmp_path / "quiet", cache_dir=cache_dir)
    assert quiet["state"] == "completed", quiet["message"]
    assert torch.equal(torch.get_rng_state(), outside) and random.getstate() == python_state

    def another_user(event):  # between two steps: draws from and reseeds the process's generator
        if event["kind"] == "batch":
            torch.rand(1000)
            torch.default_generator.manual_seed(event["step"])

    disturbed = train(config, tmp_path / "disturbed", cache_dir=cache_dir, on_event=another_user)
    assert disturbed["state"] == "completed", disturbed["message"]
    batches = [RunDir(tmp_path / name).read_metrics().query("kind == 'batch'")["loss"].tolist()
               for name in ("quiet", "disturbed")]
    assert len(batches[0]) > 1 and batches[0] == batches[1]


def test_model_init_is_seeded_on_a_private_fork_and_dropout_on_the_runs_device_only(monkeypatch):
    from finetune_core.engine import seed_device, seeded_init

    torch.random.default_generator.manual_seed(5)
    outside = torch.get_rng_state()
    with seeded_init(0):
        drawn = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside)  # the process's CPU stream goes on untouched
    assert torch.equal(drawn, torch.rand(4, generator=torch.Generator().manual_seed(0)))  # as after manual_seed(0)

    seeded = []

    class FakeGenerator:
        def __init__(self, index):
            self.index = index

        def manual_seed(self, seed):
            seeded.append((self.index, seed))

    monkeypatch.setattr(torch.cuda, "default_generators", tuple(FakeGenerator(i) for i in range(2)), raising=False)
    seed_device(torch.device("cuda:1"), 7)
    assert seeded == [(1, 7)]
    assert torch.equal(torch.get_rng_state(), outside)  # a GPU run's dropout seed leaves the CPU alone


def test_a_file_that_fails_after_the_scan_is_skipped_and_reported(tiny_config, tmp_path, cache_dir, monkeypatch):
    report = scan_dataset(tiny_config.data)
    victim = report.samples["train"][0].path
    real = prepare.decode_train

    def flaky(path, side):
        if path == victim:
            raise OSError("unexpected end of file")
        return real(path, side)

    monkeypatch.setattr(prepare, "decode_train", flaky)
    status = train(tiny_config, tmp_path / "run", cache_dir=cache_dir)
    assert status["state"] == "completed"
    log = (tmp_path / "run" / "log.txt").read_text()
    assert victim in log and "unexpected end of file" in log
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"]["skipped_files"] == 1


def test_decoded_images_are_cached_on_disk_and_reused(tiny_dataset, tmp_path, monkeypatch):
    report = scan_dataset(tiny_dataset)
    first = prepare.prepare_data(report, 32, cache_dir=tmp_path / "c")
    images = len(report.samples["train"]) + len(report.samples["test"])
    assert len([p for p in (tmp_path / "c" / "images").rglob("*") if p.is_file()]) == images  # one entry each
    monkeypatch.setattr(prepare, "decode_train", lambda *a: pytest.fail("decoded again"))
    monkeypatch.setattr(prepare, "decode_test", lambda *a: pytest.fail("decoded again"))
    second = prepare.prepare_data(report, 32, cache_dir=tmp_path / "c")
    assert np.array_equal(np.asarray(first.train_images), np.asarray(second.train_images))
    assert np.array_equal(np.asarray(first.test_images), np.asarray(second.test_images))


def test_test_images_are_exactly_the_books_test_transform(tiny_dataset, tmp_path):
    from finetune_core.data import IMAGENET_MEAN, IMAGENET_STD, book_test_transform, load_rgb

    report = scan_dataset(tiny_dataset)
    data = prepare.prepare_data(report, 32, cache_dir="")
    ours = prepare.normalize_batch(data.test_images[:3], IMAGENET_MEAN, IMAGENET_STD, channels_last=False)
    book = torch.stack([book_test_transform(32)(load_rgb(p)) for p in data.test_paths[:3]])
    assert torch.allclose(ours, book, atol=1e-5)


def test_crops_are_drawn_like_torchvisions_random_resized_crop():
    """Our crop boxes (drawn with a seeded Python generator) follow the distribution of torchvision's
    RandomResizedCrop.get_params on the same image size: area and aspect quantiles agree."""
    from torchvision.transforms import RandomResizedCrop

    rng = random.Random(0)
    torch.manual_seed(0)
    ours = [prepare.sample_resized_crop(rng, 500, 300) for _ in range(4000)]
    image = torch.empty(3, 300, 500)
    theirs = [RandomResizedCrop.get_params(image, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3]) for _ in range(4000)]
    assert all(0 <= top and 0 <= left and top + h <= 300 and left + w <= 500 for top, left, h, w in ours)
    quantiles = [0.05, 0.25, 0.5, 0.75, 0.95]
    for measure in (lambda h, w: h * w / (500 * 300), lambda h, w: w / h):
        a = np.quantile([measure(h, w) for _, _, h, w in ours], quantiles)
        b = np.quantile([measure(h, w) for _, _, h, w in theirs], quantiles)
        assert np.allclose(a, b, rtol=0.08, atol=0.02), (a, b)


def test_augmented_batches_have_the_right_shape_and_flip(tiny_dataset):
    report = scan_dataset(tiny_dataset)
    data = prepare.prepare_data(report, 32, cache_dir="")
    batch = prepare.augment_batch(data, list(range(8)), 32, random.Random(0), torch.device("cpu"))
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.uint8
    again = prepare.augment_batch(data, list(range(8)), 32, random.Random(0), torch.device("cpu"))
    assert torch.equal(batch, again)  # seeded: the same augmentation every time


# --- run listing ---------------------------------------------------------------------------------


def test_listing_survives_a_damaged_run_folder(tiny_config, tmp_path, cache_dir):
    runs = tmp_path / "runs"
    train(tiny_config.replace(epochs=1), runs / "good", cache_dir=cache_dir)
    (runs / "damaged").mkdir()
    (runs / "damaged" / "status.json").write_text("{not json")
    (runs / "empty").mkdir()
    infos = {i.id: i for i in list_runs(runs)}
    assert infos["good"].state == "completed" and not infos["good"].error
    assert infos["good"].score.test_acc is not None and infos["good"].duration_s >= 0
    assert "damaged run folder" in infos["damaged"].error and "damaged run folder" in infos["empty"].error


def test_runs_left_running_are_marked_interrupted(tmp_path):
    run = RunDir(tmp_path / "r1")
    run.path.mkdir()
    run.write_config({"config": {}})
    run.write_status(state="running")
    assert mark_interrupted(tmp_path) == ["r1"]
    assert run.read_status()["state"] == "interrupted"


def test_the_gpu_crop_path_matches_the_cpu_path():
    """roi_align (one kernel per batch, used on CUDA) cuts the same crops as the per-image CPU path."""
    yy, xx = np.meshgrid(np.linspace(0, 255, 64), np.linspace(0, 255, 64), indexing="ij")
    image = np.stack([yy, xx, (yy + xx) / 2]).astype(np.uint8)
    boxes = [(8.0, 8.0, 40.0, 48.0), (0.0, 0.0, 64.0, 64.0), (20.0, 4.0, 60.0, 30.0)]
    batched = prepare.crops_batched(torch.from_numpy(np.stack([image] * 3)), boxes, 32)
    per_image = prepare.crops_per_image([image] * 3, boxes, 32)
    assert batched.shape == per_image.shape == (3, 3, 32, 32)
    assert (batched.float() - per_image.float()).abs().mean() < 2.0


def test_live_curves_stay_small_with_thousands_of_points():
    from finetune_core import plots

    n = 5000
    metrics = pd.DataFrame({"kind": ["batch"] * n, "epoch": np.linspace(0.001, 5, n), "loss": np.random.rand(n),
                            "train_acc": np.random.rand(n), "test_acc": np.nan})
    fig = plots.overlay_figure({"run": metrics}, epochs=5)
    lengths = [len(t.x) for t in fig.data]
    assert max(lengths) <= plots.MAX_POINTS + 1 and lengths[0] > 100
    assert fig.data[0].x[-1] == pytest.approx(5.0)  # the newest point is always drawn


def test_decoded_images_are_read_from_the_disk_cache_when_used(tiny_config, tmp_path, monkeypatch):
    """No array holds the decoded set: each image is read from its cache entry when a batch needs
    it; a file that fails to decode is dropped, and training runs the same."""
    report = scan_dataset(tiny_config.data)
    victim = report.samples["train"][3].path
    real = prepare.decode_train
    monkeypatch.setattr(prepare, "decode_train", lambda p, side: (_ for _ in ()).throw(OSError("bad")) if p == victim
                        else real(p, side))
    data = prepare.prepare_data(report, 32, cache_dir=tmp_path / "c")
    assert isinstance(data.train_images, prepare.DecodedImages)
    assert len(data.train_images) == len(data.train_labels) == len(report.samples["train"]) - 1
    in_memory = prepare.prepare_data(report, 32, cache_dir="")
    assert np.array_equal(np.asarray(data.train_images), np.asarray(in_memory.train_images))
    again = prepare.prepare_data(report, 32, cache_dir=tmp_path / "c")  # from the cache
    assert [p.path for p in again.skipped] == [victim]
    status = train(tiny_config, tmp_path / "run", cache_dir=str(tmp_path / "c"))
    assert status["state"] == "completed"
