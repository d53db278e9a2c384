"""Compare -> Manage keeps to the run the user picked, by id, through a rename (issue 25, items 2-3)."""
from __future__ import annotations

from conftest import page
from finetune_core.runs import RunDir
from test_compare_predict import write_run


def browser_still_holds(at, shown: str) -> None:
    """What Chromium sends after the rename: Streamlit's frontend keeps a choice as the label it
    showed, so the pickers send the run's old label until the user picks again (AppTest would
    re-label the choice from its value; this puts the old label back)."""
    at.selectbox(key="manage_run").options.append(shown)
    at.selectbox(key="manage_run").set_value(shown)
    chips = at.multiselect(key="compare_runs")
    chips.set_value([shown if v == shown.rsplit(" · ", 1)[-1] else v for v in chips.value])


def test_after_a_rename_delete_cancel_and_the_chart_keep_to_the_renamed_run(dashboard_env):
    """The issue's steps: pick a run that is not first, rename it, Save, Delete...: the question
    names the renamed run, Cancel keeps it selected, and it stays in the chart's selection."""
    runs = dashboard_env / "runs"
    for k, name in enumerate(["first", "second", "third"]):
        write_run(runs, f"20260101-00000{k}-{name}")
    target = "20260101-000001-second"  # list_runs is newest first: third, second, first
    at = page("pages/2_Compare.py").run()
    at.multiselect(key="compare_runs").set_value([target, "20260101-000000-first"]).run()
    at.selectbox(key="manage_run").set_value(target).run()
    shown = at.selectbox(key="manage_run").options[at.selectbox(key="manage_run").index]
    at.text_input(key=f"name-{target}").set_value("renamed")
    at.button(key="save_meta").click().run()
    assert RunDir(runs / target).read_meta()["name"] == "renamed"
    browser_still_holds(at, shown)
    at.button(key="delete_run").click().run()
    assert at.selectbox(key="manage_run").value == target
    assert sorted(at.multiselect(key="compare_runs").value) == ["20260101-000000-first", target]
    assert any("Delete **renamed**" in w.value for w in at.warning)
    at.button(key="delete_cancel").click().run()
    assert at.selectbox(key="manage_run").value == target and not at.warning
    assert not at.exception


def test_the_name_and_tags_are_sent_with_the_save_click_and_the_message_says_what_was_saved(dashboard_env):
    """Name and tags sit in one form with Save, so the browser sends the values shown at the click
    with the click (a separate text box's value could reach a busy server after it); the message
    names what the run now holds, tags as saved, not as typed."""
    runs = dashboard_env / "runs"
    target = "20260101-000000-only"
    write_run(runs, target)
    at = page("pages/2_Compare.py").run()
    assert {at.text_input(key=f"name-{target}").form_id, at.text_input(key=f"tags-{target}").form_id,
            at.button(key="save_meta").form_id} == {f"meta-{target}"}
    at.text_input(key=f"name-{target}").set_value("  new name ")
    at.text_input(key=f"tags-{target}").set_value(" a,, b ,")
    at.button(key="save_meta").click().run()
    assert RunDir(runs / target).read_meta() == {"name": "new name", "tags": ["a", "b"]}
    assert any(s.value == "Saved: new name, tags a, b." for s in at.success)
