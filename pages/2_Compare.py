"""Compare: runs side by side (curves, settings that differ, final metrics); rename, tag, delete."""
from __future__ import annotations

import streamlit as st

from finetune_core import analysis, plots
from finetune_core.config import settings
from finetune_core.datastore import runs_root
from finetune_core.runs import ACTIVE_STATES, RunDir, RunInfo, delete_run, list_runs
from tuneboard_ui import (LIVE_REFRESH_S, chart_controls, curve_panels, flash, keep_run_choice, page,
                          run_choice_label, state_label)


def run_label(info: RunInfo) -> str:
    return run_choice_label(info.name, state_label(info.state), run_id=info.id)


def choose_runs(by_id: dict[str, RunInfo]) -> tuple[list[str], dict]:
    """Which runs, and how their curves are drawn. Opens on analysis.default_selection (the newest group)."""
    keep_run_choice("compare_runs", by_id)
    # the default only on the first draw: the choice is in the session after (keep_run_choice may set it)
    default = None if "compare_runs" in st.session_state else analysis.default_selection(list(by_id.values()))
    chosen = st.multiselect("Runs", list(by_id), default=default, format_func=lambda i: run_label(by_id[i]),
                            key="compare_runs")
    return chosen, chart_controls("compare")


@st.fragment(run_every=LIVE_REFRESH_S * 2)
def curves_section(infos: list[RunInfo], chart: dict) -> None:
    """Their curves overlaid (each run in its own colour, as on every page), and the table of
    settings and final metrics, differences highlighted. `infos` come from the last full rerun:
    their states are read again here, so that a run that ends while the page is open shows it."""
    infos = analysis.refreshed(infos)
    labels = analysis.run_labels(infos)
    frames = {labels[i.id]: RunDir(i.path).read_metrics(max_age_s=LIVE_REFRESH_S) for i in infos}  # half its refresh
    curve_panels(frames, "compare_curves", **plots.run_styles(labels), **chart)
    empty = analysis.runs_without_metrics(infos)
    if empty:
        st.caption("No curves for " + ", ".join(f"**{analysis.markdown_text(labels[i.id])}** ({state_label(i.state)})" for i in empty)
                   + ": no training batch logged yet (queued, or ended before its first batch).")
    table, differing = analysis.compare_table(infos)
    if table.empty:
        return
    styled = table.style.apply(lambda col: ["background-color: rgba(232, 89, 12, 0.22)" if col.name in differing else ""
                                            for _ in col], axis=0)
    column_labels = {name: settings()[name].display_label for name in analysis.COMPARE_SETTINGS}
    st.dataframe(styled, width="stretch", hide_index=True, column_config=column_labels)
    st.caption("Highlighted: the settings that differ between these runs." if differing else
               "These runs share every setting.")


def download_section(infos: list[RunInfo]) -> None:
    st.download_button("Download their metrics (CSV)", analysis.metrics_of(infos).to_csv(index=False),
                       file_name="tuneboard-metrics.csv", mime="text/csv", key="download_metrics")


def manage_section(by_id: dict[str, RunInfo]) -> None:
    """Rename, tag, or delete one run (after asking; never a queued or running one)."""
    st.header("Manage a run")
    keep_run_choice("manage_run", by_id)
    target = st.selectbox("Run", list(by_id), format_func=lambda i: run_label(by_id[i]), key="manage_run")
    info = by_id[target]
    meta = RunDir(info.path).read_meta()
    cols = st.columns(2)
    with cols[0]:
        # A form: the fields' values travel with the Save click itself. As separate widgets, a name
        # typed while the server was busy reached it after the click, and the old name was saved.
        with st.form(key=f"meta-{target}", border=False):
            new_name = st.text_input("Name", value=info.name, key=f"name-{target}")
            tags = st.text_input("Tags (comma-separated)", value=", ".join(meta.get("tags", [])),
                                 key=f"tags-{target}")
            saved = st.form_submit_button("Save", key="save_meta")
        if saved:
            RunDir(info.path).write_meta(name=new_name.strip(), tags=[t.strip() for t in tags.split(",") if t.strip()])
            kept = RunDir(info.path).read_meta()  # what was saved, read back: the message names that
            flash(f"Saved: {analysis.markdown_text(kept.get('name') or info.id)}, tags "
                  f"{analysis.markdown_text(', '.join(kept.get('tags', [])) or 'none')}.")
            st.rerun()
    with cols[1]:
        if info.state in ACTIVE_STATES:
            st.caption(f"This run is {info.state}: stop it before deleting it.")
            return
        if st.session_state.get("confirm_delete") != target:
            if st.button("Delete…", key="delete_run", help="Asks before deleting anything"):
                st.session_state["confirm_delete"] = target
                st.rerun()
            return
        st.warning(f"Delete **{analysis.markdown_text(info.name)}** and all its files (curves, checkpoints, predictions)? This cannot be "
                   "undone.")
        yes, no = st.columns(2)
        if yes.button("Yes, delete it", type="primary", key="delete_confirm"):
            del st.session_state["confirm_delete"]
            try:
                delete_run(info.path)
                flash(f"Deleted {analysis.markdown_text(info.name)}.")
            except RuntimeError as exc:
                flash(analysis.markdown_message(str(exc)), "error")
            st.rerun()
        if no.button("Cancel", key="delete_cancel"):
            del st.session_state["confirm_delete"]
            st.rerun()


def main() -> None:
    page("Compare", "📈")
    st.title("Compare runs")
    every = list_runs(runs_root())
    damaged_notice(every)
    runs = [r for r in every if not r.error]
    if not runs:
        st.info("No runs yet: train one on the Train page.")
        if every:
            manage_section({r.id: r for r in every})  # a damaged folder can still be deleted
        return
    by_id = {r.id: r for r in runs}
    chosen, chart = choose_runs(by_id)
    if chosen:
        infos = [by_id[i] for i in chosen]
        curves_section(infos, chart)
        download_section(infos)
    manage_section({r.id: r for r in every})  # damaged folders too: they can be deleted


def damaged_notice(infos: list[RunInfo]) -> None:
    """Name the damaged run folders: unreadable ones are left out of the comparison."""
    damaged = [r for r in infos if r.error or r.warning]
    if damaged:
        st.warning("Damaged run folders" + (" (unreadable ones are not compared)" if any(r.error for r in damaged)
                                            else "") + ":\n" + "\n".join(f"- `{r.id}`: {r.error or r.warning}"
                                                                          for r in damaged))


main()
