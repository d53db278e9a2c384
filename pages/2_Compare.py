"""Compare: runs side by side (curves, settings that differ, final metrics); rename, tag, delete."""
from __future__ import annotations

import streamlit as st

from finetune_core import analysis, plots
from finetune_core.datastore import runs_root
from finetune_core.runs import RunDir, delete_run, list_runs
from tuneboard_ui import LIVE_REFRESH_S, page, state_label

page("Compare", "📈")
st.title("Compare runs")

runs = [r for r in list_runs(runs_root()) if not r.error]
if not runs:
    st.info("No runs yet: train one on the Train page.")
    st.stop()
by_id = {r.id: r for r in runs}


def label(run_id: str) -> str:
    r = by_id[run_id]
    return f"{r.name} · {state_label(r.state)} · {r.id}"


# Default: the newest group of runs launched together, else the two newest runs.
newest_group = RunDir(runs[0].path).read_config().get("config", {}).get("group", "")
default = [r.id for r in runs if newest_group and
           RunDir(r.path).read_config().get("config", {}).get("group") == newest_group]
if len(default) < 2:
    default = [r.id for r in runs[:2]]
chosen = st.multiselect("Runs", list(by_id), default=default, format_func=label, key="compare_runs")
x_axis = st.radio("Against", ["epoch", "wall time"], horizontal=True, key="compare_x")


@st.fragment(run_every=LIVE_REFRESH_S * 2)
def curves() -> None:
    infos = [by_id[i] for i in chosen]
    labels = analysis.run_labels(infos)
    frames = {labels[i]: RunDir(by_id[i].path).read_metrics() for i in chosen}
    x = "epoch" if x_axis == "epoch" else "elapsed_s"
    st.plotly_chart(plots.overlay_figure(frames, x=x), width="stretch", key="compare_curves")
    table, differing = analysis.compare_table(infos)
    if not table.empty:
        styled = table.style.apply(lambda col: ["background-color: #ffe8cc" if col.name in differing else ""
                                                for _ in col], axis=0)
        st.dataframe(styled, width="stretch", hide_index=True)
        st.caption("Highlighted: the settings that differ between these runs." if differing else
                   "These runs share every setting.")


if chosen:
    curves()
    st.download_button("Download their metrics (CSV)", analysis.metrics_of([by_id[i] for i in chosen]).to_csv(
        index=False), file_name="tuneboard-metrics.csv", mime="text/csv", key="download_metrics")

st.header("Manage a run")
target = st.selectbox("Run", list(by_id), format_func=label, key="manage_run")
info = by_id[target]
meta = RunDir(info.path).read_meta()
cols = st.columns(2)
with cols[0]:
    new_name = st.text_input("Name", value=info.name, key=f"name-{target}")
    tags = st.text_input("Tags (comma-separated)", value=", ".join(meta.get("tags", [])), key=f"tags-{target}")
    if st.button("Save", key="save_meta"):
        RunDir(info.path).write_meta(name=new_name.strip(), tags=[t.strip() for t in tags.split(",") if t.strip()])
        st.success("Saved.")
        st.rerun()
with cols[1]:
    if info.state in ("queued", "running"):
        st.caption(f"This run is {info.state}: stop it before deleting it.")
    else:
        sure = st.checkbox(f"Yes, delete {info.name} and all its files", key=f"sure-{target}")
        if st.button("Delete", disabled=not sure, key="delete_run"):
            try:
                delete_run(info.path)
                st.success(f"Deleted {info.name}.")
                st.rerun()
            except RuntimeError as exc:
                st.error(str(exc))
