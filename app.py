"""Tuneboard: the pages with their titles (st.navigation), and the home page: what is running,
recent runs, the device, offline backbones, a quick start."""
from __future__ import annotations

import streamlit as st

from finetune_core import analysis, cachestore, datastore, downloads, memory
from finetune_core.config import quick_start_config
from finetune_core.jobs import DuplicateSubmission
from finetune_core.models import device_description, offline_backbones, resolve_device
from finetune_core.runs import KEPT_NAME, SCORE_NAME, list_runs
from tuneboard_ui import (LIVE_REFRESH_S, flash, format_seconds, job_controls, manager, page, state_label, submit,
                          weights_downloads)


def machine_section(offline: list[str]) -> None:
    """The device, the backbones that work offline, the data folder; a note if memory settings are off."""
    c = st.columns(3)
    device = device_description()
    c[0].metric("Device", device.split(" (")[0])
    c[0].caption(f"{device}; {memory.describe()}")
    c[1].metric("Backbones with weights offline", f"{len(offline)}")
    c[1].caption(", ".join(offline) or "none: train from scratch or place weights in the torch or Hugging Face cache")
    c[2].metric("Data folder", datastore.data_root().name)
    c[2].caption(str(datastore.data_root()))
    if memory.wanted() and not memory.is_tuned() and resolve_device("auto").type == "cpu":
        st.info("This server was started without Tuneboard's memory settings, so training on the CPU runs up to "
                "2x slower. Start it with `python serve.py` instead of `streamlit run app.py`.")


def cache_section() -> None:
    """The decode cache's size against its budget, and a button that empties it. Sizes in MiB and
    GiB (powers of 1024), as the _MB variables are read (cachestore.megabytes_from_env)."""
    used, folder = cachestore.cache_size(), cachestore.default_cache_dir()
    try:
        budget = f"{cachestore.budget_bytes() / 1024**3:.1f} GiB"
    except ValueError as exc:
        budget = f"the default {cachestore.DEFAULT_BUDGET_MB / 1024:.1f} GiB ({exc})"
    c = st.columns([3, 1])
    c[0].caption(f"Decode cache: {used / 1024**2:.0f} MiB of {budget} ({folder}; "
                 f"{cachestore.BUDGET_VARIABLE} sets the budget). Clearing it costs only time: "
                 "the next run decodes its photos again.")
    if c[1].button("Clear the cache", key="clear_cache", disabled=not used):
        try:
            freed = cachestore.clear_cache()
        except ValueError as exc:  # a cache folder that overlaps the data folder
            st.error(f"Not cleared: {analysis.markdown_message(str(exc))}")
            return
        flash(f"Cleared the decode cache ({freed / 1024**2:.0f} MiB).", "info")
        st.rerun()


def quick_start_section(offline: list[str]) -> None:
    """One click: the fast preset on the built-in example (config.quick_start_config)."""
    st.subheader("Quick start")
    recipe = quick_start_config(str(datastore.data_root() / datastore.EXAMPLE_NAME), offline)
    st.write("Train the fast preset on the built-in example (handwritten digits, no internet needed), "
             f"with {recipe.backbone} at {recipe.image_size} px for {recipe.epochs} epochs"
             f"{' from scratch' if recipe.weights == 'none' else ''}: small, to see it all work in minutes.")
    if st.button("Start the example", type="primary", key="quick_start"):
        recipe = recipe.replace(data=str(datastore.ensure_example_dataset()))
        try:
            st.session_state["quick_start_run"] = submit(recipe)
        except DuplicateSubmission as exc:  # a double click
            flash(f"Already queued a moment ago: run {exc.run_id}.", "info")
            st.rerun()


@st.fragment(run_every=LIVE_REFRESH_S)
def live_sections() -> None:
    """What is running and the recent runs, refreshed together: a run's state is the same in both."""
    running_section()
    recent_runs_section()


def running_section() -> None:
    st.subheader("Running and queued")
    active = manager().active()
    started = next((j for j in active if j["run_id"] == st.session_state.get("quick_start_run")), None)
    if started is not None:
        st.success(f"The example is {started['state']}: follow it here or on the Train page.")
    if not active:
        st.caption("Nothing is training right now.")
    for job in active:
        job_controls(job, "home")
    for download in weights_downloads().active():  # started on the Train page, which has its Stop
        st.progress(download["fraction"] or 0.0, text=f"Downloading the weights of {download['backbone']}: "
                                                      f"{downloads.progress_text(download)}")


def recent_runs_section() -> None:
    st.subheader("Recent runs")
    runs = list_runs(datastore.runs_root())[:20]
    if not runs:
        st.caption("No runs yet.")
        return
    st.dataframe([{
        "run": r.name, "state": state_label(r.state) if not r.error else "damaged",
        "dataset": r.dataset, "backbone": r.backbone,
        SCORE_NAME: "-" if r.score.test_acc is None else f"{r.score.test_acc:.3f}", KEPT_NAME: r.kept_text(),
        "duration": format_seconds(r.duration_s), "message": r.error or r.warning or r.message,
    } for r in runs], width="stretch", hide_index=True)


def home() -> None:
    page("Home", "🌭")
    st.title("Tuneboard")
    st.write("Fine-tune an ImageNet-pretrained image classifier on your own photos: pick a folder, set the "
             "learning rate and the head's multiplier, press Train, and watch it learn. It starts from the "
             "fine-tuning chapter of *Dive into Deep Learning*.")
    offline = offline_backbones()
    machine_section(offline)
    cache_section()
    quick_start_section(offline)
    live_sections()


# Titled pages: the sidebar says Home, Train, Compare, Predict (not the file names); the URLs stay.
st.navigation([st.Page(home, title="Home", icon=":material/home:", default=True),
               st.Page("pages/1_Train.py", title="Train", icon=":material/model_training:", url_path="Train"),
               st.Page("pages/2_Review.py", title="Review", icon=":material/rule:", url_path="Review"),
               st.Page("pages/2_Compare.py", title="Compare", icon=":material/monitoring:", url_path="Compare"),
               st.Page("pages/3_Predict.py", title="Predict", icon=":material/image_search:",
                       url_path="Predict")]).run()
