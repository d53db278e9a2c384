"""What the pages share: the process-wide job manager, paths, and small drawing helpers.
Only drawing and gathering input here; computation lives in finetune_core."""
from __future__ import annotations

import streamlit as st

from finetune_core.datastore import runs_root
from finetune_core.jobs import JobManager
from finetune_core.runs import list_runs

LIVE_REFRESH_S = 1.0


@st.cache_resource(show_spinner=False)
def _job_manager(runs_dir: str) -> JobManager:
    return JobManager(runs_dir)


def manager() -> JobManager:
    """The one job manager of this server process (shared by every page, tab and browser)."""
    return _job_manager(str(runs_root()))


def page(title: str, icon: str = "🔧") -> None:
    st.set_page_config(page_title=f"{title} · Tuneboard", page_icon=icon, layout="wide")
    manager()  # marks runs left running by a dead server as interrupted, once per process


def state_label(state: str) -> str:
    """A run's state as shown in tables and progress lines (plain words: they read everywhere)."""
    return state.upper() if state in ("failed", "diverged", "interrupted") else state


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_text(job: dict) -> str:
    e = job.get("last_event", {})
    parts = [job.get("message", "")]
    if e.get("kind") == "batch":
        parts.append(f"{format_seconds(e.get('eta_s'))} left")
        parts.append(f"{e.get('images_per_s', 0):.1f} images/s")
    if job.get("queue_position"):
        parts.append(f"place {job['queue_position']} in the queue on {job['device']}")
    return " · ".join(p for p in parts if p)


def job_controls(job: dict, key_prefix: str) -> None:
    """A progress bar, what it is doing, and a Stop button, for one queued or running job."""
    cols = st.columns([6, 1])
    with cols[0]:
        st.progress(min(max(job["progress"], 0.0), 1.0),
                    text=f"**{job['name']}** {state_label(job['state'])}: {progress_text(job)}")
    with cols[1]:
        if job.get("stopping"):
            st.caption("stopping…")
        elif st.button("Stop", key=f"{key_prefix}-stop-{job['run_id']}", help="Stop within one batch"):
            manager().stop(job["run_id"])
            st.rerun(scope="fragment")


def resumable_runs() -> list:
    return [i for i in list_runs(runs_root()) if i.state in ("interrupted", "stopped") and i.has_checkpoint]
