"""The dashboard's pages through Streamlit's AppTest (one page at a time, no browser)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import TINY_BACKBONE, charts, make_dataset, page, plotly_array


def set_text(at: AppTest, key: str, value) -> None:
    at.text_input(key=key).set_value(value)


def use_folder(at: AppTest, path) -> AppTest:
    at.radio(key="data_source").set_value("A folder path").run()
    set_text(at, "data_path_text", str(path))
    return at.run()


def tiny_recipe(at: AppTest, lr="0.01", head="10") -> None:
    at.selectbox(key="f_backbone").set_value(TINY_BACKBONE)
    at.radio(key="f_weights_kind").set_value("none (random init)")
    at.selectbox(key="f_train_stages").set_value("all")
    at.selectbox(key="f_loss_reduction").set_value("mean")
    at.number_input(key="f_image_size").set_value(32)
    at.number_input(key="f_batch_size").set_value(8)
    at.number_input(key="f_epochs").set_value(1)
    set_text(at, "f_lr", lr)
    set_text(at, "f_head_lr_mult", head)


def wait_for_runs(at: AppTest, runs_dir, n: int, timeout: float = 120) -> list[dict]:
    from finetune_core.runs import list_runs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = list_runs(runs_dir)
        if len(infos) >= n and all(i.state not in ("queued", "running") for i in infos):
            return [i.to_dict() for i in infos]
        time.sleep(0.5)
    raise AssertionError(f"runs did not finish: {[(i.id, i.state) for i in list_runs(runs_dir)]}")


def test_home_page_shows_device_backbones_and_runs(dashboard_env):
    from finetune_core.models import device_description, offline_backbones

    at = page("app.py").run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Device"] == device_description().split(" (")[0]
    assert metrics["Backbones with weights offline"] == str(len(offline_backbones()))
    assert any("efficientnet_lite0" in c.value for c in at.caption)
    assert at.button(key="quick_start")
    from finetune_core.config import quick_start_config
    recipe = quick_start_config("digits", offline_backbones())  # the text says what the button will run
    assert any(f"with {recipe.backbone} at {recipe.image_size} px for {recipe.epochs} epochs" in m.value
               for m in at.markdown)


def test_the_sidebar_names_every_page(dashboard_env):
    at = page("app.py").run()
    pages = at._registered_pages.values()  # what st.navigation registered: the sidebar's entries
    assert [p["page_name"] for p in pages] == ["Home", "Train", "Review", "Compare", "Predict"]  # never "app"
    assert [p["url_pathname"] for p in pages] == ["", "Train", "Review", "Compare", "Predict"]  # links keep working
    at.switch_page("pages/2_Compare.py").run()
    assert [t.value for t in at.title] == ["Compare runs"] and not at.exception


@pytest.mark.slow
def test_the_quick_start_queues_once_and_its_message_lasts_while_it_runs(dashboard_env, monkeypatch):
    from finetune_core import config, datastore
    from finetune_core.jobs import wait_until
    from tuneboard_ui import manager

    data = make_dataset(dashboard_env / "tiny", per_class=12, test_per_class=4)
    from conftest import tiny_train_config

    monkeypatch.setattr(datastore, "ensure_example_dataset", lambda *a: data)  # a tiny example, a long run
    monkeypatch.setattr(config, "quick_start_config", lambda *a: tiny_train_config(data, epochs=500, name="quick"))
    at = page("app.py").run()
    at.button(key="quick_start").click().run()
    at.button(key="quick_start").click().run()  # a double click
    assert any("Already queued a moment ago" in t.value for t in at.toast)
    assert len(list((dashboard_env / "runs").iterdir())) == 1
    assert wait_until(lambda: [j["state"] for j in manager().active()] == ["running"], timeout=60)
    at.run()  # a later run of the page: the run is going, the message still says where to look
    (job,) = manager().active()
    assert any("The example is running" in s.value for s in at.success)  # not "queued" once it runs
    manager().stop(job["run_id"])
    assert wait_until(lambda: not manager().active(), timeout=60)
    at.run()
    assert not any("The example is" in s.value for s in at.success)  # gone once it has ended
    recent = at.dataframe[0].value
    assert recent["state"].tolist() == ["stopped"]  # Recent runs: not "queued"
    assert recent["test acc of the kept model"].tolist() == ["-"]  # no accuracy yet, shown as "-", not None


def test_train_page_defaults_to_a_working_offline_example(dashboard_env):
    from finetune_core.config import default_preset
    from finetune_core.models import offline_backbones, resolve_device

    import shutil

    shutil.rmtree(dashboard_env / "data" / "digits")  # a first visit: the page writes the example
    at = page("pages/1_Train.py").run()
    assert not at.exception
    assert (dashboard_env / "data" / "digits").is_dir()
    assert {m.label: m.value for m in at.metric}["Classes"] == "10"
    assert at.selectbox(key="preset").value == default_preset(resolve_device("auto").type)
    assert at.selectbox(key="f_backbone").value in offline_backbones()  # its weights are on this machine
    assert not at.button(key="train_button").disabled


@pytest.mark.parametrize("field,value,text", [
    ("f_lr", "-1", "Learning rate must be greater than zero, got -1"),
    ("f_lr", "abc", "Learning rate must be a number"),
    ("f_head_lr_mult", "0", "Head learning-rate multiplier must be greater than zero"),
    ("f_momentum", "1.5", "Momentum must be below 1"),
    ("f_label_smoothing", "1", "Label smoothing must be below 1"),
    ("f_val_fraction", "0.95", "Validation fraction must be below 0.9"),
])
def test_train_form_refuses_bad_values_next_to_the_field(dashboard_env, field, value, text):
    at = page("pages/1_Train.py").run()
    set_text(at, field, value)
    at.run()
    assert any(text in e.value for e in at.error), [e.value for e in at.error]
    assert at.button(key="train_button").disabled
    set_text(at, field, "0.5")
    at.run()
    assert not at.button(key="train_button").disabled


def test_the_form_is_drawn_from_the_settings_and_greys_out_what_has_no_effect(dashboard_env):
    from finetune_core.config import form_settings, settings

    at = page("pages/1_Train.py").run()
    kinds = ("text_input", "number_input", "checkbox", "selectbox", "radio")
    labels = {w.label for kind in kinds for w in at.get(kind)}
    assert {settings()[n].display_label for n in form_settings()} <= labels
    at.selectbox(key="preset").set_value("book-finetune").run()
    assert at.selectbox(key="f_train_stages").value == "all" and at.text_input(key="f_lr").value == "5e-05"
    assert at.number_input(key="f_feature_views").disabled  # every layer trains on fresh crops
    assert not at.text_input(key="f_head_lr_mult").disabled
    at.checkbox(key="f_param_groups").set_value(False).run()
    assert at.text_input(key="f_head_lr_mult").disabled
    assert any("the multiplier has no effect" in c.value for c in at.caption)
    at.checkbox(key="f_param_groups").set_value(True)
    at.selectbox(key="f_train_stages").set_value("head").run()
    assert at.number_input(key="f_warmup_epochs").disabled and not at.number_input(key="f_feature_views").disabled
    assert not at.checkbox(key="f_param_groups").disabled  # it still decides the head's rate
    assert any("head only" in c.value and "parameters" in c.value for c in at.caption)  # what trains
    assert not at.exception


@pytest.mark.slow
def test_the_lr_finder_draws_its_curve_and_its_suggestion_fills_the_form(dashboard_env):
    data = make_dataset(dashboard_env / "tiny", per_class=12, test_per_class=4)
    at = use_folder(page("pages/1_Train.py").run(), data)
    tiny_recipe(at)
    at.run()
    at.button(key="lr_find_button").click().run()
    assert not at.exception
    curve = next(c for c in charts(at) if c["layout"].get("xaxis", {}).get("type") == "log")
    assert len(plotly_array(curve["data"][0]["x"])) >= 5
    assert not list((dashboard_env / "runs").glob("*"))  # the finder writes no run



class FakeFinder:
    """finetune_core.lr_find.find_lr's stand-in: records what it was given, returns a fixed curve
    or raises what it is told to."""

    def __init__(self, suggestion=0.00123):
        self.suggestion, self.error, self.calls = suggestion, None, []

    def __call__(self, config, report=None, on_event=None, **kwargs):
        from finetune_core.lr_find import LRFinderResult

        self.calls.append((config, report))
        if on_event is not None:
            on_event({"kind": "lr_find", "progress": 0.5, "message": "learning-rate finder: step 1/2"})
        if self.error is not None:
            raise self.error
        return LRFinderResult(lrs=[1e-4, 1e-3, 1e-2, 1e-1, 1.0], losses=[1.0, 0.8, 0.5, 0.4, 2.0],
                              suggestion=self.suggestion)


@pytest.fixture
def fake_finder(monkeypatch):
    from finetune_core import lr_find

    finder = FakeFinder()
    monkeypatch.setattr(lr_find, "find_lr", finder)
    return finder


def finder_curve(at: AppTest):
    return next((c for c in charts(at) if c["layout"].get("xaxis", {}).get("type") == "log"), None)


def test_the_lr_finders_suggestion_fills_the_form_and_it_gets_the_pages_scan(dashboard_env, fake_finder):
    at = page("pages/1_Train.py").run()
    at.button(key="lr_find_button").click().run()
    assert finder_curve(at) is not None and not at.exception
    config, report = fake_finder.calls[0]
    assert report is not None and Path(report.root).resolve() == Path(config.data).resolve()  # no second scan
    at.button(key="lr_find_use").click().run()  # one click puts the suggestion in the form
    assert at.text_input(key="f_lr").value == "0.0012"
    assert finder_curve(at) is not None  # the sweep does not depend on the rate it suggested


def test_the_lr_finders_result_is_cleared_when_the_recipe_or_the_dataset_changes(dashboard_env, fake_finder):
    at = page("pages/1_Train.py").run()
    at.button(key="lr_find_button").click().run()
    assert finder_curve(at) is not None
    at.number_input(key="f_batch_size").set_value(at.number_input(key="f_batch_size").value // 2).run()
    assert finder_curve(at) is None and "lr_find" not in at.session_state  # computed for another recipe
    assert not [b for b in at.button if b.key == "lr_find_use"]

    at.button(key="lr_find_button").click().run()
    assert finder_curve(at) is not None
    data = make_dataset(dashboard_env / "tiny", per_class=12, test_per_class=4)
    use_folder(at, data)
    assert finder_curve(at) is None and "lr_find" not in at.session_state  # computed for another dataset
    assert not at.exception


def test_the_lr_finders_failures_are_messages_not_tracebacks(dashboard_env, fake_finder):
    import torch

    from finetune_core.data import DatasetError
    from finetune_core.models import WeightsUnavailable

    at = page("pages/1_Train.py").run()
    cases = [(WeightsUnavailable("no ImageNet weights for resnet18: place resnet18-f37072fd.pth in /hub"),
              "place resnet18-f37072fd.pth in `/hub`"),  # paths as code
             (DatasetError("no usable images in /d"), "no usable images in `/d`"),
             (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), "Out of memory"),
             (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB"), "Out of memory"),
             (RuntimeError("something broke"), "The learning-rate finder failed: RuntimeError: something broke")]
    for error, text in cases:
        fake_finder.error = error
        at.button(key="lr_find_button").click().run()
        assert not at.exception, (error, at.exception)
        messages = [e.value for e in at.error]
        assert any(text in m for m in messages), (error, messages)
        assert finder_curve(at) is None
        at.run()  # the message stays until the recipe changes or the finder runs again
        assert any(text in e.value for e in at.error), error
    fake_finder.error = None
    at.button(key="lr_find_button").click().run()
    assert finder_curve(at) is not None and not any("failed" in e.value for e in at.error)


def test_the_train_page_shows_what_the_library_says_trains(dashboard_env):
    """The page calls the library directly: a guard around the call once hid a typo, and the
    summary of what trains silently vanished. (Whether the page's scan fits a run, the engine
    decides: test_finetune's test_a_scan_the_caller_made_is_used_instead_of_scanning_again.)"""
    from finetune_core import models

    at = page("pages/1_Train.py").run()
    backbone = models.resolve_backbone(at.selectbox(key="f_backbone").value)[0]
    for stages in ("head", models.train_stages_choices(backbone)[1]):
        at.selectbox(key="f_train_stages").set_value(stages).run()
        summary = models.trainable_summary(backbone, stages, n_classes=10)  # the example: ten digits
        assert summary and any(c.value == summary for c in at.caption), stages


def test_an_unusable_dataset_disables_train(dashboard_env):
    (dashboard_env / "empty" / "only_class").mkdir(parents=True)
    at = use_folder(page("pages/1_Train.py").run(), dashboard_env / "empty")
    assert any("cannot be used" in e.value for e in at.error)
    assert any("(`root/<class>/*`)" in e.value for e in at.error)  # a pattern as code, not Markdown italics
    assert at.button(key="train_button").disabled
    assert any("Train is disabled" in c.value for c in at.caption)


def test_the_train_page_warns_before_launch_when_the_learning_rate_is_far_outside_the_usual_range(dashboard_env):
    data = make_dataset(dashboard_env / "tiny", per_class=4, test_per_class=2)
    at = use_folder(page("pages/1_Train.py").run(), data)
    tiny_recipe(at, lr="0.01")
    at.run()
    assert not [w.value for w in at.warning if "far above" in w.value]
    set_text(at, "f_lr", "100")
    at.run()
    warned = [w.value for w in at.warning if "far above the usual range" in w.value]
    assert len(warned) == 2 and warned[0].startswith("Learning rate 100"), warned
    assert not at.button(key="train_button").disabled  # a warning, not a refusal


@pytest.mark.slow
def test_a_tiny_run_launches_shows_progress_and_its_curves(dashboard_env):
    data = make_dataset(dashboard_env / "tiny", per_class=12, test_per_class=4)
    at = use_folder(page("pages/1_Train.py").run(), data)
    tiny_recipe(at)
    at.number_input(key="f_epochs").set_value(2)
    at.checkbox(key="also_single").set_value(True)  # the comparison run without parameter groups
    at.run()
    assert not at.button(key="train_button").disabled, [e.value for e in at.error]
    at.button(key="train_button").click().run()
    runs = wait_for_runs(at, dashboard_env / "runs", 2)
    assert {r["state"] for r in runs} == {"completed"}
    at.run()
    assert not at.exception
    spec = charts(at)[-1]  # the live curves: both runs, one chart per metric, test accuracy last
    names = {t["name"] for t in spec["data"]}
    assert len(names) == 2 and any("one group" in n for n in names)
    test_acc = spec["data"]
    # each chart in a column of its own: side by side on a wide screen, stacked on a phone
    assert sum(len(column.get("plotly_chart")) == 1 for column in at.columns) >= 3
    assert len(test_acc) == 2 and all(len(plotly_array(t["x"])) == 2 for t in test_acc)  # a point an epoch
    from finetune_core.runs import RunDir

    configs = [RunDir(r["path"]).read_config()["config"] for r in runs]
    assert sorted(c["param_groups"] for c in configs) == [False, True]
    assert all(c["lr"] == 0.01 and c["head_lr_mult"] == 10 for c in configs)


@pytest.mark.slow
def test_train_turns_to_the_live_tab_and_a_double_click_queues_once(dashboard_env):
    data = make_dataset(dashboard_env / "tiny", per_class=12, test_per_class=4)
    at = use_folder(page("pages/1_Train.py").run(), data)
    tiny_recipe(at)
    at.number_input(key="f_epochs").set_value(200)
    at.run()
    assert [t.label for t in at.tabs] == ["Setup", "Live"] and at.session_state["train_tab"] == "Setup"
    at.button(key="train_button").click().run()
    assert at.session_state["train_tab"] == "Live"  # where the eye goes after pressing Train
    assert any("Queued 1 run" in t.value for t in at.toast)
    assert not at.success  # no banner above the tabs that would outlive the run (the toast passes)
    at.button(key="train_button").click().run()  # the second click of a double click
    assert any("Already queued a moment ago" in t.value for t in at.toast)
    assert len(list((dashboard_env / "runs").iterdir())) == 1
    again = page("pages/1_Train.py").run()  # a new session opens on Live while a run is active
    assert again.session_state["train_tab"] == "Live"
    next(b for b in again.button if b.label == "Stop").click().run()
    assert any("stopping" in c.value for c in again.caption)  # at once, before the run has ended
    assert wait_for_runs(again, dashboard_env / "runs", 1, timeout=60)[0]["state"] == "stopped"
    assert again.run().session_state["train_tab"] == "Live"  # it does not jump back when the run ends


@pytest.mark.slow
def test_train_queues_the_values_typed_just_before_the_click(dashboard_env):
    """A name typed and Train clicked at once (the browser sends both with the click): the run has
    that name and rate, not the settings of the page as it was drawn before."""
    data = make_dataset(dashboard_env / "tiny", per_class=12, test_per_class=4)
    at = use_folder(page("pages/1_Train.py").run(), data)
    tiny_recipe(at)
    at.run()
    set_text(at, "f_name", "typed-then-clicked")
    set_text(at, "f_lr", "0.005")  # no run between these and the click
    at.button(key="train_button").click().run()
    runs = wait_for_runs(at, dashboard_env / "runs", 1, timeout=120)
    from finetune_core.runs import RunDir

    config = RunDir(runs[0]["path"]).read_config()["config"]
    assert config["name"] == "typed-then-clicked" and config["lr"] == 0.005


def test_a_train_click_left_by_a_page_change_is_not_acted_on_later(dashboard_env):
    """Train clicked, then another page opened before the Train page ran: coming back much later
    does not queue a run from whatever the form holds by then."""
    data = make_dataset(dashboard_env / "tiny", per_class=12, test_per_class=4)
    at = use_folder(page("pages/1_Train.py").run(), data)
    tiny_recipe(at)
    at.session_state["launch_requested"] = time.monotonic() - 120  # the click, two minutes ago
    at.run()
    assert not (dashboard_env / "runs").exists() or not list((dashboard_env / "runs").iterdir())
    assert "launch_requested" not in at.session_state


@pytest.mark.slow
def test_a_run_without_metrics_says_so_instead_of_drawing_empty_charts(dashboard_env):
    from conftest import tiny_train_config
    from finetune_core.jobs import wait_until
    from tuneboard_ui import manager

    config = tiny_train_config(make_dataset(dashboard_env / "tiny", per_class=12, test_per_class=4), epochs=500,
                               group="g")
    at = page("pages/1_Train.py")
    at.session_state["group"] = "g"  # the group this tab launched
    long = manager().submit(config.replace(name="long"))
    manager().stop(manager().submit(config.replace(name="never")))  # stopped while queued: no metrics
    at.run()
    assert any("No curves for never" in c.value for c in at.caption)
    manager().stop(long)
    assert wait_until(lambda: not manager().active(), timeout=60) and not at.exception


@pytest.mark.slow
def test_a_second_session_sees_the_running_job(dashboard_env):
    data = make_dataset(dashboard_env / "tiny", per_class=12, test_per_class=4)
    at = use_folder(page("pages/1_Train.py").run(), data)
    tiny_recipe(at)
    at.number_input(key="f_epochs").set_value(200)
    at.run()
    at.button(key="train_button").click().run()
    other = page("pages/1_Train.py").run()  # a refresh: new session, same server
    texts = " ".join(str(p.proto.text) for p in other.get("progress")).replace("\\_", "_")  # markdown's escape
    assert TINY_BACKBONE in texts and ("running" in texts or "queued" in texts)
    stop = [b for b in other.button if b.label == "Stop"]
    stop[0].click().run()
    runs = wait_for_runs(other, dashboard_env / "runs", 1, timeout=60)
    assert runs[0]["state"] == "stopped"


@pytest.mark.slow
def test_an_interrupted_run_is_offered_for_resume_and_finishes(dashboard_env, tiny_config):
    from finetune_core.engine import train
    from finetune_core.runs import RunDir

    runs = dashboard_env / "runs"
    stop_after_first_epoch = threading.Event()
    train(tiny_config.replace(epochs=3), runs / "20260101-000000-cut", cache_dir="", stop_event=stop_after_first_epoch,
          on_event=lambda e: e["kind"] == "epoch" and stop_after_first_epoch.set())
    RunDir(runs / "20260101-000000-cut").write_status(state="running")  # as a server that died leaves it
    at = page("pages/1_Train.py").run()  # a new server process marks it interrupted
    assert RunDir(runs / "20260101-000000-cut").read_status()["state"] == "interrupted"
    at.button(key="resume-20260101-000000-cut").click().run()
    infos = wait_for_runs(at, runs, 1)
    assert infos[0]["state"] == "completed"
    metrics = RunDir(runs / "20260101-000000-cut").read_metrics()
    assert list(metrics[metrics["kind"] == "epoch"]["epoch"]) == [1, 2, 3]


def test_use_this_folder_fills_the_folder_box_without_an_error(dashboard_env):
    at = page("pages/1_Train.py").run()
    make_dataset(dashboard_env / "data" / "mine", per_class=4, test_per_class=2)
    at.radio(key="data_source").set_value("A folder path").run()
    at.selectbox(key="browse_pick").set_value("mine").run()
    next(b for b in at.button if b.label == "Use this folder").click().run()
    assert not at.exception
    assert at.text_input(key="data_path_text").value == str((dashboard_env / "data" / "mine").resolve())
    assert at.button(key="train_button")  # the recipe and Train are still drawn



def test_use_this_folder_takes_the_sub_folder_picked_just_before_the_click(dashboard_env):
    """A pick and the click in one go, before the page is drawn again (a quick user; the browser
    test on a busy machine): the folder used is the one picked, not the one the button was drawn with."""
    at = page("pages/1_Train.py").run()
    make_dataset(dashboard_env / "data" / "mine", per_class=4, test_per_class=2)
    at.radio(key="data_source").set_value("A folder path").run()
    at.selectbox(key="browse_pick").set_value("mine")  # no run between the pick and the click
    next(b for b in at.button if b.label == "Use this folder").click().run()
    assert at.text_input(key="data_path_text").value == str((dashboard_env / "data" / "mine").resolve())


def test_a_typed_folder_outside_the_data_root_is_refused_by_name(dashboard_env, monkeypatch):
    monkeypatch.delenv("TUNEBOARD_EXTRA_DATA_ROOTS")
    outside = make_dataset(dashboard_env / "tiny", per_class=4, test_per_class=2)
    at = use_folder(page("pages/1_Train.py").run(), outside)
    errors = " ".join(e.value for e in at.error)
    assert f"`{outside.resolve()}` is outside the data folder `{(dashboard_env / 'data').resolve()}`" in errors
    assert at.button(key="train_button").disabled
    inside = make_dataset(dashboard_env / "data" / "mine", per_class=4, test_per_class=2)
    at = use_folder(at, inside)
    assert not at.error and not at.button(key="train_button").disabled


def test_a_weights_file_outside_the_data_root_is_refused_by_name(dashboard_env, monkeypatch):
    """The weights box is held to the data roots like the folder box: a server reachable from the
    network must not open any file of the machine for whoever types its path."""
    monkeypatch.delenv("TUNEBOARD_EXTRA_DATA_ROOTS")
    data = make_dataset(dashboard_env / "data" / "mine", per_class=4, test_per_class=2)
    outside = dashboard_env / "elsewhere" / "weights.pt"
    outside.parent.mkdir()
    outside.write_bytes(b"not read")
    at = use_folder(page("pages/1_Train.py").run(), data)
    at.radio(key="f_weights_kind").set_value("a local file").run()
    set_text(at, "f_weights_path", str(outside))
    at.run()
    errors = " ".join(e.value for e in at.error)
    assert f"{outside.resolve()}` is outside the data folder" in errors and "reads weights files only" in errors
    assert at.button(key="train_button").disabled
    inside = dashboard_env / "data" / "weights.pt"
    inside.write_bytes(b"not read either")
    set_text(at, "f_weights_path", "weights.pt")  # relative: inside the data folder, as for datasets
    at.run()
    assert not [e.value for e in at.error if "weights" in e.value]  # found there: the form takes it
    assert not at.button(key="train_button").disabled


def test_a_number_out_of_range_is_refused_by_name_not_replaced(dashboard_env):
    """A batch size of 0 typed in the form: the page names the setting and the range and keeps Train
    disabled (the browser's own range check used to keep 64 under the 0 shown, and train at 64)."""
    data = make_dataset(dashboard_env / "data" / "mine", per_class=4, test_per_class=2)
    at = use_folder(page("pages/1_Train.py").run(), data)
    at.number_input(key="f_batch_size").set_value(0).run()
    assert at.number_input(key="f_batch_size").value == 0  # what the user typed is what is checked
    errors = " ".join(e.value for e in at.error)
    assert "Batch size must be at least 1, got 0" in errors, errors
    assert at.button(key="train_button").disabled


def test_the_folder_browser_offers_no_way_up_from_the_data_folder(dashboard_env):
    make_dataset(dashboard_env / "data" / "mine" / "inner", per_class=4, test_per_class=2)
    at = page("pages/1_Train.py").run()
    at.radio(key="data_source").set_value("A folder path").run()
    assert ".." not in at.selectbox(key="browse_pick").options  # the top: nothing above to open
    at.selectbox(key="browse_pick").set_value("mine").run()
    next(b for b in at.button if b.label == "Open").click().run()
    assert ".." in at.selectbox(key="browse_pick").options  # one level down: back up


def test_a_local_weights_file_without_a_path_asks_for_one(dashboard_env):
    data = make_dataset(dashboard_env / "data" / "mine", per_class=4, test_per_class=2)
    at = use_folder(page("pages/1_Train.py").run(), data)
    at.radio(key="f_weights_kind").set_value("a local file").run()
    errors = " ".join(e.value for e in at.error)
    assert "type the path of a weights file" in errors.lower() and "'auto', 'none'" not in errors, errors
    assert at.button(key="train_button").disabled


@pytest.mark.slow
def test_a_stopped_run_is_offered_for_resume_and_finishes(dashboard_env, tiny_config):
    from finetune_core.engine import train
    from finetune_core.runs import RunDir

    runs = dashboard_env / "runs"
    stop = threading.Event()
    status = train(tiny_config.replace(epochs=2), runs / "20260101-000000-stop", cache_dir="", stop_event=stop,
                   on_event=lambda e: e["kind"] == "epoch" and stop.set())
    assert status["state"] == "stopped" and "can be resumed" in status["message"]
    at = page("pages/1_Train.py").run()
    at.button(key="resume-20260101-000000-stop").click().run()
    assert wait_for_runs(at, runs, 1)[0]["state"] == "completed"
    metrics = RunDir(runs / "20260101-000000-stop").read_metrics()
    assert list(metrics[metrics["kind"] == "epoch"]["epoch"]) == [1, 2]


@pytest.mark.slow
def test_a_sweep_queues_its_grid_as_one_group_and_fills_a_heatmap_whose_best_cell_fills_the_form(dashboard_env):
    from finetune_core import plots, sweep
    from finetune_core.runs import RunDir

    data = make_dataset(dashboard_env / "tiny", per_class=4, test_per_class=2)
    at = use_folder(page("pages/1_Train.py").run(), data)
    tiny_recipe(at)
    at.checkbox(key="sweep_on").set_value(True).run()
    set_text(at, "sweep_lrs", "0.01, -1")
    at.run()
    assert any("Learning rate must be greater than zero, got -1" in e.value for e in at.error)
    assert at.button(key="train_button").disabled
    set_text(at, "sweep_lrs", "0.01 0.03")
    set_text(at, "sweep_mults", "10")
    at.run()
    assert not at.button(key="train_button").disabled, [e.value for e in at.error]
    assert any("Train queues 2 runs" in c.value for c in at.caption)
    at.button(key="train_button").click().run()
    runs = wait_for_runs(at, dashboard_env / "runs", 2)
    configs = {r["id"]: RunDir(r["path"]).read_config()["config"] for r in runs}
    assert sorted((c["lr"], c["head_lr_mult"]) for c in configs.values()) == [(0.01, 10.0), (0.03, 10.0)]
    assert len({c["group"] for c in configs.values()}) == 1 and sweep.is_sweep_group(runs[0]["group"])
    at.run()
    assert not at.exception
    heatmap = next(c for c in charts(at) if c["data"][0]["type"] == "heatmap")
    assert "2 of 2 runs finished" in heatmap["layout"]["title"]["text"]
    assert sum("★" in cell for row in heatmap["data"][0]["text"] for cell in row) == 1
    live = charts(at)[-1]  # the cells' curves overlaid, each in its run's colour
    colors = plots.run_colors(configs)
    assert {t["line"]["color"] for t in live["data"]} == set(colors.values())
    best = next(b for b in at.button if b.key == "sweep_use_best")
    best.click().run()
    grid = sweep.sweep_grid(sweep.sweep_table([r["path"] for r in runs]))
    assert at.text_input(key="f_lr").value == f"{grid.best_values[0]:g}"
    assert at.text_input(key="f_head_lr_mult").value == "10"


def test_the_sweep_takes_its_learning_rates_around_the_finders_suggestion(dashboard_env, fake_finder):
    data = make_dataset(dashboard_env / "tiny", per_class=4, test_per_class=2)
    at = use_folder(page("pages/1_Train.py").run(), data)
    tiny_recipe(at)
    at.run()
    at.button(key="lr_find_button").click().run()
    at.checkbox(key="sweep_on").set_value(True).run()
    at.button(key="sweep_from_finder").click().run()
    assert not at.exception
    assert at.text_input(key="sweep_lrs").value == "0.00041, 0.0012, 0.0037"  # around 0.00123
    assert any("Train queues 9 runs" in c.value for c in at.caption)  # with the default multipliers 1, 10, 30


@pytest.mark.slow
def test_stop_the_sweep_stops_every_run_of_it(dashboard_env):
    data = make_dataset(dashboard_env / "tiny", per_class=4, test_per_class=2)
    at = use_folder(page("pages/1_Train.py").run(), data)
    tiny_recipe(at)
    at.number_input(key="f_epochs").set_value(200)
    at.checkbox(key="sweep_on").set_value(True).run()
    set_text(at, "sweep_lrs", "0.01 0.03")
    set_text(at, "sweep_mults", "1 10")
    at.run()
    at.button(key="train_button").click().run()
    at.button(key="sweep_stop").click().run()
    runs = wait_for_runs(at, dashboard_env / "runs", 4, timeout=60)
    assert [r["state"] for r in runs] == ["stopped"] * 4
    at.run()
    assert not at.exception and not [b for b in at.button if b.key == "sweep_stop"]


@pytest.mark.slow
def test_a_run_stopped_in_the_live_view_offers_resume_next_to_its_message(dashboard_env):
    from conftest import tiny_train_config
    from finetune_core.jobs import wait_until
    from tuneboard_ui import manager

    # epochs to spare: the tiny backbone trains an epoch in a moment, and a run that completed before
    # the stop landed would offer no Resume
    config = tiny_train_config(make_dataset(dashboard_env / "tiny", per_class=12, test_per_class=4), epochs=30,
                               group="g", name="stopped mid-run")
    at = page("pages/1_Train.py")
    at.session_state["group"] = "g"
    run_id = manager().submit(config)
    assert wait_until(lambda: any(j["run_id"] == run_id and j["last_event"].get("kind") == "batch"
                                  for j in manager().jobs()), timeout=60)
    while any(j["run_id"] == run_id and j["state"] == "running" for j in manager().jobs()):
        if (dashboard_env / "runs" / run_id / "checkpoint_last.pt").exists():
            manager().stop(run_id)
        wait_until(lambda: False, timeout=0.2)
    at.run()
    assert not at.exception
    at.button(key=f"live-resume-{run_id}").click().run()  # the button sits in the Live view, no reload needed
    assert wait_until(lambda: any(j["run_id"] == run_id and j["state"] == "completed" for j in manager().jobs()),
                      timeout=120)


def test_a_link_in_the_data_folder_that_leads_out_of_it_is_refused_like_a_typed_one(dashboard_env, monkeypatch,
                                                                                      tmp_path_factory):
    outside = make_dataset(tmp_path_factory.mktemp("elsewhere") / "pets", per_class=2, test_per_class=1)
    (dashboard_env / "data").mkdir(exist_ok=True)
    (dashboard_env / "data" / "pets-link").symlink_to(outside, target_is_directory=True)
    monkeypatch.delenv("TUNEBOARD_EXTRA_DATA_ROOTS")
    at = page("pages/1_Train.py").run()
    at.radio(key="data_source").set_value("A dataset in the data folder").run()
    at.selectbox(key="data_choice").set_value("pets-link").run()
    assert not at.exception
    assert any("is outside the data folder" in e.value and str(outside.resolve()) in e.value for e in at.error)
    assert at.button(key="train_button").disabled


def test_a_missing_folder_or_a_file_is_named_once_in_plain_words(dashboard_env):
    (dashboard_env / "data").mkdir(exist_ok=True)
    (dashboard_env / "data" / "notes.txt").write_text("not a dataset")
    at = use_folder(page("pages/1_Train.py").run(), dashboard_env / "data" / "nope")
    assert any("no such folder" in e.value for e in at.error) and not any("Errno" in e.value for e in at.error)
    at = use_folder(at, dashboard_env / "data" / "notes.txt")
    errors = [e.value for e in at.error]
    assert errors and all(e.count("notes.txt") == 1 for e in errors), errors


def test_settings_left_at_auto_say_what_they_come_to_for_the_dataset(dashboard_env):
    """The fast preset leaves epochs and cached views at 0 (auto): the form says the numbers in
    force for this dataset instead of a bare 0 that reads as zero epochs."""
    from finetune_core.config import PRESETS, TrainConfig
    from finetune_core.data import scan_dataset
    from finetune_core.engine import resolve_auto

    data = make_dataset(dashboard_env / "data" / "mine", per_class=12, test_per_class=4)
    at = use_folder(page("pages/1_Train.py").run(), data)
    at.selectbox(key="preset").set_value("fast").run()
    assert PRESETS["fast"]["epochs"] == 0 and PRESETS["fast"]["feature_views"] == 0
    assert at.number_input(key="f_epochs").value == 0
    config = resolve_auto(TrainConfig(**{**PRESETS["fast"], "data": str(data)}), scan_dataset(data))
    captions = [c.value for c in at.caption]
    assert f"0 = auto: {config.epochs} epochs for this dataset and trainable part." in captions, captions
    assert f"0 = auto: {config.feature_views} views per image for this dataset." in captions, captions
    at.number_input(key="f_epochs").set_value(3).run()  # a number of one's own: no remark
    assert not any(c.value.startswith("0 = auto") and "epochs" in c.value for c in at.caption)
