"""Train: pick the data, set the recipe, launch in the background, watch it learn live.

The recipe form is drawn from the settings' definitions (finetune_core.config): one control per
setting, chosen by its type, with its label, help, error and, when it has no effect with the
other settings, greyed out with the reason. Decisions (the default preset, which group to follow,
what has no effect) live in the library; this file only gathers input and draws.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import streamlit as st

from finetune_core import activations, analysis, datastore, downloads, lr_find, models, plots, sweep
from finetune_core.config import (PRESET_LABELS, PRESETS, SECTIONS, ConfigError, TrainConfig,
                                  comparison_configs, config_from_form, default_preset, form_settings,
                                  inactive_settings, parse_form, preset_for_machine, setting_warnings,
                                  auto_notes, native_image_size, preset_description, setting_notes, settings)
from finetune_core.cachestore import default_cache_dir
from finetune_core.data import INFO, DatasetError, SeveralDatasets, find_dataset_root, scan_dataset
from finetune_core.fixes import dataset_stamp
from finetune_core.engine import resolve_auto
from finetune_core.datastore import runs_root
from finetune_core.jobs import DuplicateSubmission, NotResumable
from finetune_core.runs import ACTIVE_STATES, RESUMABLE_STATES, RunDir, RunOwned, list_runs
from tuneboard_ui import (CURVES_REFRESH_S, LIVE_REFRESH_S, chart_controls, curve_panels, flash, format_seconds,
                          job_controls, manager, page, resumable_runs, setting_input, state_label, submit,
                          weights_downloads, widget_value)

DATA_SOURCES = ["Example: handwritten digits", "A dataset in the data folder", "A folder path", "Upload a zip"]
WEIGHTS_KINDS = {"ImageNet (pretrained)": "auto", "none (random init)": "none", "a local file": ""}
LAUNCH_REQUEST_S = 30.0  # a Train click not acted on within this (the user went to another page) is dropped
# Where each section of the recipe goes: three columns.
COLUMNS = [("learning",), ("model", "selection"), ("optimiser", "hardware", "run")]


def key(name: str) -> str:
    """The session-state key of a setting's control."""
    return f"f_{name}"


# --------------------------------------------------------------------------------------------
# 1. Data


def dataset_section():
    """Where the images are, and their scan. Returns (folder, scan report or None)."""
    st.header("1 · Data")
    root = datastore.data_root()
    dataset_from_address()
    source = st.radio("Where are the images?", DATA_SOURCES, horizontal=True, key="data_source")
    if source == DATA_SOURCES[0]:
        data_path = example_dataset(root)
    elif source == DATA_SOURCES[1]:
        data_path = dataset_in_data_folder(root)
    elif source == DATA_SOURCES[2]:
        data_path = folder_path(root)
    else:
        data_path = uploaded_zip(root)
    if data_path:
        data_path = one_of_several(data_path)
    remember_dataset(data_path, source)
    report = None
    if data_path:
        try:
            path = Path(data_path).expanduser()
            report = scan(str(path), TrainConfig.test_fraction, dataset_stamp(path))
            st.session_state["current_dataset"] = str(path)  # the Review page starts from it
        except FileNotFoundError:
            st.error(analysis.markdown_message(f"{data_path}: no such folder", paths=(str(data_path),)))
        except OSError as exc:
            st.error(analysis.markdown_message(f"{data_path}: {exc.strerror or exc}", paths=(str(data_path),)))
        except DatasetError as exc:  # its message names the folder
            message = str(exc) if str(data_path) in str(exc) else f"{data_path}: {exc}"
            st.error(analysis.markdown_message(message, paths=(str(data_path),)))
    if report is not None:
        show_scan(report)
    return data_path, report


def dataset_from_address() -> None:
    """A browser reload starts a new session, whose form would fall back to the example: the
    dataset comes back from the page's address (?data=FOLDER, written by remember_dataset), as a
    folder path, checked as a typed one is."""
    if "data_source" in st.session_state:
        return  # this session has its own choice
    wanted = st.query_params.get("data", "")
    if wanted:
        st.session_state["data_source"] = DATA_SOURCES[2]
        st.session_state["data_path_text"] = wanted


def remember_dataset(data_path: str, source: str) -> None:
    """Keep the chosen dataset in the page's address, so that a reload (or the address, shared)
    opens the form on it."""
    if source == DATA_SOURCES[0] or not data_path:
        st.query_params.pop("data", None)
    elif st.query_params.get("data") != data_path:
        st.query_params["data"] = data_path


def allowed_folder(path: str) -> str:
    """The folder, resolved, if the dashboard may read it; else "" with the refusal shown. Every
    way of naming a dataset goes through it: a link that leads out of the data folder is refused
    whether it was typed, picked in the data folder or among several datasets."""
    try:
        return str(datastore.check_data_folder(path))
    except datastore.FolderNotAllowed as exc:
        st.error(analysis.markdown_message(str(exc), paths=(path, *exc.paths)))
        return ""


def one_of_several(folder: str) -> str:
    """When the folder holds several datasets (a data root), which one: asked, never guessed.
    Returns the chosen dataset's folder ("" until one is chosen), else the folder itself."""
    try:
        find_dataset_root(folder)
    except SeveralDatasets as exc:
        st.warning(analysis.markdown_message(str(exc), paths=(folder,)))
        choice = st.radio("Which dataset?", [str(c) for c in exc.candidates], index=None,
                          format_func=lambda p: Path(p).name, key=f"several-{folder}")
        return allowed_folder(choice) if choice else ""  # a candidate may be a link leading out
    except (DatasetError, OSError, ValueError):
        pass  # the scan below says what is wrong with the folder
    return folder


def example_dataset(root: Path) -> str:
    with st.spinner("Writing the example dataset (once)…"):
        path = str(datastore.ensure_example_dataset(root))
    st.caption("1,797 real scans of handwritten digits that ship with scikit-learn, 10 classes; no internet needed.")
    return path


def dataset_in_data_folder(root: Path) -> str:
    entries = datastore.list_datasets(root)
    path = ""
    if not entries:
        st.info(f"No datasets in {root} yet: upload a zip, or put class folders there.")
    else:
        choice = st.selectbox("Dataset", [e.name for e in entries], key="data_choice")
        path = next(e.path for e in entries if e.name == choice)
        path = allowed_folder(path)  # a link in the data folder that leads out of it is refused, as when typed
    if st.button("Fetch the book's hot-dog set (needs internet)"):
        try:
            with st.spinner("Downloading hotdog.zip and checking its checksum…"):
                st.success(f"Saved in {datastore.download_hotdog(root)}")
        except datastore.UploadError as exc:  # offline: "<urlopen error ...>", shown as written
            st.error(analysis.markdown_message(str(exc)))
    return path


def folder_path(root: Path) -> str:
    path = st.text_input("Folder", key="data_path_text", placeholder="/path/to/photos")
    with st.expander(f"Browse {root}"):
        folder, subs = datastore.browse(root, st.session_state.get("browse_rel", ""))
        st.caption(f"In {folder}")
        up = [".."] if folder.resolve() != root.resolve() else []  # nothing above the data folder to go to
        pick = st.selectbox("Sub-folder", ["(this folder)", *up] + subs, key="browse_pick")
        cols = st.columns(2)
        if cols[0].button("Open") and pick != "(this folder)":
            target = folder.parent if pick == ".." else folder / pick
            st.session_state["browse_rel"] = str(target.relative_to(root)) if datastore.inside(root, target) else ""
            st.rerun()
        # A callback runs before the next run draws the text box, the only time its value may be set.
        # It reads the sub-folder picked at the moment of the click (not the one of the run that drew
        # the button: a click right after picking came before that run ended, and took the old pick).
        cols[1].button("Use this folder", on_click=use_folder, args=(str(folder),))
    return allowed_folder(path) if path else path


def use_folder(folder: str) -> None:
    pick = st.session_state.get("browse_pick", "(this folder)")
    st.session_state["data_path_text"] = folder if pick in ("(this folder)", "..") else str(Path(folder) / pick)


def uploaded_zip(root: Path) -> str:
    upload = st.file_uploader("A zip of class folders (with or without train/test splits)", type=["zip"],
                              key="zip_upload", max_upload_size=datastore.MAX_ZIP_BYTES // 2**20)
    if upload is None:
        return ""
    done = st.session_state.setdefault("unzipped_uploads", {})  # upload -> (its folder, what it holds, files skipped)
    upload_key = f"{upload.name}:{upload.size}"
    if upload_key not in done:
        try:
            folder = str(datastore.extract_zip(upload, root, upload.name))
        except datastore.UploadError as exc:
            st.error(analysis.markdown_message(str(exc), paths=(upload.name,)))
            return ""
        done[upload_key] = (folder, *datastore.unpacked_summary(folder))  # once, not on every rerun
    folder, summary, skipped = done[upload_key]
    (st.warning if skipped else st.success)(summary)
    return folder


@st.cache_data(ttl=60, show_spinner="Scanning the dataset…")
def scan(path: str, test_fraction: float, stamp: tuple):
    return scan_dataset(path, test_fraction=test_fraction, scan_cache=default_cache_dir())  # unchanged files: a stat each


def show_scan(report) -> None:
    splits = report.splits
    c = st.columns(4)
    c[0].metric("Classes", len(report.classes))
    c[1].metric("Training images", f"{sum(splits.get('train', {}).values()):,}")  # "1,438", as "1,797" above
    c[2].metric("Test images", f"{sum(splits.get('test', {}).values()):,}")
    c[3].metric("Warnings", len(report.warnings), help="files skipped and advice about the data, listed below")
    if report.fixes is not None:
        st.caption(f"Review fixes in force: **{report.fixes.text()}** (`{report.fixes.file}`; the Review page "
                   "changes or undoes them)")
    if report.layout == "flat":
        st.caption(f"No train/test split in the folder: {report.test_fraction:.0%} of each class is held out "
                   "for testing (the same files every time).")
    if report.classes:
        st.plotly_chart(plots.class_counts_figure(splits), width="stretch", key="class_counts")
        with st.expander("Examples of each class", expanded=False):
            for i, cls in enumerate(report.classes[:12]):
                paths = [r.path for r in report.samples["train"] if r.label == i][:6]
                if paths:
                    st.image(paths, width=96, caption=[cls] * len(paths))
    problems = [p.__dict__ for p in report.problems if p.severity != INFO]
    if problems:
        with st.expander(f"Problems: {analysis.count_text(len(report.errors), 'error')}, "
                         f"{analysis.count_text(len(report.warnings), 'warning')}",
                         expanded=bool(report.errors)):
            st.dataframe(problems, width="stretch", hide_index=True)
    if not report.usable:
        paths = (report.root, *(p.path for p in report.errors))  # paths with spaces, as code too
        st.error("This dataset cannot be used: " + analysis.markdown_message(report.reason(), paths=paths))


# --------------------------------------------------------------------------------------------
# 2. Recipe


def apply_preset(offline: list[str]) -> None:
    """Every control of the form takes the chosen preset's value (its backbone replaced by one whose
    weights are on this machine, with a note saying so)."""
    config, note = preset_for_machine(st.session_state["preset"], offline)
    for name in form_settings():
        st.session_state[key(name)] = widget_value(settings()[name], getattr(config, name))
    kind = "auto" if config.weights == "auto" else "none" if config.weights == "none" else ""
    st.session_state["f_weights_kind"] = next(k for k, v in WEIGHTS_KINDS.items() if v == kind)
    st.session_state["f_weights_path"] = "" if kind else config.weights
    st.session_state["preset_note"] = note


def form_values(data_path: str) -> dict:
    """What the controls hold (kept in the session between reruns), as the settings they are;
    the settings the form does not show come from the preset."""
    preset = st.session_state["preset"]
    values = {name: value for name, value in PRESETS[preset].items() if name not in form_settings()}
    values.update({name: st.session_state[key(name)] for name in form_settings() if key(name) in st.session_state})
    kind = WEIGHTS_KINDS[st.session_state["f_weights_kind"]]
    values.update(data=data_path, preset=preset, weights=kind or st.session_state.get("f_weights_path", "").strip())
    return values


def recipe_section(data_path: str, report) -> tuple[TrainConfig | None, dict[str, str]]:
    """The preset and every setting. Returns (a valid config or None, {setting: message})."""
    st.header("2 · Recipe")
    offline = models.offline_backbones()
    if "preset" not in st.session_state:
        st.session_state["preset"] = default_preset(models.resolve_device("auto").type)
        apply_preset(offline)
    st.selectbox("Preset", list(PRESETS), key="preset", on_change=apply_preset, args=(offline,),
                 format_func=lambda p: PRESET_LABELS.get(p, p))
    values = form_values(data_path)
    st.caption(preset_description(st.session_state["preset"], resolved_backbone(values["backbone"]),
                                  values["image_size"]))
    if st.session_state.get("preset_note"):
        st.caption(st.session_state["preset_note"])

    refused = ""
    if values["weights"] not in ("auto", "none", ""):  # a typed weights file: only from the data roots
        try:
            values["weights"] = str(datastore.check_weights_file(values["weights"]))
        except datastore.FolderNotAllowed as exc:
            refused = str(exc)
    config, errors = config_from_form(values)
    if refused:
        config, errors = None, {**errors, "weights": refused}
    elif not values["weights"]:  # "a local file" chosen, no path typed yet
        config, errors = None, {**errors, "weights": "type the path of a weights file (.pt, .pth or .safetensors) "
                                                     "in the data folder"}
    parsed, _ = parse_form(values)
    draft = TrainConfig(**{k: v for k, v in parsed.items() if k in settings()})  # what is known so far
    inactive, notes = inactive_settings(draft), setting_notes(draft)
    if config is not None and report is not None and report.usable:  # what the controls left at 0 (auto) come to
        notes.update(auto_notes(config, resolve_auto(config, report)))
    n_classes = len(report.classes) if report is not None and report.classes else 2
    field_warnings = setting_warnings(config) if config is not None else {}  # a rate far out: under its field
    for column, sections in zip(st.columns(len(COLUMNS)), COLUMNS):
        with column:
            for section in sections:
                st.markdown(f"**{SECTIONS[section]}**")
                for name in form_settings():
                    if settings()[name].section == section:
                        setting_control(name, draft, offline, n_classes, inactive.get(name), notes.get(name))
                        if name in errors:
                            st.error(analysis.markdown_message(errors[name]), icon=":material/block:")  # an emoji drew as a box with Debian's fonts
                        for warning in field_warnings.get(name, []):
                            st.warning(warning, icon="⚠️")
    if config is not None and models.weights_to_download(config.backbone, config.weights):
        weights_download_section(resolved_backbone(config.backbone), offline)
    return config, errors


def weights_download_section(backbone: str, offline: list[str]) -> None:
    """Weights in no cache: say so before launch, with their size, and offer Download (a job with
    progress and Stop, downloads.WeightsDownloads)."""
    current = weights_downloads().download(backbone)
    if current is not None and current["state"] == downloads.ACTIVE:
        download_progress(backbone)
        return
    size = downloads.size_text(models.weights_download_bytes(backbone))
    st.warning(f"The ImageNet weights of {backbone} are not downloaded (about {size}). Download them now, with "
               "progress and a Stop; otherwise the run downloads them as its first step. Without internet, "
               f"choose a backbone whose weights are here: {', '.join(offline) or 'none'}.", icon="⚠️")
    if current is not None and current["state"] == "failed":  # an exception's text, "<urlopen error ...>": as written
        st.error(analysis.markdown_message(current["message"]), icon=":material/block:")
    elif current is not None and current["state"] == "stopped":
        st.caption(f"The last download was {current['message']}.")
    st.button("Download", key="download_weights", on_click=weights_downloads().start, args=(backbone,))


@st.fragment(run_every=LIVE_REFRESH_S)
def download_progress(backbone: str) -> None:
    """A running download's bytes so far against its size, and Stop; the whole page again once it
    ends (the backbone is then offline, or the failure is shown)."""
    current = weights_downloads().download(backbone)
    if current is None or current["state"] != downloads.ACTIVE:
        st.rerun(scope="app")
    st.progress(current["fraction"] or 0.0, text=f"Downloading the weights of {backbone}: "
                                                f"{downloads.progress_text(current)}")
    st.button("Stop the download", key="stop_download", on_click=weights_downloads().stop, args=(backbone,))


def setting_control(name: str, draft: TrainConfig, offline: list[str], n_classes: int, inactive: str | None,
                    note: str | None) -> None:
    """One setting's control. Most are drawn from the setting's definition alone; the weights, the
    backbone, the trainable part and the device need what this machine has."""
    s = settings()[name]
    disabled = inactive is not None
    help = f"No effect here: {inactive}" if disabled else None
    if name == "weights":
        st.radio(s.label, list(WEIGHTS_KINDS), key="f_weights_kind", help=s.help)
        if st.session_state["f_weights_kind"] == "a local file":
            st.text_input("Weights file (.pt, .pth, .safetensors; loaded without running code)", key="f_weights_path")
    elif name == "backbone":
        auto = resolved_backbone("auto")

        ready = set(offline)

        def backbone_label(b: str) -> str:
            if b == "auto":
                return f"auto ({auto} on this machine)"
            return f"{b} ({'weights offline' if b in ready else 'weights need a download'})"

        st.text_input("Any timm or torchvision model by name", key="f_backbone_typed", on_change=take_typed_backbone,
                      placeholder="e.g. convnext_tiny.fb_in22k_ft_in1k", help="or search the list below: it holds "
                      "every timm model with pretrained weights and every torchvision classifier")
        setting_input(s, key(name), options=backbone_choices(tuple(offline)), format_func=backbone_label,
                      on_change=follow_backbone_size)
        chosen = resolved_backbone(draft.backbone)
        details = backbone_details(chosen, n_classes, chosen in ready)
        if details:
            st.caption(details)
    elif name == "train_stages":
        backbone = resolved_backbone(draft.backbone)
        setting_input(s, key(name), options=stage_choices(backbone), format_func=stage_label)
        summary = trainable_summary(backbone, draft.train_stages, n_classes)
        if summary:
            st.caption(summary)
    elif name == "device":
        setting_input(s, key(name), options=models.available_devices(),
                      help=f"auto = {models.device_description()}")
    else:
        setting_input(s, key(name), disabled=disabled, help=help)
    if name == "image_size":  # what follow_backbone_size compares with
        st.session_state["image_size_drawn"] = st.session_state.get(key(name))
    if name == "loss_reduction":
        reduction = draft.loss_reduction
        st.caption(f"In force: **{reduction}** of the per-image losses" +
                   (" (the book's choice)" if reduction == "sum" else ""))
    if disabled:
        st.caption(f"Not used: {inactive}.")
    elif note:
        st.caption(f"{note[:1].upper()}{note[1:]}.")


def take_typed_backbone() -> None:
    """The typed name becomes the backbone (validation names it if it is none)."""
    typed = st.session_state.get("f_backbone_typed", "").strip()
    if typed:
        st.session_state[key("backbone")] = typed
        follow_backbone_size()


def follow_backbone_size() -> None:
    """A new backbone brings its native image size (the preset's was its own backbone's), unless the
    size was changed along with it (sent in the same rerun: it differs from the one last drawn)."""
    size = native_image_size(st.session_state[key("backbone")])
    drawn = st.session_state.get("image_size_drawn")
    if size is not None and st.session_state.get(key("image_size")) == drawn:
        st.session_state[key("image_size")] = size


@st.cache_data(show_spinner=False)
def backbone_choices(offline: tuple[str, ...]) -> list[str]:
    return models.backbone_choices(list(offline))


@st.cache_data(show_spinner=False)
def backbone_details(backbone: str, n_classes: int, weights_here: bool) -> str:
    """Parameters, native resolution, interpolation and whether the weights are here ("" for a
    name that is no backbone: validation says so). `weights_here` is part of the cache's key: the
    line changes once a download completes."""
    try:
        return models.backbone_details(backbone, n_classes)
    except Exception:  # noqa: BLE001 - an unknown name, or one that cannot be built: validation names it
        return ""


def resolved_backbone(name: str) -> str:
    """A backbone name, with "auto" resolved to the one this machine would use."""
    return models.resolve_backbone(name)[0]


def stage_choices(backbone: str) -> list[str]:
    try:
        return models.train_stages_choices(backbone)
    except (KeyError, ValueError):  # a backbone the registry does not know: validation names it
        return ["head", "all"]


def stage_label(value: str) -> str:
    if value == "head":
        return "the new head only (backbone frozen)"
    if value == "all":
        return "every layer (the book)"
    return f"the last {value} stage{'s' if value != '1' else ''} + head"


@st.cache_data(show_spinner=False)
def trainable_summary(backbone: str, train_stages: str, n_classes: int) -> str:
    try:
        return models.trainable_summary(backbone, train_stages, n_classes=n_classes)
    except (KeyError, ValueError, TypeError):
        return ""


# Settings the finder's curve does not depend on: the rate it sweeps, and names for display.
LR_FIND_IGNORES = ("lr", "name", "group", "preset")


def cost_caption(config: TrainConfig, report, steps: int | None = None) -> None:
    """What it will cost, before it starts (analysis.cost_estimate)."""
    seconds, basis = analysis.cost_estimate(config, report, list_runs(runs_root()), steps)
    st.caption(f"Costs about {format_seconds(seconds)}: {basis}." if seconds is not None
               else f"No cost estimate yet: {basis}.")


def run_cost(config: TrainConfig, report) -> None:
    """The run's own cost before Train, at the speed a recorded run's last epoch measured, and a
    warning when it is hours (analysis.long_run_warning)."""
    seconds, basis = analysis.cost_estimate(config, report, list_runs(runs_root()))
    st.caption(f"This run: about {format_seconds(seconds)} ({basis})." if seconds is not None
               else f"This run: no cost estimate yet ({basis}).")
    unmeasured = analysis.unmeasured_run_warning(config, report) if seconds is None else ""  # 1000 epochs, no past run
    for warning in (analysis.long_run_warning(seconds, config.epochs), unmeasured,
                    analysis.too_few_steps_warning(config, report)):
        if warning:
            st.warning(warning, icon="⚠️")


def lr_finder_key(config: TrainConfig, report) -> str:
    """What a finder result was computed for: the recipe (its settings as a dict, but for those
    the sweep does not depend on) and the dataset as scanned. A result for another key is stale."""
    recipe = {k: v for k, v in config.to_dict().items() if k not in LR_FIND_IGNORES}
    dataset = {"root": str(report.root), "layout": report.layout, "splits": report.splits}
    return json.dumps({"recipe": recipe, "dataset": dataset}, sort_keys=True, default=str)


def lr_finder_section(config: TrainConfig | None, report) -> None:
    """The learning-rate finder on what this recipe would train: loss against lr, and the
    suggested rate taken into the form in one click. Runs here, in this page's session. Its
    result (or why it failed) is kept for the recipe and dataset it was computed for, and dropped
    when either changes."""
    usable = config is not None and report is not None and report.usable
    current = lr_finder_key(config, report) if usable else None
    stored = st.session_state.get("lr_find")
    if stored is not None and current is not None and stored.get("key") != current:
        del st.session_state["lr_find"]
        stored = None
    with st.expander("Find a learning rate", expanded=stored is not None):
        st.caption("A short sweep: the learning rate grows exponentially, step by step, on exactly what this "
                   "recipe trains (the head keeps its multiplier), until the loss explodes. The model and the "
                   "runs folder are left as they were.")
        if usable:
            cost_caption(resolve_auto(config, report), report, steps=lr_find.STEPS)
        if st.button("Run the learning-rate finder", key="lr_find_button", disabled=not usable):
            stored = st.session_state["lr_find"] = {"key": current, **run_lr_finder(config, report)}
        if stored is None or current is None:  # nothing yet, or the settings have errors: shown once fixed
            return
        if stored["error"]:
            st.error(analysis.markdown_message(stored["error"]), icon=":material/block:")  # an emoji drew as a box with Debian's fonts
            return
        found = stored["result"]
        st.plotly_chart(lr_finder_figure(found), width="stretch", key="lr_find_curve")
        if found["stopped"]:
            st.caption(found["stopped"][:1].upper() + found["stopped"][1:] + ".")
        if found["suggestion"] is None:
            st.caption("No suggestion: the loss did not fall over this range.")
        else:
            st.button(f"Use lr = {found['suggestion']:.2g}", key="lr_find_use", on_click=use_lr,
                      args=(found["suggestion"],))


def run_lr_finder(config: TrainConfig, report) -> dict:
    """The sweep, with a progress bar: {"result": its curve as a dict, "error": None}, or
    {"result": None, "error": why it failed}. The page's scan goes with it (the engine uses it when
    it fits the settings)."""
    bar = st.progress(0.0, text="Preparing the learning-rate finder…")

    def on_event(event: dict) -> None:
        if event.get("kind") in ("prepare", "lr_find"):
            bar.progress(min(1.0, float(event.get("progress", 0.0))), text=event.get("message", ""))

    try:
        with st.spinner("Running the learning-rate finder…"):
            result = lr_find.find_lr(config, report=report, on_event=on_event)
        return {"result": result.to_dict(), "error": None}
    except Exception as exc:  # noqa: BLE001 - shown as a message; the server log keeps the traceback
        logging.getLogger(__name__).exception("learning-rate finder failed")
        message = lr_find.failure_message(exc)[1]
        return {"result": None, "error": message[:1].upper() + message[1:]}
    finally:
        bar.empty()


def lr_finder_figure(found: dict):
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=found["lrs"], y=found["losses"], mode="lines", name=found["curve"]))
    if found["suggestion"] is not None:
        fig.add_vline(x=found["suggestion"], line_dash="dash", annotation_text=f"suggested {found['suggestion']:.2g}")
    fig.update_layout(xaxis_type="log", xaxis_tickformat=".0e",  # "1e-06" and "1e-03", not "1μ" beside "0.001"
                      xaxis_title="learning rate", yaxis_title=found["curve"], height=300,
                      margin=dict(l=10, r=10, t=30, b=10))
    return fig


def use_lr(lr: float) -> None:
    st.session_state[key("lr")] = f"{lr:.2g}"


# --------------------------------------------------------------------------------------------
# 3. Launch


def launch_section(config: TrainConfig | None, errors: dict[str, str], data_path: str, report) -> None:
    """The comparison runs to add, and Train (disabled, saying why, while something is missing)."""
    also = st.columns(2)
    also_scratch = also[0].checkbox("Also train from scratch (the book's comparison)", key="also_scratch")
    also_single = also[1].checkbox("Also without parameter groups", key="also_single")
    if config is not None and report is not None and report.usable and not errors:
        twins = comparison_configs(resolve_auto(config, report), True, True)[1:]
        for column, twin in zip(also, twins):
            with column:
                cost_caption(twin, report)
    grid, sweep_error = sweep_option(config)
    blocked = ("choose a dataset" if not data_path else
               "the dataset could not be read" if report is None else
               f"the dataset cannot be used: {report.reason()}" if not report.usable else
               f"fix the settings marked above ({analysis.markdown_message('; '.join(errors.values()))})" if errors else  # named: far up the page
               "fix the settings marked above" if config is None else
               "fix the sweep's values" if sweep_error else
               "its weights are downloading (or stop the download)" if downloading(config) else
               failed_download(config))
    if blocked:
        st.caption(f"Train is disabled: {blocked}.")
    elif grid is None:
        run_cost(resolve_auto(config, report), report)
    st.button("Train", type="primary", disabled=bool(blocked), key="train_button", on_click=request_launch)
    if config is not None and config.train_stages != "all":
        st.caption(activations.memory_note())
    requested = st.session_state.pop("launch_requested", None)
    if requested is not None and time.monotonic() - requested < LAUNCH_REQUEST_S:  # not one left by a page change
        if blocked:  # the values sent with the click made the recipe invalid: nothing is queued
            st.toast(f"Not queued: {blocked} (on the Setup tab).", icon="🚫", duration="long")
        else:
            launch(config, report, grid, also_scratch, also_single)


def downloading(config: TrainConfig) -> bool:
    """Whether the backbone's weights are being downloaded now (a run would fetch them too)."""
    current = weights_downloads().download(resolved_backbone(config.backbone))
    return current is not None and current["state"] == downloads.ACTIVE


def failed_download(config: TrainConfig) -> str:
    """Why Train is refused when the backbone's weights are still not here and their last download
    failed ("" otherwise): the run would download them again and fail the same way."""
    if not models.weights_to_download(config.backbone, config.weights):
        return ""
    backbone = resolved_backbone(config.backbone)
    return downloads.launch_refusal(weights_downloads().download(backbone), backbone, models.offline_backbones())


def request_launch() -> None:
    """Train's callback: it turns to the Live tab before the page is drawn again (one run of the
    page, the tabs already on Live), and that run queues the runs from the settings it reads: a
    value typed just before the click included (a callback's arguments would be the settings of
    the run that drew the button, without it)."""
    st.session_state["launch_requested"] = time.monotonic()
    st.session_state["train_tab"] = "Live"


def launch(config: TrainConfig, report, grid, also_scratch: bool, also_single: bool) -> None:
    """The run (and its comparison runs) or the sweep's cells, as one group."""
    config = resolve_auto(config, report)  # auto epochs and views in numbers: the twins and cells copy them
    if grid is not None:
        group = sweep.new_sweep_group()
        configs = sweep.sweep_configs(config, *grid, group=group)
    else:
        group = uuid.uuid4().hex[:8]
        configs = comparison_configs(config, also_scratch, also_single, group)
    try:
        ids = [submit(c, report) for c in configs]
    except DuplicateSubmission as exc:  # a double click: the first click's runs are the ones to follow
        st.toast(f"Already queued a moment ago: {exc}.")
    else:
        st.session_state["group"] = group
        # a toast: the Live tab the page turns to shows the runs; a banner would outlive them
        st.toast(f"Queued {len(ids)} run{'s' if len(ids) > 1 else ''}.")


def sweep_option(config: TrainConfig | None) -> tuple[tuple[list[float], list[float]] | None, bool]:
    """The Sweep option: a few learning rates and head multipliers, one run per pair, queued as one
    group in place of the run (and its comparisons). Returns ((lrs, multipliers) or None when the
    option is off or its values are wrong, whether they are wrong)."""
    if not st.checkbox("Sweep: one run for each learning rate x head multiplier", key="sweep_on",
                       help="The grid the book's exercises ask about, on this data and recipe; a heatmap of the "
                            "score of each run's kept model fills in below as runs finish."):
        return None, False
    if "sweep_lrs" not in st.session_state:
        lr = config.lr if config is not None else settings()["lr"].default
        st.session_state["sweep_lrs"] = ", ".join(f"{lr * f:.2g}" for f in (1 / 5, 1, 4))
        st.session_state["sweep_mults"] = "1, 10, 30"
    found = (st.session_state.get("lr_find") or {}).get("result") or {}
    if found.get("suggestion"):
        st.button(f"Learning rates around the finder's suggestion ({found['suggestion']:.2g})", key="sweep_from_finder",
                  on_click=sweep_around, args=(found["suggestion"],))
    cols = st.columns(2)
    cols[0].text_input("Learning rates", key="sweep_lrs", help="Commas or spaces between values, e.g. 1e-5, 5e-5, 2e-4")
    cols[1].text_input("Head multipliers", key="sweep_mults", help="Commas or spaces between values, e.g. 1, 10, 30")
    try:
        lrs = sweep.parse_values(st.session_state["sweep_lrs"], "lr")
        mults = sweep.parse_values(st.session_state["sweep_mults"], "head_lr_mult")
        if config is not None:
            n = len(sweep.sweep_configs(config, lrs, mults, group=""))
            st.caption(f"Train queues {n} run{'s' if n > 1 else ''} (one group, stoppable together) instead of one; "
                       "the comparison runs above are not added.")
    except ConfigError as exc:
        for message in exc.errors.values():
            st.error(message, icon=":material/block:")  # an emoji drew as a box with Debian's fonts
        return None, True
    return (lrs, mults), False


def sweep_around(lr: float) -> None:
    """Three learning rates around `lr` (a third, itself, three times) for the sweep."""
    st.session_state["sweep_lrs"] = ", ".join(f"{lr * f:.2g}" for f in (1 / 3, 1, 3))


# --------------------------------------------------------------------------------------------
# 4. Live


def followed_jobs() -> tuple[list[dict], str, list[dict], dict[str, str]]:
    """(every job, the group this tab follows (analysis.current_group), its jobs, their labels)."""
    jobs = manager().jobs()
    group = analysis.current_group(jobs, st.session_state.get("group", ""))
    members = [j for j in jobs if j["group"] == group] if jobs else []
    return jobs, group, members, analysis.job_labels(members)


@st.fragment(run_every=LIVE_REFRESH_S)
def live_section() -> None:
    """The group of runs this tab follows: progress, Stop, Resume, and the other jobs."""
    jobs, group, members, labels = followed_jobs()
    if not members:
        st.info("No run yet. Set the recipe and press Train.")
    if sweep.is_sweep_group(group):
        sweep_results(members)
    for job in members:
        if job["state"] in ACTIVE_STATES:
            job_controls(job, "live")
        elif job["state"] in RESUMABLE_STATES and RunDir(job["path"]).has_checkpoint():
            cols = st.columns([5, 1])  # the message says it can be resumed: the button is next to it
            cols[0].write(f"**{analysis.markdown_text(labels[job['run_id']])}** {state_label(job['state'])}: "
                          f"{analysis.markdown_message(job['message'])}")
            if cols[1].button("Resume", key=f"live-resume-{job['run_id']}"):
                resume_run(job["run_id"])
                st.rerun()  # the whole page: the list of resumable runs below this view changes too
        else:
            st.write(f"**{analysis.markdown_text(labels[job['run_id']])}** {state_label(job['state'])}: "
                     f"{analysis.markdown_message(job['message'])}")
    others = [j for j in jobs if j["state"] in ACTIVE_STATES and j["group"] != group]
    if others:
        st.subheader("Other jobs on this server")
        for job in others:
            job_controls(job, "other")


@st.fragment(run_every=CURVES_REFRESH_S)
def live_curves_section() -> None:
    """The group's curves, in a fragment of their own that reruns less often than the progress
    above it: building and sending the charts was most of what an open Live tab cost the run."""
    _, _, members, labels = followed_jobs()
    frames = {}
    for job in members:
        metrics = RunDir(job["path"]).read_metrics(max_age_s=CURVES_REFRESH_S / 2)  # sessions share a read (half the refresh)
        if metrics.empty and job["state"] not in ACTIVE_STATES:
            st.caption(f"No curves for {analysis.markdown_text(labels[job['run_id']])}: it ended before its first "
                       "training batch.")
        else:
            frames[labels[job["run_id"]]] = metrics
    if frames:
        epochs = max(j["epochs"] for j in members)
        if any(j["state"] in ACTIVE_STATES for j in members):  # the axis grows with the run: the batches show
            epochs = plots.live_epoch_span(frames, epochs)
        chart = chart_controls("live")
        curve_panels(frames, "live_curves", epochs=epochs, **plots.run_styles(labels), **chart)
        st.caption(f"Train loss and accuracy: the average over the epoch so far, a point at every batch; test (or "
                   f"validation) accuracy after each epoch. Redrawn every {CURVES_REFRESH_S:.0f} s.")


def sweep_results(members: list[dict]) -> None:
    """A sweep's heatmap of each run's score (the kept model's accuracy) by learning rate and head multiplier, filled in as its
    runs finish, the best cell marked; Stop for the whole sweep, and the best cell into the form."""
    grid = sweep.sweep_grid(sweep.sweep_table([j["path"] for j in members]))
    st.plotly_chart(plots.sweep_figure(grid), width="stretch", key="sweep_heatmap")
    cols = iter(st.columns(2))
    if any(j["state"] in ACTIVE_STATES for j in members):
        if next(cols).button("Stop the sweep", key="sweep_stop",
                             help="Stop the running run and take the others off the queue"):
            manager().stop_group(members[0]["group"])
            st.rerun(scope="fragment")
    label, refused = sweep.best_cell_offer(grid, sweep.sweep_recipe([j["path"] for j in members]),
                                           st.session_state.get("form_data_path", ""))
    if label:
        if next(cols).button(label, key="sweep_use_best", disabled=bool(refused), on_click=use_best_cell,
                             args=grid.best_values, help=f"{grid.label}; the form's other settings stay as they are"):
            st.rerun()  # the whole page: the form shows the new values
        if refused:
            st.caption(analysis.markdown_message(f"Not offered: {refused}."))


def use_best_cell(lr: float, mult: float) -> None:
    st.session_state[key("lr")] = widget_value(settings()["lr"], lr)
    st.session_state[key("head_lr_mult")] = widget_value(settings()["head_lr_mult"], mult)
    st.session_state["sweep_on"] = False


def resume_section() -> None:
    """Stopped and interrupted runs with a checkpoint: each continues from its last epoch."""
    active = {j["run_id"] for j in manager().active()}
    resumable = [i for i in resumable_runs() if i.id not in active]
    if not resumable:
        return
    st.subheader("Stopped and interrupted runs")
    for info in resumable:
        cols = st.columns([5, 1])
        cols[0].write(f"**{analysis.markdown_text(info.name)}** {state_label(info.state)}: "
                      f"{analysis.markdown_message(info.message)}")
        cols[1].button("Resume", key=f"resume-{info.id}", on_click=resume_run, args=(info.id,))


def resume_run(run_id: str) -> None:
    """Queue a stopped or interrupted run again (a Resume button's callback or click)."""
    try:
        manager().resume(run_id)
    except RunOwned as exc:  # another process took it over since this page was drawn
        flash(analysis.markdown_message(str(exc)), "error")
    except NotResumable as exc:  # a second click, or a click on a run that ended differently since
        flash(f"Not resumed: {analysis.markdown_message(str(exc))}.", "warning")


def keep_form_values() -> None:
    """Streamlit forgets the value of a control that a run does not draw (a run that stops early,
    a dataset being chosen): keep the recipe's controls in a copy of our own and put back any
    that went missing, so the form never silently falls back to its widgets' defaults."""
    kept = st.session_state.setdefault("recipe_kept", {})
    for name, value in kept.items():
        if name not in st.session_state:
            st.session_state[name] = value
    kept.update({name: value for name, value in st.session_state.items()
                 if name in ("preset", "data_source", "data_choice", "data_path_text") or name.startswith("f_")})


def main() -> None:
    page("Train", "🏋️")
    keep_form_values()
    st.title("Train")
    # Two tabs, so that the live view is where the eye goes: Live after Train is pressed, and when
    # the page opens while runs are active; Setup otherwise. The default is fixed for the session
    # (a tab whose default changes is a new widget: it would jump back when a run ends).
    opening = st.session_state.setdefault("train_tab_default", "Live" if manager().active() else "Setup")
    setup, live = st.tabs(["Setup", "Live"], key="train_tab", on_change="rerun", default=opening)
    with setup:
        data_path, report = dataset_section()
        st.session_state["form_data_path"] = data_path  # what the sweep's best cell is checked against
        config, errors = recipe_section(data_path, report)
        lr_finder_section(config, report)
        launch_section(config, errors, data_path, report)
    with live:
        st.header("3 · Live")
        live_section()
        live_curves_section()
        resume_section()


main()
