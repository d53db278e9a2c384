"""Train: pick the data, set the recipe, launch in the background, watch it learn live."""
from __future__ import annotations

import uuid
from pathlib import Path

import streamlit as st

from finetune_core import datastore, plots
from finetune_core.config import PRESET_DESCRIPTIONS, PRESETS, comparison_configs, config_from_form
from finetune_core.data import INFO, DatasetError, scan_dataset
from finetune_core.models import BACKBONES, available_devices, device_description, offline_backbones
from finetune_core.runs import RunDir
from tuneboard_ui import LIVE_REFRESH_S, job_controls, manager, page, resumable_runs, state_label

page("Train", "🏋️")
st.title("Train")

# --------------------------------------------------------------------------------------------
# 1. Data
st.header("1 · Data")
root = datastore.data_root()
sources = ["Example: handwritten digits", "A dataset in the data folder", "A folder path", "Upload a zip"]
source = st.radio("Where are the images?", sources, horizontal=True, key="data_source")
data_path = ""
if source == sources[0]:
    with st.spinner("Writing the example dataset (once)…"):
        data_path = str(datastore.ensure_example_dataset(root))
    st.caption("1,797 real scans of handwritten digits that ship with scikit-learn, 10 classes; "
               "no internet needed.")
elif source == sources[1]:
    entries = datastore.list_datasets(root)
    if not entries:
        st.info(f"No datasets in {root} yet: upload a zip, or put class folders there.")
    else:
        names = [e.name for e in entries]
        choice = st.selectbox("Dataset", names, key="data_choice")
        data_path = next(e.path for e in entries if e.name == choice)
    if st.button("Fetch the book's hot-dog set (needs internet)"):
        try:
            with st.spinner("Downloading hotdog.zip and checking its checksum…"):
                st.success(f"Saved in {datastore.download_hotdog(root)}")
        except datastore.UploadError as exc:
            st.error(str(exc))
elif source == sources[2]:
    data_path = st.text_input("Folder", key="data_path_text", placeholder="/path/to/photos")
    with st.expander(f"Browse {root}"):
        rel = st.session_state.get("browse_rel", "")
        folder, subs = datastore.browse(root, rel)
        st.caption(f"In {folder}")
        pick = st.selectbox("Sub-folder", ["(this folder)", ".."] + subs, key="browse_pick")
        cols = st.columns(2)
        if cols[0].button("Open") and pick not in ("(this folder)",):
            target = folder.parent if pick == ".." else folder / pick
            st.session_state["browse_rel"] = str(target.relative_to(root)) if datastore.inside(root, target) else ""
            st.rerun()
        if cols[1].button("Use this folder"):
            st.session_state["data_path_text"] = str(folder if pick in ("(this folder)", "..") else folder / pick)
            st.rerun()
else:
    upload = st.file_uploader("A zip of class folders (with or without train/test splits)", type=["zip"],
                              key="zip_upload")
    if upload is not None:
        done = st.session_state.setdefault("unzipped", {})
        key = f"{upload.name}:{upload.size}"
        if key not in done:
            try:
                done[key] = str(datastore.extract_zip(upload, root, upload.name))
            except datastore.UploadError as exc:
                st.error(str(exc))
        if key in done:
            data_path = done[key]
            st.success(f"Unpacked into {data_path}")


@st.cache_data(ttl=60, show_spinner="Scanning the dataset…")
def scan(path: str, test_fraction: float, stamp: float):
    return scan_dataset(path, test_fraction=test_fraction)


report = None
if data_path:
    try:
        stamp = Path(data_path).expanduser().stat().st_mtime
        report = scan(str(Path(data_path).expanduser()), 0.2, stamp)
    except (DatasetError, OSError) as exc:
        st.error(f"{data_path}: {exc}")

if report is not None:
    splits = report.splits
    c = st.columns(4)
    c[0].metric("Classes", len(report.classes))
    c[1].metric("Training images", sum(splits.get("train", {}).values()))
    c[2].metric("Test images", sum(splits.get("test", {}).values()))
    c[3].metric("Skipped files", len(report.warnings))
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
        with st.expander(f"Problems: {len(report.errors)} errors, {len(report.warnings)} warnings",
                         expanded=bool(report.errors)):
            st.dataframe(problems, width="stretch", hide_index=True)
    if not report.usable:
        st.error(f"This dataset cannot be used: {report.reason()}")

# --------------------------------------------------------------------------------------------
# 2. Recipe
st.header("2 · Recipe")
offline = offline_backbones()
# On a GPU the book's recipe takes seconds an epoch; on a CPU the fast preset is the sensible start.
default_preset = "book-finetune" if "GPU" in device_description() else "fast"
FIELD_DEFAULTS = {"lr": "5e-05", "head_lr_mult": "10", "weight_decay": "0.001", "momentum": "0"}


def apply_preset() -> None:
    values = PRESETS[st.session_state["preset"]]
    for key, value in values.items():
        if key in FIELD_DEFAULTS:
            st.session_state[f"f_{key}"] = f"{value:g}"
        elif key == "weights":
            st.session_state["f_weights_kind"] = "none (random init)" if value == "none" else "ImageNet (pretrained)"
        elif key in ("param_groups", "freeze_backbone", "loss_reduction", "batch_size", "epochs", "schedule",
                     "warmup_epochs", "image_size", "precision"):
            st.session_state[f"f_{key}"] = value


if "preset" not in st.session_state:
    st.session_state["preset"] = default_preset
    apply_preset()
    st.session_state["f_backbone"] = "resnet18" if "resnet18" in offline else "efficientnet_lite0"

st.selectbox("Preset", list(PRESETS), key="preset", on_change=apply_preset,
             format_func=lambda p: {"book-finetune": "The book: fine-tune", "book-scratch": "The book: from scratch",
                                    "fast": "Fast"}.get(p, p))
st.caption(PRESET_DESCRIPTIONS[st.session_state["preset"]])
errors: dict[str, str] = st.session_state.get("form_errors", {})


def field_error(name: str) -> None:
    if name in errors:
        st.error(f"{name}: {errors[name]}", icon="🚫")


col1, col2, col3 = st.columns(3)
with col1:
    st.text_input("Learning rate", key="f_lr", help="Of the pretrained layers (and of everything with one group)")
    field_error("lr")
    st.text_input("Head learning-rate multiplier", key="f_head_lr_mult", help="The new head trains at lr × this")
    field_error("head_lr_mult")
    st.checkbox("Parameter groups (head at lr × multiplier)", key="f_param_groups",
                help="Off: one group at lr for every layer (the book's param_group=False)")
    st.checkbox("Freeze the pretrained layers (train the head only)", key="f_freeze_backbone")
    st.selectbox("Loss over a batch", ["sum", "mean"], key="f_loss_reduction",
                 help="The book sums the loss (lr 5e-5 with sum ≈ 6.4e-3 with mean at batch 128)")
    reduction = st.session_state["f_loss_reduction"]
    st.caption(f"In force: **{reduction}** of the per-image losses" +
               (" (the book's choice)" if reduction == "sum" else ""))
with col2:
    def backbone_label(name: str) -> str:
        return f"{name} ({'weights offline' if name in offline else 'weights need a download'})"

    st.selectbox("Backbone", list(BACKBONES), key="f_backbone", format_func=backbone_label)
    field_error("backbone")
    st.radio("Weights", ["ImageNet (pretrained)", "none (random init)", "a local file"], key="f_weights_kind")
    if st.session_state["f_weights_kind"] == "a local file":
        st.text_input("Weights file (.pt, .pth, .safetensors; loaded without running code)", key="f_weights_path")
    field_error("weights")
    st.number_input("Batch size", min_value=1, max_value=4096, step=8, key="f_batch_size")
    st.number_input("Epochs", min_value=1, max_value=1000, step=1, key="f_epochs")
    st.number_input("Image size (px)", min_value=16, max_value=1024, step=16, key="f_image_size")
with col3:
    st.text_input("Weight decay", key="f_weight_decay")
    field_error("weight_decay")
    st.text_input("Momentum", key="f_momentum")
    field_error("momentum")
    st.selectbox("Schedule", ["constant", "cosine"], key="f_schedule")
    st.number_input("Warm-up epochs (head only, then unfreeze)", min_value=0, max_value=100, key="f_warmup_epochs")
    field_error("warmup_epochs")
    st.selectbox("Device", available_devices(), key="f_device", help=f"auto = {device_description()}")
    st.selectbox("Precision", ["auto", "fp32", "bf16"], key="f_precision",
                 help="auto: bf16 autocast on a GPU, fp32 on the CPU (the book). bf16: also on a CPU that runs "
                      "it natively (AVX-512 BF16 / AMX), else fp32.")
    st.number_input("Seed", min_value=0, step=1, key="f_seed", value=0)
    st.text_input("Run name", key="f_name", placeholder="optional")

also = st.columns(2)
also_scratch = also[0].checkbox("Also train from scratch (the book's comparison)", key="also_scratch")
also_single = also[1].checkbox("Also without parameter groups", key="also_single")

# Both values change often in the form; everything else comes from the session state.
weights_kind = st.session_state["f_weights_kind"]
form = {
    "data": data_path, "backbone": st.session_state["f_backbone"],
    "weights": {"ImageNet (pretrained)": "auto", "none (random init)": "none"}.get(
        weights_kind, st.session_state.get("f_weights_path", "")),
    "lr": st.session_state["f_lr"], "head_lr_mult": st.session_state["f_head_lr_mult"],
    "param_groups": st.session_state["f_param_groups"], "freeze_backbone": st.session_state["f_freeze_backbone"],
    "loss_reduction": reduction, "batch_size": st.session_state["f_batch_size"],
    "epochs": st.session_state["f_epochs"], "weight_decay": st.session_state["f_weight_decay"],
    "momentum": st.session_state["f_momentum"], "schedule": st.session_state["f_schedule"],
    "warmup_epochs": st.session_state["f_warmup_epochs"], "image_size": st.session_state["f_image_size"],
    "device": st.session_state["f_device"], "precision": st.session_state["f_precision"],
    "seed": st.session_state["f_seed"],
    "name": st.session_state["f_name"], "preset": st.session_state["preset"],
}
config, new_errors = config_from_form(form)
if new_errors != errors:
    st.session_state["form_errors"] = new_errors
    st.rerun()  # draw the messages next to their fields
if config is not None and config.weights == "auto" and config.backbone not in offline:
    st.warning(f"The ImageNet weights of {config.backbone} are not on this machine; the run will try to download "
               f"them. Offline, choose one of: {', '.join(offline)}.")

blocked = ("choose a dataset" if not data_path else
           f"the dataset cannot be used: {report.reason()}" if report is not None and not report.usable else
           "the dataset could not be read" if report is None else
           "fix the settings marked above" if errors else "")
if blocked:
    st.caption(f"Train is disabled: {blocked}.")
if st.button("Train", type="primary", disabled=bool(blocked), key="train_button"):
    group = uuid.uuid4().hex[:8]
    ids = [manager().submit(c) for c in comparison_configs(config, also_scratch, also_single, group)]
    st.session_state["group"] = group
    st.toast(f"Queued {len(ids)} run(s)")

# --------------------------------------------------------------------------------------------
# 3. Live
st.header("3 · Live")


def current_group(jobs: list[dict]) -> str:
    """The runs to draw: those launched from this tab, else the newest active group on the server
    (so a refresh or a second tab shows the same running job)."""
    group = st.session_state.get("group")
    if group and any(j["group"] == group for j in jobs):
        return group
    candidates = [j for j in jobs if j["state"] in ("running", "queued")] or jobs
    return max(candidates, key=lambda j: j["submitted_at"])["group"] if candidates else ""


@st.fragment(run_every=LIVE_REFRESH_S)
def live() -> None:
    jobs = manager().jobs()
    group = current_group(jobs)
    members = [j for j in jobs if j["group"] == group] if jobs else []
    if not members:
        st.info("No run yet. Set the recipe and press Train.")
    frames = {}
    for job in members:
        if job["state"] in ("queued", "running"):
            job_controls(job, "live")
        else:
            st.write(f"**{job['name']}** {state_label(job['state'])}: {job['message']}")
        frames[job["name"]] = RunDir(job["path"]).read_metrics()
    if frames:
        epochs = max(j["epochs"] for j in members)
        st.plotly_chart(plots.overlay_figure(frames, epochs=epochs), width="stretch", key="live_curves")
    others = [j for j in jobs if j["state"] in ("queued", "running") and j["group"] != group]
    if others:
        st.subheader("Other jobs on this server")
        for job in others:
            job_controls(job, "other")


live()

resumable = [i for i in resumable_runs() if i.state == "interrupted"]
if resumable:
    st.subheader("Interrupted runs")
    for info in resumable:
        cols = st.columns([5, 1])
        cols[0].write(f"**{info.name}** {state_label(info.state)}: {info.message}")
        if cols[1].button("Resume", key=f"resume-{info.id}"):
            manager().resume(info.id)
            st.rerun()
