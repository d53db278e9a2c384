"""What the pages share: the process-wide job manager, paths, and small drawing helpers.
Only drawing and gathering input here; computation lives in finetune_core."""
from __future__ import annotations


import streamlit as st

from finetune_core import analysis, plots
from finetune_core.config import Setting, TrainConfig
from finetune_core.datastore import runs_root
from finetune_core.downloads import WeightsDownloads
from finetune_core.jobs import JobManager
from finetune_core.runs import RESUMABLE_STATES, list_runs

# How often an open page's live part reruns, and how often the Train page's live curves do. Every
# rerun of every open tab takes the GIL from the training thread of this same process: with Train
# -> Live in two tabs and Home in a third, reruns every second with the curves built and serialised
# each time slowed a run about 4x (benchmarks/bench_tabs.py). Progress every 2 s; the curves in a
# fragment of their own every 6 s.
LIVE_REFRESH_S = 2.0
CURVES_REFRESH_S = 6.0


@st.cache_resource(show_spinner=False)
def _job_manager(runs_dir: str) -> JobManager:
    return JobManager(runs_dir)


def manager() -> JobManager:
    """The one job manager of this server process (shared by every page, tab and browser)."""
    return _job_manager(str(runs_root()))


@st.cache_resource(show_spinner=False)
def weights_downloads() -> WeightsDownloads:
    """The one set of weight downloads of this server process (the Train page's Download)."""
    return WeightsDownloads()


def submit(config: TrainConfig, report=None) -> str:
    """Queue a run; the page's dataset scan goes with it (the run uses it when it fits the settings
    instead of scanning again)."""
    return manager().submit(config, report=report)


def page(title: str, icon: str = "🔧") -> None:
    st.set_page_config(page_title=f"{title} · Tuneboard", page_icon=icon, layout="wide")
    manager()  # marks runs left running by a dead server as interrupted, once per process
    show_flash()


def flash(message: str, kind: str = "success") -> None:
    """A confirmation for the next run of the page (an action that reruns the page at once would
    otherwise draw its message and wipe it in the same instant)."""
    st.session_state["flash"] = (kind, message)


def show_flash() -> None:
    """The confirmation left by the last action, once; also as a toast, where the eye is. Its slot
    is drawn on every run, message or not: an element that comes and goes above the Train page's
    tabs shifts them, the browser then draws them anew on their first tab, and the page jumped back
    from Live to Setup after Train (seen in CI)."""
    kind, message = st.session_state.pop("flash", (None, None))
    slot = st.empty()
    if message:
        getattr(slot, kind)(message)
        st.toast(message)


def picture(path: str, caption: str | None = None) -> None:
    """An image file, or a placeholder naming it where it cannot be shown (moved, deleted or
    damaged since a run or a review listed it): a missing file must not stop the page."""
    shown, problem = analysis.gallery_picture(path)
    if shown is None:
        st.info(analysis.markdown_message(problem, paths=(path,)), icon=":material/hide_image:")
    else:
        st.image(shown, width="stretch", caption=caption)


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
    """What the job does, then its phase with that phase's own rate and time left (finetune_core.phases)."""
    parts = [job.get("message", "")]
    phase = job.get("phase") or {}
    if job.get("state") == "running" and phase.get("phase"):
        rates = ([f"{phase['images_per_s']:,.1f} images/s"] if phase.get("images_per_s") is not None else []) + \
                ([f"{format_seconds(phase['eta_s'])} left of it"] if phase.get("eta_s") is not None else [])
        parts.append(phase["phase"] + (f" ({', '.join(rates)})" if rates else ""))
    if job.get("queue_position"):
        parts.append(f"place {job['queue_position']} in the queue on {job['device']}")
    return " · ".join(p for p in parts if p)


def job_controls(job: dict, key_prefix: str) -> None:
    """A progress bar, what it is doing, and a Stop button, for one queued or running job. A click
    shows "stopping…" in the same run, in place of the button (the run stops within a batch)."""
    cols = st.columns([6, 1])
    with cols[1]:
        slot = st.empty()
        if not job.get("stopping") and slot.button("Stop", key=f"{key_prefix}-stop-{job['run_id']}",
                                                   help="Stop within a second or one batch"):
            manager().stop(job["run_id"])
            job = manager().job(job["run_id"]) or job
        if job.get("stopping"):
            slot.caption("stopping…")
    with cols[0]:
        st.progress(min(max(job["progress"], 0.0), 1.0),
                    text=f"**{analysis.markdown_text(job['name'])}** {state_label(job['state'])}: "
                         f"{analysis.markdown_text(progress_text(job))}")


def chart_controls(key_prefix: str) -> dict:
    """The curves' controls, as TensorBoard has them: the x axis (epoch, step or wall time), the
    smoothing (its exponential moving average; the raw curve stays faint behind) and a log-scale
    loss. Returns plots.overlay_figure's keyword arguments."""
    cols = st.columns([3, 3, 2])
    x = cols[0].radio("Against", list(plots.X_AXES), horizontal=True, key=f"{key_prefix}_x")
    smoothing = cols[1].slider("Smoothing", min_value=0.0, max_value=0.99, value=0.0, step=0.01,
                               key=f"{key_prefix}_smoothing",
                               help="An exponential moving average of each curve (TensorBoard's, debiased): 0 "
                                    "draws the logged values, 0.9 a strong average; the raw curve stays faint")
    log_loss = cols[2].checkbox("Log-scale loss", key=f"{key_prefix}_log_loss")
    return {"x": plots.X_AXES[x], "smoothing": smoothing, "log_loss": log_loss}


def run_choice_label(name: str, *details: str, run_id: str) -> str:
    """How a run picker shows a run: its name, details, and its id last (keep_run_choice reads it back)."""
    return " · ".join([name, *details, run_id])


def keep_run_choice(key: str, run_ids) -> None:
    """Keep a run picker (a selectbox or multiselect of run ids) on the runs it had chosen after
    their labels changed. Streamlit stores a choice as its shown label, so a rename (or a run that
    ended) turned the choice into a label no option has: the selectbox fell back to its first run
    (Delete... then named another run) and the multiselect dropped the run. Each label ends with
    its run's id (run_choice_label): map stale labels back to their ids before the widget draws."""
    value = st.session_state.get(key)
    if value is None:
        return
    ids = set(run_ids)

    def as_id(choice):
        if choice in ids:
            return choice
        tail = str(choice).rsplit(" · ", 1)[-1]
        return tail if tail in ids else None

    kept = [c for c in map(as_id, value) if c is not None] if isinstance(value, list) else as_id(value)
    if kept != value and kept is not None:
        st.session_state[key] = kept


def resumable_runs() -> list:
    return [i for i in list_runs(runs_root()) if i.state in RESUMABLE_STATES and i.has_checkpoint]


# --------------------------------------------------------------------------------------------
# A setting's control, chosen from its definition (finetune_core.config.Setting)


def widget_value(s: Setting, value):
    """A setting's value as its control holds it: numbers with a fraction as text ("5e-05"), so
    that the form takes any notation and a bad value is reported by name instead of clamped."""
    if s.kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}"
    return value


def setting_input(s: Setting, key: str, disabled: bool = False, help: str | None = None,
                  options: list | None = None, format_func=str, on_change=None) -> None:
    """The control for one setting, by its type: a checkbox for on/off, a number box for whole
    numbers (their bounds checked by validation, by name), a selectbox for choices, a text box otherwise (fractions
    included). Its value lives in st.session_state[key]."""
    label, help = s.display_label, help or (s.help[:1].upper() + s.help[1:] if s.help else None)
    options = options if options is not None else (None if callable(s.choices) else s.choice_list())
    if s.kind is bool:
        st.checkbox(label, key=key, disabled=disabled, help=help)
    elif options is not None:
        current = st.session_state.get(key)
        if current is not None and current not in options:
            options = [*options, current]  # keep a value the choices no longer hold: validation names it
        st.selectbox(label, options, key=key, disabled=disabled, help=help, format_func=format_func,
                     on_change=on_change)
    elif s.kind is int:
        # No min_value/max_value: the browser would refuse an out-of-range number by itself, keep the
        # previous value under the digits shown (a typed batch size 0 trained at 64), and say so only
        # in a tooltip. Every value reaches the settings' validation, which names the setting and
        # the range and keeps Train disabled.
        st.number_input(label, key=key, disabled=disabled, help=help, step=int(s.step or 1))
    else:
        st.text_input(label, key=key, disabled=disabled, help=help,
                      placeholder="optional" if s.name == "name" else None)


def curve_panels(frames: dict, key: str, **kwargs) -> None:
    """The runs' loss and accuracy curves, one chart per metric in columns (side by side on a wide
    screen, stacked on a phone); `kwargs` go to plots.panel_figures (colours, x axis, smoothing...)."""
    figures = plots.cached_panel_figures(frames, **kwargs)  # one build for every session drawing these curves
    with st.container(key=key):
        for k, (column, figure) in enumerate(zip(st.columns(len(figures)), figures)):
            column.plotly_chart(figure, width="stretch", key=f"{key}_{k}")
