"""Partial fine-tuning on cached activations, the validation split, test-time flips, label
smoothing, early stopping and the learning-rate finder (issue 12), on tiny generated data."""
from __future__ import annotations

import random
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_BACKBONE
from finetune_core import activations, engine, prepare
from finetune_core.config import TrainConfig
from finetune_core.data import scan_dataset
from finetune_core.engine import Reporter, epoch_seed, load_checkpoint, setup, split_for, train
from finetune_core.lr_find import find_lr, lr_range_test, suggest_lr
from finetune_core.models import BACKBONES, build_model, head_parameter_names, split_model
from finetune_core.runs import RunDir

# What these tests prove holds for any backbone with stages (test_models checks the split on every
# one): the tiny test backbone trains in milliseconds.
BACKBONE = TINY_BACKBONE
HEAD = head_parameter_names(BACKBONE)  # its head's weight and bias
HEAD_WEIGHT = f"{BACKBONES[BACKBONE].head}.weight"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from conftest import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "tiny", per_class=12, test_per_class=4)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A random tiny backbone with a 2-class head saved as a weights file: every run starts from
    exactly these tensors, head included, so a test can tell what changed."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "start.pt"
    torch.save(build_model(BACKBONE, 2, "none").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def config_for(dataset, weights_file, **changes) -> TrainConfig:
    base = dict(data=str(dataset), backbone=BACKBONE, weights=str(weights_file), image_size=32, batch_size=8,
                epochs=2, lr=0.02, head_lr_mult=10.0, momentum=0.9, loss_reduction="mean", eval_batch_size=16,
                train_stages="1", feature_views=2)
    return TrainConfig(**{**base, **changes})


def module_tensors(module: torch.nn.Module) -> dict[int, torch.Tensor]:
    return {id(t): t for t in list(module.parameters()) + list(module.buffers())}


@pytest.mark.parametrize("stages,ema_decay", [("head", 0.0), ("1", 0.0), ("2", 0.0), ("1", 0.9)])
def test_only_the_chosen_part_of_the_network_changes(dataset, weights_file, cache, tmp_path, stages, ema_decay):
    config = config_for(dataset, weights_file, train_stages=stages, ema_decay=ema_decay)
    status = train(config, tmp_path / "run", cache_dir=cache)
    assert status["state"] == "completed", status["message"]
    start = build_model(BACKBONE, 2, str(weights_file))
    bottom, top = split_model(start, BACKBONE, stages)
    frozen = {id(t) for t in list(bottom.parameters()) + list(bottom.buffers())}
    trained = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)["model"]
    initial = start.state_dict(keep_vars=True)
    same = {name: torch.equal(initial[name].detach(), trained[name]) for name in initial}
    frozen_names = [n for n, t in initial.items() if id(t) in frozen]
    assert frozen_names and all(same[n] for n in frozen_names)  # bit-identical, BN statistics included
    assert not any(same[n] for n in HEAD)
    top_weights = [n for n, t in initial.items() if id(t) not in frozen and n not in HEAD and n.endswith("weight")]
    if stages == "head":
        assert top_weights == []
    else:
        assert top_weights and not all(same[n] for n in top_weights)  # the last stages trained too


@pytest.mark.parametrize("stages", ["head", "1", "all"])
@pytest.mark.parametrize("param_groups", [True, False])
def test_rates_and_multiplier_reach_the_optimiser_for_every_depth(dataset, weights_file, cache, tmp_path, stages,
                                                                   param_groups):
    config = config_for(dataset, weights_file, train_stages=stages, param_groups=param_groups, head_lr_mult=7.0,
                        lr=0.01, epochs=1)
    ctx = setup(config, RunDir(tmp_path), Reporter(RunDir(tmp_path), None, None), cache_dir=cache)
    lrs = {g["name"]: g["lr"] for g in ctx.optimizer.param_groups}
    if stages == "head":
        assert lrs == {"head": pytest.approx(0.07 if param_groups else 0.01)}
    elif param_groups:
        assert lrs == {"backbone": pytest.approx(0.01), "head": pytest.approx(0.07)}
    else:
        assert lrs == {"all": pytest.approx(0.01)}
    _, top = split_model(ctx.model, BACKBONE, stages)
    in_groups = {id(p) for g in ctx.optimizer.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in top.parameters()}  # exactly the part that trains


@pytest.mark.slow
def test_the_head_multiplier_changes_the_result(dataset, weights_file, cache, tmp_path):
    finals = []
    for mult in (1.0, 10.0):
        train(config_for(dataset, weights_file, head_lr_mult=mult, epochs=1), tmp_path / f"m{mult}", cache_dir=cache)
        finals.append(load_checkpoint(tmp_path / f"m{mult}" / "checkpoint_last.pt")["model"])
    assert not torch.equal(finals[0][HEAD_WEIGHT], finals[1][HEAD_WEIGHT])
    assert not torch.equal(finals[0]["conv_head.weight"], finals[1]["conv_head.weight"])  # the last stage's


def test_the_frozen_pass_says_how_long_it_has_left(dataset, weights_file, tmp_path):
    """A pass over the frozen layers that comes before training (minutes on a CPU for a real set)
    tells the time left in it: with a validation split, whose images the first epoch's end reads,
    the first epoch does not stream its view (engine.streams_first_epoch)."""
    assert [activations.pass_time_left(10.0, 100, 400), activations.pass_time_left(60.0, 100, 400)] == ["30 s", "3 min"]
    messages = []
    status = train(config_for(dataset, weights_file, epochs=1, eval_batch_size=4, val_fraction=0.25), tmp_path / "run",
                   cache_dir="", on_event=lambda e: e["kind"] == "prepare" and messages.append(e["message"]))
    assert status["state"] == "completed", status["message"]
    passes = [m for m in messages if m.startswith("computing the frozen layers' output for training view 1")]
    assert passes[0].endswith("(0/18)")  # nothing to go by yet
    assert len(passes) == 5 and all(m.endswith(" left)") and ", about " in m for m in passes[1:]), passes


def test_cached_activations_are_the_frozen_layers_output_on_that_views_crop(dataset, weights_file, cache, tmp_path):
    config = config_for(dataset, weights_file, train_stages="1", feature_views=3, channels_last=False)
    reporter = Reporter(RunDir(tmp_path), None, None)
    ctx = setup(config, RunDir(tmp_path), reporter, cache_dir=cache)
    _, features = split_for(ctx, "1", reporter)
    bottom, _ = split_model(ctx.model, BACKBONE, "1")
    bottom.eval()
    for view in (0, 2):
        cached = features.get("train", view).float()
        if view == 0:
            crops = prepare.center_view_batch(ctx.data, ctx.train_idx, 32, ctx.device)
        else:
            rng = random.Random(epoch_seed(config.seed, view, 3))
            crops = prepare.augment_batch(ctx.data, ctx.train_idx, 32, rng, ctx.device)
        with torch.no_grad():
            expected = bottom(prepare.normalize_batch(crops, ctx.mean, ctx.std, channels_last=False))
        assert cached.shape == expected.shape
        assert torch.allclose(cached, expected, rtol=2e-3, atol=2e-3)  # stored as float16
    assert not torch.equal(features.get("train", 1), features.get("train", 2))  # views differ


@pytest.mark.slow
@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_a_resumed_partial_run_equals_an_uninterrupted_one(dataset, weights_file, cache, tmp_path, ema_decay):
    config = config_for(dataset, weights_file, epochs=3, train_stages="1", feature_views=2, patience=2,
                        ema_decay=ema_decay)
    train(config, tmp_path / "straight", cache_dir=cache)
    stop = threading.Event()
    status = train(config, tmp_path / "resumed", cache_dir=cache, stop_event=stop,
                   on_event=lambda e: e["kind"] == "batch" and e["step"] == 5 and stop.set())
    assert status["state"] == "stopped"
    train(config, tmp_path / "resumed", cache_dir=cache, resume=True)
    a = pd.read_csv(tmp_path / "straight" / "metrics.csv")
    b = pd.read_csv(tmp_path / "resumed" / "metrics.csv")
    a, b = a[a["kind"] == "epoch"], b[b["kind"] == "epoch"]
    assert list(b["epoch"]) == [1, 2, 3]
    for col in ("loss", "train_acc", "test_acc"):
        assert np.allclose(a[col], b[col], atol=1e-6), col
    assert b["elapsed_s"].is_monotonic_increasing  # the wall-time axis does not restart at zero
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint_last.pt")["model"]
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint_last.pt")["model"]
    for name, tensor in straight.items():  # the same weights in the end (the average's too)
        assert torch.allclose(tensor.float(), resumed[name].float(), atol=1e-5), name


def test_the_validation_split_is_stable_stratified_and_apart_from_the_test_split(dataset):
    report = scan_dataset(dataset)
    data = prepare.prepare_data(report, 32, cache_dir="")
    split = prepare.validation_split(data, 0.25)
    train_idx, val_idx = split.train, split.val
    again = prepare.validation_split(prepare.prepare_data(report, 32, cache_dir=""), 0.25)
    assert (train_idx, val_idx) == (again.train, again.val)
    assert set(train_idx).isdisjoint(val_idx) and sorted(train_idx + val_idx) == list(range(len(data.train_labels)))
    val_paths = {data.train_paths[i] for i in val_idx}
    assert val_paths.isdisjoint(data.test_paths)
    labels = data.train_labels[val_idx].tolist()
    assert labels.count(0) == labels.count(1) == 3  # a quarter of each class's 12
    nothing_held = prepare.validation_split(data, 0.0)
    assert (nothing_held.train, nothing_held.val) == (list(range(len(data.train_labels))), [])


def test_with_a_validation_split_the_test_split_is_evaluated_once_at_the_end(dataset, weights_file, cache, tmp_path):
    status = train(config_for(dataset, weights_file, val_fraction=0.25, epochs=2), tmp_path / "run", cache_dir=cache)
    assert status["state"] == "completed", status["message"]
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    epochs = metrics[metrics["kind"] == "epoch"]
    assert epochs["val_acc"].notna().all() and epochs["test_acc"].isna().all()
    test_rows = metrics[metrics["test_acc"].notna()]
    assert list(test_rows["kind"]) == ["test"]
    assert status["test_acc"] == pytest.approx(test_rows["test_acc"].iloc[0])
    assert "validation" in status["message"]
    preds = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert (preds["true"] == preds["predicted"]).mean() == pytest.approx(status["test_acc"])


def test_early_stopping_ends_the_run_after_patience_epochs_without_gain(dataset, weights_file, cache, tmp_path,
                                                                        monkeypatch):
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.9])
    real = engine.evaluate_split

    def scripted(ctx, split, stages, reporter):
        loss, _, logits = real(ctx, split, stages, reporter)
        return loss, next(scores), logits

    monkeypatch.setattr(engine, "evaluate_split", scripted)
    status = train(config_for(dataset, weights_file, epochs=6, patience=2, train_stages="head"), tmp_path / "run",
                   cache_dir=cache)
    assert status["state"] == "completed"
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics[metrics["kind"] == "epoch"]["epoch"]) == [1, 2, 3, 4]  # no gain after epoch 2 for 2 epochs
    assert "stopped early after epoch 4" in status["message"]


def test_flip_averaging_averages_the_logits_of_the_image_and_its_mirror():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x = torch.randn(5, 3, 4, 4)
    labels = torch.zeros(5, dtype=torch.long)
    logits, _ = engine.evaluate(model, [([x, x.flip(-1)], labels)], lambda: torch.autocast("cpu", enabled=False))
    assert torch.allclose(logits, (model(x) + model(x.flip(-1))) / 2, atol=1e-6)


@pytest.mark.slow
def test_tta_and_label_smoothing_reach_the_run(dataset, weights_file, cache, tmp_path, monkeypatch):
    from finetune_core import engine

    views_seen = []  # the number of views evaluation averaged, batch by batch

    def spy(model, views):
        views_seen.append(len(views))
        return real_mean_logits(model, views)

    real_mean_logits = engine.mean_logits
    monkeypatch.setattr(engine, "mean_logits", spy)
    plain = train(config_for(dataset, weights_file, epochs=1), tmp_path / "plain", cache_dir=cache)
    assert views_seen and set(views_seen) == {1}
    views_seen.clear()
    smooth = train(config_for(dataset, weights_file, epochs=1, label_smoothing=0.3, tta_flip=True),
                   tmp_path / "smooth", cache_dir=cache)
    assert plain["loss"] != pytest.approx(smooth["loss"])
    assert views_seen and set(views_seen) == {2}  # every evaluated batch: the image and its mirror
    config = RunDir(tmp_path / "smooth").read_config()
    assert "mirror" in config["preprocessing"]["test_transform"]


def test_the_lr_finder_sweeps_the_trainable_part_and_puts_the_weights_back(dataset, weights_file, cache, tmp_path):
    config = config_for(dataset, weights_file, train_stages="1", head_lr_mult=10.0)
    reporter = Reporter(RunDir(tmp_path), None, None)
    ctx = setup(config, RunDir(tmp_path), reporter, cache_dir=cache)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    seen_ratios = []
    real_step = torch.optim.SGD.step

    def spy(self, *a, **kw):
        lrs = {g["name"]: g["lr"] for g in self.param_groups}
        seen_ratios.append(lrs["head"] / lrs["backbone"])
        return real_step(self, *a, **kw)

    torch.optim.SGD.step = spy
    try:
        result = lr_range_test(ctx, reporter, start_lr=1e-5, end_lr=10.0, steps=12)
    finally:
        torch.optim.SGD.step = real_step
    after = ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert seen_ratios and all(r == pytest.approx(10.0) for r in seen_ratios)
    assert len(result.lrs) == len(result.losses) >= 3
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:]))


def test_find_lr_writes_no_run_folder(dataset, weights_file, cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")
    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", str(tmp_path / "runs"))
    (tmp_path / "runs").mkdir()
    before = sorted(p.name for p in (tmp_path / "..").iterdir())
    result = find_lr(config_for(dataset, weights_file, train_stages="head"), cache_dir=cache, steps=8)
    assert len(result.lrs) == len(result.losses) > 0
    assert list((tmp_path / "runs").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "..").iterdir()) == before


def test_the_suggestion_is_where_the_loss_falls_fastest():
    losses = [2.0] * 5 + [1.9, 1.5, 1.2, 1.15, 1.1, 1.08] + [1.5, 3.0, 8.0]
    lrs = [10 ** (-6 + k * 0.25) for k in range(len(losses))]
    assert suggest_lr(lrs, losses) == lrs[6]  # 1.9 -> 1.2 across it: the steepest fall before the minimum
    assert suggest_lr(lrs, [float(k) for k in range(14)]) is None  # never falls


def test_prediction_averages_the_mirror_image_when_the_run_did(dataset, weights_file, cache, tmp_path):
    from finetune_core.predict import Predictor

    train(config_for(dataset, weights_file, epochs=1, train_stages="all", tta_flip=True), tmp_path / "run",
          cache_dir=cache)
    predictor = Predictor.from_run(tmp_path / "run")
    assert predictor.tta_flip
    preds = pd.read_csv(tmp_path / "run" / "predictions.csv")
    probs = predictor.predict_files(list(preds["path"]), top_k=2)
    for (_, row), result in zip(preds.iterrows(), probs):
        assert dict(result.top)["cat"] == pytest.approx(row["prob_cat"], abs=1e-4)
    # An image whose mirror looks different: the averaged answer is the average of both logits.
    from PIL import Image

    from finetune_core.prepare import normalize_batch

    pixels = np.zeros((48, 48, 3), dtype=np.uint8)
    pixels[:, :16] = (230, 30, 30)
    pixels[:, 16:] = (20, 40, 220)
    image = Image.fromarray(pixels)
    x = normalize_batch(predictor.preprocess(image)[None], predictor.mean, predictor.std, channels_last=False)
    with torch.no_grad():
        plain, mirrored = predictor.model(x), predictor.model(x.flip(-1))
    assert not torch.allclose(plain, mirrored, atol=1e-4)
    expected = torch.softmax((plain + mirrored) / 2 / predictor.temperature, dim=1)  # calibrated (calibration.py)
    assert torch.allclose(predictor.probabilities([image]), expected, atol=1e-5)


def test_auto_views_are_four_for_small_sets_and_fewer_for_large_ones():
    auto = TrainConfig(data="x", feature_views=0)
    assert [engine.views_per_image(auto, n) for n in (24, 498, 1000, 2500, 2900, 50_000)] == [4, 4, 4, 4, 3, 2]
    assert engine.views_per_image(auto.replace(feature_views=3), 50_000) == 3  # a number is taken as it is


def test_the_fast_preset_trains_part_of_the_network_on_offline_weights():
    from finetune_core.config import preset_config
    from finetune_core.models import BACKBONES, cached_weights_path

    fast = preset_config("fast", data="x")
    assert fast.train_stages not in ("head", "all") and fast.param_groups  # the knobs matter
    assert BACKBONES[fast.backbone].bundled and cached_weights_path(fast.backbone) is not None
    assert fast.image_size == BACKBONES[fast.backbone].native_size


def test_a_scan_the_caller_made_is_used_instead_of_scanning_again(dataset, weights_file, cache, tmp_path,
                                                                   monkeypatch):
    config = config_for(dataset, weights_file, epochs=1, train_stages="head")
    report = scan_dataset(dataset)
    assert engine.report_fits(report, config)
    monkeypatch.setattr(engine, "scan_dataset", lambda *a, **k: pytest.fail("scanned again"))
    assert train(config, tmp_path / "run", cache_dir=cache, report=report)["state"] == "completed"
    other = scan_dataset(tmp_path)  # another folder: not the run's dataset
    assert not engine.report_fits(other, config)
    assert not engine.report_fits(report, config.replace(data=str(tmp_path)))


def test_resume_keeps_the_early_stopping_count(dataset, weights_file, cache, tmp_path, monkeypatch):
    """Stopped after epoch 3 of 6 with patience 2 and no gain since epoch 2: the resumed run stops
    after epoch 4, as the uninterrupted one does."""
    real = engine.evaluate_split

    def scripted(scores):
        def evaluate_split(ctx, split, stages, reporter):
            loss, _, logits = real(ctx, split, stages, reporter)
            return loss, scores[len(ctx.run.read_metrics().query("kind == 'epoch'"))], logits
        return evaluate_split

    scores = [0.5, 0.7, 0.6, 0.65, 0.9, 0.9]
    monkeypatch.setattr(engine, "evaluate_split", scripted(scores))
    config = config_for(dataset, weights_file, epochs=6, patience=2, train_stages="head")
    stop = threading.Event()
    train(config, tmp_path / "run", cache_dir=cache, stop_event=stop,
          on_event=lambda e: e["kind"] == "epoch" and e["epoch"] == 3 and stop.set())
    status = train(config, tmp_path / "run", cache_dir=cache, resume=True)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics[metrics["kind"] == "epoch"]["epoch"]) == [1, 2, 3, 4]
    assert "stopped early after epoch 4" in status["message"]


def test_with_a_validation_split_prediction_uses_the_selected_checkpoint(dataset, weights_file, cache, tmp_path,
                                                                         monkeypatch):
    from finetune_core import predict
    from finetune_core.predict import Predictor, export_bundle

    # epoch 1 is the best on the validation split; then the final test, then the calibration's validation pass
    scores = iter([0.9, 0.5, 0.6, 0.0, 0.9])
    real = engine.evaluate_split
    monkeypatch.setattr(engine, "evaluate_split", lambda *a: (lambda r: (r[0], next(scores), r[2]))(real(*a)))
    status = train(config_for(dataset, weights_file, epochs=3, val_fraction=0.25, train_stages="all",
                              precision="fp32", lr=0.005, momentum=0.0), tmp_path / "run", cache_dir=cache)
    assert status["selected_checkpoint"] == "best"
    best = load_checkpoint(tmp_path / "run" / "checkpoint_best.pt")
    last = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    assert (best["epoch"], last["epoch"]) == (1, 3)

    def same(state, checkpoint):
        return all(torch.equal(state[k].float(), checkpoint["model"][k].float()) for k in checkpoint["model"])

    def no_onnx(*args, **kwargs):  # the bundle's weights are checked here, its ONNX copy in test_compare_predict
        raise RuntimeError("not exported in this test: seconds of work that nothing here reads")

    monkeypatch.setattr(predict, "export_onnx", no_onnx)
    bundle = Predictor.load(export_bundle(tmp_path / "run", tmp_path / "bundle"))
    for predictor in (Predictor.from_run(tmp_path / "run"), bundle):
        state = predictor.model.state_dict()
        assert same(state, best) and not same(state, last)
    assert same(Predictor.from_run(tmp_path / "run", checkpoint="last").model.state_dict(), last)


def test_ctrl_c_ends_the_run_stopped_with_its_checkpoint(dataset, weights_file, cache, tmp_path):
    def on_event(e):
        if e["kind"] == "batch" and e["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config_for(dataset, weights_file, epochs=3), tmp_path / "run", cache_dir=cache, on_event=on_event)
    status = RunDir(tmp_path / "run").read_status()
    assert status["state"] == "stopped" and "Ctrl-C" in status["message"]
    assert (tmp_path / "run" / "checkpoint_last.pt").exists()


def test_flip_averaging_on_cached_activations_uses_the_mirrored_test_images(dataset, weights_file, cache, tmp_path):
    config = config_for(dataset, weights_file, train_stages="1", tta_flip=True, channels_last=False)
    reporter = Reporter(RunDir(tmp_path), None, None)
    ctx = setup(config, RunDir(tmp_path), reporter, cache_dir=cache)
    _, features = split_for(ctx, "1", reporter)
    views, _ = next(iter(engine.evaluation_batches(ctx, "test", features)))
    assert len(views) == 2
    bottom, _ = split_model(ctx.model, BACKBONE, "1")
    bottom.eval()
    x = prepare.normalize_batch(ctx.data.test_images[:], ctx.mean, ctx.std, channels_last=False)
    with torch.no_grad():
        assert torch.allclose(views[0], bottom(x)[:len(views[0])], atol=2e-3)
        assert torch.allclose(views[1], bottom(x.flip(-1))[:len(views[1])], atol=2e-3)


@pytest.mark.slow
def test_activations_over_the_memory_budget_are_memory_mapped_and_leave_no_file(dataset, weights_file, cache,
                                                                                 tmp_path, monkeypatch):
    config = config_for(dataset, weights_file, epochs=2, train_stages="1")
    in_memory = train(config, tmp_path / "a", cache_dir=cache)
    monkeypatch.setenv(activations.MEMORY_VARIABLE, "0")
    folder = tmp_path / "cache-mapped"
    mapped = train(config, tmp_path / "b", cache_dir=str(folder))
    assert mapped["state"] == "completed" and mapped["test_acc"] == pytest.approx(in_memory["test_acc"])
    assert mapped["loss"] == pytest.approx(in_memory["loss"], abs=1e-6)
    assert not list(folder.rglob(".tuneboard-activations-*"))  # written in place, then renamed
    assert list((folder / "activations").glob("*.npy"))  # kept for a resumed run


@pytest.mark.slow
def test_auto_epochs_and_views_follow_the_sets_size_and_are_recorded(dataset, weights_file, cache, tmp_path):
    report = scan_dataset(dataset)
    auto = config_for(dataset, weights_file, epochs=0, feature_views=0, train_stages="head")

    def with_train_images(n):  # the same scan, as if the set had n training images
        fake = scan_dataset(dataset)
        fake.samples["train"] = (report.samples["train"] * (n // len(report.samples["train"]) + 1))[:n]
        return engine.resolve_auto(auto, fake)

    assert [(c.epochs, c.feature_views) for c in map(with_train_images, (24, 498, 743, 2972))] == \
        [(30, 4), (30, 4), (30, 4), (25, 3)]
    assert engine.resolve_auto(auto.replace(train_stages="all"), report).epochs == 5
    assert engine.resolve_auto(auto.replace(epochs=3, feature_views=2), report).epochs == 3  # numbers stay
    status = train(auto, tmp_path / "run", cache_dir=cache)
    assert status["state"] == "completed", status["message"]
    saved = RunDir(tmp_path / "run").read_config()["config"]
    assert (saved["epochs"], saved["feature_views"]) == (30, 4)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics[metrics["kind"] == "epoch"]["epoch"].max() == 30


def test_no_training_batch_holds_a_single_image():
    assert [(s.start, s.stop) for s in engine.batch_slices(17, 8)] == [(0, 8), (8, 17)]
    assert [(s.start, s.stop) for s in engine.batch_slices(18, 8)] == [(0, 8), (8, 16), (16, 18)]
    assert [(s.start, s.stop) for s in engine.batch_slices(1, 8)] == [(0, 1)]


def test_a_partial_run_whose_last_batch_would_hold_one_image_completes(dataset, weights_file, cache, tmp_path):
    # 24 training images in batches of 23: the last would be one image of 1x1 activations at 16 px.
    status = train(config_for(dataset, weights_file, batch_size=23, image_size=16, epochs=1, train_stages="1"),
                   tmp_path / "run", cache_dir=cache)
    assert status["state"] == "completed", status["message"]


def test_comparison_twins_of_an_auto_run_train_as_many_epochs_as_it(dataset):
    from finetune_core.config import comparison_configs, inactive_settings, preset_config

    report = scan_dataset(dataset)
    fast = engine.resolve_auto(preset_config("fast", data=str(dataset)), report)
    runs = [engine.resolve_auto(c, report) for c in comparison_configs(fast, True, True, "g")]
    assert len(runs) == 3 and {c.epochs for c in runs} == {fast.epochs} and fast.epochs > 5
    assert "patience" not in inactive_settings(preset_config("fast", data=str(dataset), patience=3))


def test_weight_averaging_is_an_exponential_moving_average_with_a_warm_up():
    from types import SimpleNamespace

    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    ctx = SimpleNamespace(model=model, config=SimpleNamespace(ema_decay=0.5), step=1, average=None)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    engine.update_average(ctx)  # the first step starts the average at the weights
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    model[1].num_batches_tracked += 7
    ctx.step = 2
    engine.update_average(ctx)  # decay min(0.5, 3/12): 0.25 * 1 + 0.75 * 3
    assert torch.allclose(ctx.average["0.weight"], torch.full((1, 2), 2.5))
    assert int(ctx.average["1.num_batches_tracked"]) == 7  # counters are copied, not averaged
    ctx.step = 1000
    engine.update_average(ctx)  # decay 0.5 once warmed up
    assert torch.allclose(ctx.average["0.weight"], torch.full((1, 2), 2.75))
    training = engine.swap_in_average(ctx)
    assert torch.allclose(model[0].weight, torch.full((1, 2), 2.75))
    engine.swap_back(ctx, training)
    assert torch.allclose(model[0].weight, torch.full((1, 2), 3.0))


def test_with_weight_averaging_the_checkpoint_holds_the_average_and_the_training_weights(dataset, weights_file,
                                                                                          cache, tmp_path):
    plain = train(config_for(dataset, weights_file), tmp_path / "plain", cache_dir=cache)
    averaged = train(config_for(dataset, weights_file, ema_decay=0.9), tmp_path / "averaged", cache_dir=cache)
    assert plain["state"] == averaged["state"] == "completed"
    a = torch.load(tmp_path / "plain" / "checkpoint_last.pt", weights_only=True)
    b = torch.load(tmp_path / "averaged" / "checkpoint_last.pt", weights_only=True)
    assert "training_weights" not in a
    # the same training (the average never feeds back into it), evaluated and kept as an average
    assert torch.equal(a["model"][HEAD_WEIGHT], b["training_weights"][HEAD_WEIGHT])
    assert not torch.equal(b["model"][HEAD_WEIGHT], b["training_weights"][HEAD_WEIGHT])
    ma = pd.read_csv(tmp_path / "plain" / "metrics.csv")
    mb = pd.read_csv(tmp_path / "averaged" / "metrics.csv")
    assert np.allclose(ma[ma["kind"] == "epoch"]["loss"], mb[mb["kind"] == "epoch"]["loss"])
