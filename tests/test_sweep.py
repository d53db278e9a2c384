"""The sweep: lr x head multiplier grids, their validation, the heatmap's data, stopping them
together, and the command line."""
from __future__ import annotations

import json
import threading

import pytest

from conftest import make_dataset, tiny_train_config
from finetune_core import plots, sweep
from finetune_core.config import ConfigError
from finetune_core.jobs import JobManager, wait_until
from finetune_core.runs import RunDir


@pytest.fixture
def recipe(tmp_path):
    return tiny_train_config(make_dataset(tmp_path / "tiny", per_class=4, test_per_class=2), name="fine")


def test_values_are_read_with_commas_or_spaces_and_checked_by_the_setting():
    assert sweep.parse_values("2e-4, 1e-5  5e-5", "lr") == [1e-5, 5e-5, 2e-4]
    assert sweep.parse_values("30;1,10,10", "head_lr_mult") == [1.0, 10.0, 30.0]
    with pytest.raises(ConfigError, match="Learning rate: 'fast' is not a number") as err:
        sweep.parse_values("1e-4, fast", "lr")
    assert set(err.value.errors) == {"lr"}
    with pytest.raises(ConfigError, match="Head learning-rate multiplier must be greater than zero, got -1"):
        sweep.parse_values("1 -1", "head_lr_mult")
    with pytest.raises(ConfigError, match="at least one value"):
        sweep.parse_values(" , ", "lr")


def test_the_grid_is_one_named_run_per_cell_in_one_group(recipe):
    configs = sweep.sweep_configs(recipe, [1e-5, 5e-5, 2e-4], [1, 10, 30], group="sweep-x")
    assert [(c.lr, c.head_lr_mult) for c in configs] == [(lr, m) for lr in (1e-5, 5e-5, 2e-4) for m in (1, 10, 30)]
    assert {c.group for c in configs} == {"sweep-x"} and len({c.name for c in configs}) == 9
    assert configs[1].name == "fine lr=1e-05 x10"
    assert all(c.replace(lr=recipe.lr, head_lr_mult=recipe.head_lr_mult, name="fine", group="") == recipe
               for c in configs)  # every other setting is the recipe's


def test_a_grid_too_big_or_without_effect_is_refused_with_a_clear_message(recipe):
    with pytest.raises(ConfigError, match=r"6 learning rates x 5 multipliers = 30 runs, more than the limit of 25"):
        sweep.sweep_configs(recipe, [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4], [1, 3, 10, 30, 100], group="g")
    with pytest.raises(ConfigError, match="no effect without parameter groups") as err:
        sweep.sweep_configs(recipe.replace(param_groups=False), [1e-4], [1, 10], group="g")
    assert set(err.value.errors) == {"head_lr_mult"}
    assert len(sweep.sweep_configs(recipe.replace(param_groups=False), [1e-4, 1e-3], [10], group="g")) == 2
    with pytest.raises(ConfigError, match="Learning rate must be greater than zero"):
        sweep.sweep_configs(recipe, [0.0], [10], group="g")


def fake_cell(runs, name: str, lr: float, mult: float, state: str, test_acc=None, val_accs=(), val_fraction=0.0):
    run = RunDir(runs / name)
    run.path.mkdir(parents=True)
    run.write_config({"config": {"name": name, "lr": lr, "head_lr_mult": mult, "val_fraction": val_fraction}})
    run.write_status(state=state, test_acc=test_acc)
    if val_accs:  # as the engine writes it: the latest and the best validation accuracy
        run.write_status(selection_split="val", val_acc=val_accs[-1], best_val_acc=max(val_accs),
                         **({"selected_checkpoint": "best"} if state == "completed" else {}))
    for e, acc in enumerate(val_accs, start=1):
        run.append_metrics({"kind": "epoch", "epoch": e, "val_acc": acc, "test_acc": None})
    return run.path


def test_the_heatmap_fills_in_as_runs_finish_and_marks_the_best_cell(tmp_path):
    paths = [fake_cell(tmp_path, "a", 1e-4, 1, "completed", test_acc=0.80),
             fake_cell(tmp_path, "b", 1e-4, 10, "completed", test_acc=0.91),
             fake_cell(tmp_path, "c", 1e-3, 1, "running"),
             fake_cell(tmp_path, "d", 1e-3, 10, "failed", test_acc=None)]
    grid = sweep.sweep_grid(sweep.sweep_table(paths))
    assert grid.lrs == [1e-4, 1e-3] and grid.head_lr_mults == [1.0, 10.0]
    assert grid.accuracy == [[0.80, 0.91], [None, None]]
    assert grid.states[1] == ["running", "failed"]
    assert grid.best == (0, 1) and grid.best_values == (1e-4, 10.0)
    assert (grid.finished, grid.total, grid.split) == (2, 4, "test")
    fig = plots.sweep_figure(grid)
    heat = fig.data[0]
    assert heat.text[0][1] == "★ 0.910" and heat.text[0][0] == "0.800" and heat.text[1][0] == "running"
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].x0 == 0.5 and fig.layout.shapes[0].y0 == -0.5
    assert "2 of 4" in fig.layout.title.text


def test_with_a_validation_split_the_cells_are_chosen_on_validation_not_test(tmp_path):
    paths = [fake_cell(tmp_path, "a", 1e-4, 10, "completed", test_acc=0.99, val_accs=(0.6, 0.7), val_fraction=0.2),
             fake_cell(tmp_path, "b", 1e-3, 10, "completed", test_acc=0.50, val_accs=(0.8, 0.9), val_fraction=0.2)]
    grid = sweep.sweep_grid(sweep.sweep_table(paths))
    assert grid.split == "validation" and grid.accuracy == [[0.7], [0.9]] and grid.best_values == (1e-3, 10.0)


def test_a_sweep_is_stopped_as_one_group(recipe, tmp_path):
    from test_jobs import FakeTrainer

    fake = FakeTrainer()
    mgr = JobManager(tmp_path / "runs", train_fn=fake)
    ids = [mgr.submit(c) for c in sweep.sweep_configs(recipe, [1e-3, 1e-2], [1, 10], group="sweep-s")]
    other = mgr.submit(recipe.replace(name="other", group="other"))
    assert wait_until(lambda: len(fake.started) == 1)
    assert sorted(mgr.stop_group("sweep-s")) == sorted(ids)
    for i in ids:
        assert mgr.wait(i, 10)["state"] == "stopped"
    fake.release.set()
    assert mgr.wait(other, 10)["state"] == "completed"  # another group runs on
    assert len(fake.started) == 2


def test_a_sweeps_cells_compute_the_frozen_part_once_and_train_as_if_alone(recipe, tmp_path):
    """With part of the network frozen, its outputs do not depend on the rates a sweep varies:
    the first cell computes them, the others reuse them, and each cell's curve is the one it
    has when trained alone."""
    from finetune_core.engine import train

    base = recipe.replace(train_stages="1", feature_views=2, epochs=2, tta_flip=True)
    cells = sweep.sweep_configs(base, [0.01, 0.05], [10], group="sweep-t")
    shared, frozen_passes = {}, []
    for cell in cells:
        events = []
        status = train(cell, tmp_path / "runs" / cell.name, on_event=events.append, cache_dir=str(tmp_path / "c"),
                       shared_features=shared)
        assert status["state"] == "completed", status
        frozen_passes.append(sum("frozen layers' output" in e.get("message", "") for e in events))
    assert frozen_passes[0] > 0 and frozen_passes[1] == 0
    alone = train(cells[1], tmp_path / "alone", cache_dir=str(tmp_path / "c"))
    assert alone["state"] == "completed"
    columns = ["kind", "epoch", "step", "loss", "train_acc", "test_loss", "test_acc"]
    together = RunDir(tmp_path / "runs" / cells[1].name).read_metrics()[columns]
    assert together.equals(RunDir(tmp_path / "alone").read_metrics()[columns])


def test_the_job_manager_shares_the_frozen_outputs_within_a_sweep_only_and_frees_them(recipe, tmp_path):
    seen, all_queued = [], threading.Event()

    def trainer(config, run, on_event=None, stop_event=None, **options):
        all_queued.wait(10)  # as on the page, every cell is queued before the first ends
        seen.append((config.group, options.get("shared_features")))
        return run.write_status(state="completed")

    mgr = JobManager(tmp_path / "runs", train_fn=trainer)
    ids = [mgr.submit(c) for c in sweep.sweep_configs(recipe, [1e-3, 1e-2], [10], group="sweep-m")]
    ids.append(mgr.submit(recipe.replace(group="plain")))
    all_queued.set()
    for i in ids:
        assert mgr.wait(i, 10)["state"] == "completed"
    (g1, store1), (g2, store2), (g3, store3) = seen
    assert store1 is store2 and isinstance(store1, dict) and store3 is None
    assert mgr._shared_features == {}  # the sweep's last run freed them


@pytest.mark.slow
def test_the_command_line_sweeps_and_prints_the_grid(recipe, tmp_path, capsys):
    """In process (`main([...])`, as test_cli calls the command line): what is checked is what the
    sweep command prints and writes, not a fresh interpreter."""
    from finetune_core.__main__ import main

    def cli(*args):
        code = main(["sweep", "--data", recipe.data, "--backbone", recipe.backbone, "--weights", "none",
                     "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--loss-reduction", "mean",
                     "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--quiet", *args])
        return code, capsys.readouterr()

    code, bad = cli("--lr", "1e-3,fast", "--head-lr-mult", "10")
    assert code == 2 and "Learning rate: 'fast' is not a number" in bad.err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    code, done = cli("--lr", "1e-3 1e-2", "--head-lr-mult", "10", "--json")
    assert code == 0, done.err
    result = json.loads(done.out.strip().splitlines()[-1])
    assert [(c["lr"], c["head_lr_mult"]) for c in result["cells"]] == [(1e-3, 10.0), (1e-2, 10.0)]
    assert all(c["state"] == "completed" and 0 <= c["accuracy"] <= 1 for c in result["cells"])
    assert result["best"]["accuracy"] == max(c["accuracy"] for c in result["cells"])
    assert len({RunDir(c["run_dir"]).read_config()["config"]["group"] for c in result["cells"]}) == 1
