"""Scoring and splitting: the validation split by content, a run scored by the model it keeps,
dataset discovery in a folder of several datasets, the Predict page with a missing test image."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import make_dataset, tiny_train_config


def dataset_with_copies(root: Path) -> Path:
    """Two classes of 12 training images; in 'cat', 6 files are byte-identical copies of one photo
    (a photo saved under several names), and four 'dog' files are copies of 'cat' photos (filed
    under both classes)."""
    make_dataset(root, per_class=12, test_per_class=3)
    cats = root / "train" / "cat"
    for i in range(1, 6):
        shutil.copyfile(cats / "cat_0.png", cats / f"cat_{i}.png")
    for i in range(8, 12):
        shutil.copyfile(cats / f"cat_{i}.png", root / "train" / "dog" / f"dog_{i}.png")
    return root


def test_the_validation_split_keeps_exact_copies_on_one_side_and_says_so(tmp_path):
    from finetune_core import prepare
    from finetune_core.data import scan_dataset

    report = scan_dataset(dataset_with_copies(tmp_path / "copies"))
    data = prepare.prepare_data(report, 32, cache_dir="")
    split = prepare.validation_split(data, 0.25)
    train_content = {data.train_sha1[i] for i in split.train}
    assert split.val and not [data.train_paths[i] for i in split.val if data.train_sha1[i] in train_content]
    assert sorted(split.train + split.val) == list(range(len(data.train_labels)))
    assert (split.copy_sets, split.copy_images) == (1, 6)
    record = split.record()
    assert record["split_by"] == "file content" and record["copy_sets"] == 1
    assert "6 images are exact copies" in split.describe()
    # copies filed under both classes: those the order held out of 'cat' went back to training
    assert split.moved_to_training and {Path(p).parent.name for p in split.moved_to_training} == {"cat"}
    assert "moved to training" in split.describe()


# --- a run is scored by the model it keeps -------------------------------------------------------


def test_a_sweep_picks_its_best_cell_by_the_model_each_run_keeps(tmp_path):
    """With early stopping the last epoch is worse than the kept one: cell a peaked at 0.9 on
    validation and kept that checkpoint; b's last epoch (0.8) is its best."""
    from test_sweep import fake_cell

    from finetune_core import plots, sweep

    paths = [fake_cell(tmp_path, "a", 1e-4, 10, "completed", test_acc=0.85, val_accs=(0.9, 0.6), val_fraction=0.2),
             fake_cell(tmp_path, "b", 1e-3, 10, "completed", test_acc=0.80, val_accs=(0.7, 0.8), val_fraction=0.2)]
    grid = sweep.sweep_grid(sweep.sweep_table(paths))
    assert grid.accuracy == [[0.9], [0.8]] and grid.best_values == (1e-4, 10.0)
    assert grid.label == "validation acc of the kept model (best validation epoch)"
    assert plots.sweep_figure(grid).layout.title.text.startswith(grid.label)


def test_every_listing_scores_a_run_by_its_kept_model_in_the_same_words(tmp_path, capsys):
    """A run without a validation split keeps its final model: its best test epoch (0.99, chosen
    on the test split) is not its score. Compare, Predict's default run and the command line agree."""
    from test_compare_predict import write_run

    from finetune_core import analysis
    from finetune_core.__main__ import main
    from finetune_core.runs import list_runs

    write_run(tmp_path, "20260101-000000-peaked", group="g", test_acc=0.80, best_test_acc=0.99,
              selection_split="test", selected_checkpoint="last")
    write_run(tmp_path, "20260101-000001-steady", group="g", test_acc=0.90, best_test_acc=0.91,
              selection_split="test", selected_checkpoint="last")
    infos = list_runs(tmp_path)
    scores = {i.name: i.score for i in infos}
    assert scores["peaked"].text() == "test acc 0.800 of the kept model (final epoch)"
    assert analysis.best_of_newest_group(infos) == "20260101-000001-steady"
    table = analysis.compare_table(infos)[0].set_index("run")
    assert table.loc["peaked", "test acc of the kept model"] == "0.800"
    assert table.loc["peaked", "kept model"] == "final epoch"
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    assert "test acc 0.800 of the kept model (final epoch)" in capsys.readouterr().out


# --- a folder holding several datasets -----------------------------------------------------------


def data_root_of_two(root: Path) -> Path:
    """A data root: two datasets (one with splits, one of class folders) and a folder of notes."""
    make_dataset(root / "birds", per_class=4, test_per_class=2)
    make_dataset(root / "ants", per_class=4, test_per_class=2, flat=True)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a dataset")
    return root


def test_a_folder_of_several_datasets_is_not_guessed_the_library_names_them_and_the_cli_refuses(tmp_path, capsys):
    from finetune_core.__main__ import main
    from finetune_core.data import SeveralDatasets, find_dataset_root

    root = data_root_of_two(tmp_path / "data")
    with pytest.raises(SeveralDatasets) as err:
        find_dataset_root(root)
    assert err.value.candidates == [root / "ants", root / "birds"]
    assert main(["scan", str(root)]) == 2
    said = capsys.readouterr().err
    assert "holds 2 datasets: ants, birds" in said and "choose one" in said
    shutil.rmtree(root / "ants")  # one dataset beside a folder of notes: an archive's wrapper, gone down into
    assert find_dataset_root(root) == (root / "birds", "splits")


def test_the_train_page_asks_which_dataset_of_a_folder_holding_several(dashboard_env):
    from conftest import page

    root = data_root_of_two(dashboard_env / "data" / "shelf")
    at = page("pages/1_Train.py")
    at.session_state["data_source"] = "A folder path"  # not the example: it writes and scans 1,797 images
    at.run()
    at.text_input(key="data_path_text").set_value(str(root)).run()
    assert any("holds 2 datasets" in w.value for w in at.warning) and not at.exception
    choice = at.radio(key=f"several-{root.resolve()}")
    assert choice.value is None and [Path(o).name for o in choice.options] == ["ants", "birds"]
    assert not at.metric  # nothing scanned until the user says which
    choice.set_value(str(root.resolve() / "birds")).run()
    assert [m.value for m in at.metric][:1] == ["2"] and not at.exception  # birds: 2 classes


# --- Compare's table follows a run that finishes while the page is open ---------------------------


def test_compares_table_shows_the_state_and_duration_of_a_run_that_finished_since_it_was_listed(tmp_path):
    """The page's fragment refreshes the table with the run list of its last full rerun."""
    from test_compare_predict import write_run

    from finetune_core import analysis
    from finetune_core.runs import claim_run, list_runs, release_run

    run = write_run(tmp_path, "20260101-000000-live", state="running", started_at="2026-01-01T00:00:00+00:00")
    claim_run(run)  # its trainer is alive: listed as running
    try:
        listed = list_runs(tmp_path)
        assert listed[0].state == "running"
        run.write_status(state="completed", ended_at="2026-01-01T00:01:30+00:00", test_acc=0.75,
                         selection_split="test", selected_checkpoint="last")
    finally:
        release_run(run)
    row = analysis.compare_table(listed)[0].iloc[0]
    assert (row["state"], row["duration (s)"], row["test acc of the kept model"]) == ("completed", "90", "0.750")


def train_page_on(folder):
    """The Train page with a typed folder chosen (not the example: it writes and scans 1,797 images)."""
    from conftest import page

    at = page("pages/1_Train.py")
    at.session_state["data_source"] = "A folder path"
    at.run()
    at.text_input(key="data_path_text").set_value(str(folder)).run()
    return at


# --- a reload keeps the dataset; the sweep's best cell names its dataset ---------------------------


def test_a_reload_keeps_the_setup_forms_dataset(dashboard_env):
    """A reload is a new session with the same address: the dataset comes back from ?data=."""
    from conftest import page

    mine = make_dataset(dashboard_env / "data" / "mine", per_class=4, test_per_class=2)
    at = train_page_on(mine)
    assert at.query_params.get("data") == str(mine.resolve())  # the page's address names the dataset
    reloaded = page("pages/1_Train.py")
    reloaded.query_params.update(data=str(mine.resolve()))
    reloaded.run()
    assert reloaded.radio(key="data_source").value == "A folder path" and not reloaded.exception
    assert reloaded.text_input(key="data_path_text").value == str(mine.resolve())
    assert [m.value for m in reloaded.metric][:1] == ["2"]  # mine: 2 classes, scanned, not the 10 digits


def test_the_best_cell_names_its_dataset_and_is_refused_for_a_form_on_another(tmp_path):
    from test_sweep import fake_cell

    from finetune_core import sweep
    from finetune_core.runs import RunDir

    paths = [fake_cell(tmp_path, "a", 1e-4, 10, "completed", test_acc=0.9),
             fake_cell(tmp_path, "b", 1e-3, 10, "completed", test_acc=0.8)]
    data = make_dataset(tmp_path / "birds", per_class=2, test_per_class=1)
    for p in paths:
        run = RunDir(p)
        record = run.read_config()
        run.write_config({"config": {**record["config"], "data": str(data), "backbone": "resnet18"}})
    grid = sweep.sweep_grid(sweep.sweep_table(paths))
    recipe = sweep.sweep_recipe(paths)
    label, refused = sweep.best_cell_offer(grid, recipe, str(data))
    assert label == "Use the best cell: lr 0.0001, head x10 (resnet18 on birds)" and refused == ""
    label, refused = sweep.best_cell_offer(grid, recipe, str(tmp_path / "digits"))
    assert f"measured on {data}" in refused and "the form is set to" in refused and str(tmp_path / "digits") in refused


def test_the_twins_and_the_lr_finder_say_what_they_will_cost_from_a_recorded_speed(tmp_path):
    from test_compare_predict import write_run

    from finetune_core import analysis
    from finetune_core.data import scan_dataset
    from finetune_core.runs import list_runs

    report = scan_dataset(make_dataset(tmp_path / "data", per_class=10, test_per_class=2))  # 20 training images
    config = tiny_train_config(tmp_path / "data", epochs=3, val_fraction=0.5, train_stages="all",
                               backbone="resnet18")  # the recorded runs below are resnet18 runs
    seconds, basis = analysis.cost_estimate(config, report, [])
    assert seconds is None and "no finished run of resnet18 at 32 px" in basis
    runs = tmp_path / "runs"
    write_run(runs, "20260101-000000-other", images_per_s=99.0, backbone="resnet18", image_size=64,
              batch_size=8, train_stages="all", device="cpu")  # another size: another speed
    write_run(runs, "20260101-000001-measured", images_per_s=5.0, backbone="resnet18", image_size=32,
              batch_size=8, train_stages="all", device="cpu")
    seconds, basis = analysis.cost_estimate(config, report, list_runs(runs))
    assert seconds == pytest.approx(10 * 3 / 5.0) and "5.0 images/s" in basis and "'measured'" in basis
    seconds, _ = analysis.cost_estimate(config, report, list_runs(runs), steps=60)  # the finder: 60 batches of 8
    assert seconds == pytest.approx(60 * 8 / 5.0)


def test_the_train_page_shows_the_cost_of_each_twin_and_of_the_finder_before_they_start(dashboard_env):
    mine = make_dataset(dashboard_env / "data" / "mine", per_class=4, test_per_class=2)
    at = train_page_on(mine)
    estimates = [c.value for c in at.caption if c.value.startswith(("Costs about", "No cost estimate yet"))]
    assert len(estimates) == 3 and not at.exception  # the scratch twin, the one-group twin, the finder


@pytest.mark.slow
def test_a_run_logs_how_its_validation_split_treated_copies_and_is_scored_by_its_kept_checkpoint(tmp_path):
    from finetune_core.engine import train
    from finetune_core.runs import KEPT_BEST, RunDir, run_score

    data = dataset_with_copies(tmp_path / "copies")
    status = train(tiny_train_config(data, epochs=2, val_fraction=0.25), tmp_path / "run", cache_dir="")
    assert status["state"] == "completed", status["message"]
    run = RunDir(tmp_path / "run")
    split = run.read_config()["dataset"]["validation_split"]
    assert split["split_by"] == "file content" and (split["copy_sets"], split["copy_images"]) == (1, 6)
    assert split["moved_to_training"] and "validation split by content" in run.file("log.txt").read_text()
    score = run_score(run.read_status())
    assert score.kept == KEPT_BEST and score.test_acc == status["test_acc"]
    assert status["message"].startswith(score.text())  # the run's own message in the same words
