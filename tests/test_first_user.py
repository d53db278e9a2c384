"""What a first-time user tripped on in the dashboard (round 4 of the new-user sessions), each
shown failing before its fix: the library's part directly, the pages' through AppTest."""
from __future__ import annotations

from conftest import page


def test_home_names_the_kept_model_as_the_runs_state_has_it(dashboard_env):
    """Home's Recent runs said "kept model: final epoch" of a run in its first epoch, before any
    model was kept: none yet, then the latest epoch so far, the final epoch once completed."""
    from finetune_core.runs import CHECKPOINT_LAST, new_run_dir, owning

    run = new_run_dir(dashboard_env / "runs", "first")
    run.write_config({"config": {"name": "first", "backbone": "tiny_lite"}, "dataset": {"root": "/data/x"}})

    def kept_column() -> list[str]:
        at = page("app.py").run()
        assert not at.exception
        return at.dataframe[0].value["kept model"].tolist()

    with owning(run):  # a live process writes it: it stays running
        run.write_status(state="running", message="epoch 1/5, batch 3/9", progress=0.05)
        assert kept_column() == ["none yet"]
        run.file(CHECKPOINT_LAST).write_bytes(b"a checkpoint")
        assert kept_column() == ["latest epoch so far"]
        run.write_status(state="stopped", message="stopped by the user")
    assert kept_column() == ["latest epoch"]  # not the final one: it can be resumed
    run.write_status(state="completed", message="done", test_acc=0.9)
    assert kept_column() == ["final epoch"]
    run.file(CHECKPOINT_LAST).unlink()
    run.write_status(state="failed", message="out of memory", epochs_done=0)
    assert kept_column() == ["none"]


def test_the_review_page_opened_by_its_address_starts_on_trains_default_dataset(dashboard_env):
    """/Review opened by its address (a new session) said "Choose a dataset on the Train page" while
    Train opens on the example: it starts on the same dataset as Train, the address's ?data= first."""
    from conftest import make_dataset

    at = page("pages/2_Review.py").run()
    assert not at.exception
    assert at.text_input(key="review_data_input").value == str(dashboard_env / "data" / "digits")
    assert not [i.value for i in at.info if "Choose a dataset" in i.value]
    assert at.button(key="review_start")  # scanned, ready to review
    data = make_dataset(dashboard_env / "data" / "pets", per_class=4, test_per_class=2)
    at = page("pages/2_Review.py")
    at.query_params["data"] = str(data)  # a reload of Train's address, as Train keeps it
    at.run()
    assert at.text_input(key="review_data_input").value == str(data) and not at.exception


def test_a_data_folder_the_example_cannot_be_written_to_leaves_review_asking_for_a_folder(monkeypatch):
    """Writing the example is how a fresh Review session finds its default: where that fails (a
    read-only data folder) the page asks for a folder instead of stopping with a traceback."""
    from finetune_core import datastore

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/srv/photos/digits")

    monkeypatch.setattr(datastore, "ensure_example_dataset", read_only)
    assert datastore.default_dataset() == ""
    assert datastore.default_dataset("/srv/photos/pets") == "/srv/photos/pets"
    at = page("pages/2_Review.py").run()
    assert not at.exception
    assert [i.value for i in at.info if "Choose a dataset" in i.value]


def test_an_absurd_epoch_count_is_warned_about_before_any_run_has_measured_a_speed(dashboard_env, monkeypatch):
    """1000 epochs typed for 10, with no finished run to estimate from: the page said only "no cost
    estimate yet". A run that trains every layer gets a floor on its time; any run, the epochs named."""
    import torch

    from finetune_core import analysis
    from finetune_core.data import scan_dataset
    from finetune_core.config import preset_config

    digits = scan_dataset(dashboard_env / "data" / "digits")  # 1,438 training images
    every_layer = preset_config("book-finetune", data=str(digits.root), device="cpu", image_size=224, epochs=1000)
    warning = analysis.unmeasured_run_warning(every_layer, digits, cpu_cores=2)
    assert warning.startswith("This run would take at least 4.0 hours: 1,438,000 training images (1,000 epochs) "
                              "at 100 images/s"), warning
    assert analysis.unmeasured_run_warning(every_layer.replace(epochs=5), digits, cpu_cores=2) == ""
    # on GPUs, one process each: 8 of them at most 8 times one's speed (the floor was 8 times too high)
    from finetune_core import models

    monkeypatch.setattr(models, "resolve_device", lambda device: torch.device("cuda"))
    one_gpu = analysis.unmeasured_run_warning(every_layer.replace(device="cuda", epochs=200_000, processes=1), digits)
    eight = analysis.unmeasured_run_warning(every_layer.replace(device="cuda", epochs=200_000, processes=8), digits)
    assert one_gpu.startswith("This run would take at least 16.0 hours") and "at 5,000 images/s" in one_gpu, one_gpu
    assert eight.startswith("This run would take at least 2.0 hours") and "at 40,000 images/s" in eight, eight
    monkeypatch.undo()
    cached = preset_config("fast", data=str(digits.root), device="cpu", epochs=1000)  # the frozen part cached
    assert analysis.unmeasured_run_warning(cached, digits).startswith("1,000 epochs is far more than fine-tuning needs")
    assert analysis.unmeasured_run_warning(cached.replace(epochs=30), digits) == ""

    at = page("pages/1_Train.py").run()  # the example, no run yet
    at.number_input(key="f_epochs").set_value(1000).run()
    assert any("no cost estimate yet" in c.value for c in at.caption)
    assert [w.value for w in at.warning if "1,000 epochs" in w.value], [w.value for w in at.warning]
    at.number_input(key="f_epochs").set_value(10).run()
    assert not [w.value for w in at.warning if "epochs" in w.value and "hours" in w.value or "far more" in w.value]


def test_the_live_charts_axis_grows_with_the_run_so_the_batches_of_an_epoch_show():
    """The live loss curve seemed to move once an epoch: every batch is drawn, but on an axis spanning
    all 30 epochs the first took a thirtieth of the chart. The axis spans twice the epochs done."""
    import pandas as pd

    from finetune_core import plots

    def logged(*epochs: float) -> dict:
        return {"run": pd.DataFrame({"kind": ["batch"] * len(epochs), "epoch": list(epochs), "loss": [1.0] * len(epochs)})}

    assert plots.live_epoch_span({}, 30) == 1 and plots.live_epoch_span(logged(0.2, 0.4), 30) == 1
    assert plots.live_epoch_span(logged(0.5, 1.0), 30) == 2 and plots.live_epoch_span(logged(1.0, 1.25), 30) == 3
    assert plots.live_epoch_span(logged(20.0), 30) == 30 and plots.live_epoch_span(logged(0.1), 0) == 1
    fig = plots.overlay_figure(logged(0.1, 0.2, 0.3), metrics=("loss",), epochs=plots.live_epoch_span(logged(0.3), 30))
    assert fig.layout.xaxis.range[1] <= 1.03  # the first epoch's three batches across the chart, not a thirtieth of it
    assert list(fig.data[0].x) == [0.1, 0.2, 0.3]


def test_a_refused_folder_typed_with_a_tilde_is_named_whole(dashboard_env, monkeypatch):
    """"~/photos of mine" typed: the refusal names the folder it reads, "/home/.../photos of mine", which
    was cut in two on the page ("`/home/me/photos` of mine is outside ...")."""
    home = dashboard_env.parent / f"{dashboard_env.name}-home"  # outside every folder the tests allow
    monkeypatch.setenv("HOME", str(home))
    at = page("pages/1_Train.py").run()
    at.radio(key="data_source").set_value("A folder path").run()
    at.text_input(key="data_path_text").set_value("~/photos of mine").run()
    shown = [e.value for e in at.error if "is outside" in e.value]
    assert shown and shown[0].startswith(f"`{home / 'photos of mine'}` is outside"), shown
    assert at.button(key="train_button").disabled


def test_train_disabled_by_a_setting_names_it_beside_the_button(dashboard_env):
    """A learning rate of 0 typed at the top of the form: beside Train, far below, the page said only
    "fix the settings marked above". It names them."""
    at = page("pages/1_Train.py").run()
    at.text_input(key="f_lr").set_value("0").run()
    assert at.button(key="train_button").disabled
    (why,) = [c.value for c in at.caption if c.value.startswith("Train is disabled")]
    assert "Learning rate must be greater than zero, got 0" in why, why
