"""Review: photos whose label looks wrong, copies and leaks, photos that teach nothing; fix them.

The review runs in the background like a training job (progress, Stop); its result is kept on
disk beside the runs, so a reload or another browser finds it. Fixes go to the dataset's fixes
file (finetune_core.fixes): no photo is moved or deleted, and every training applies them."""
from __future__ import annotations

import os

from pathlib import Path

import streamlit as st

from finetune_core import analysis, datastore
from finetune_core.data import DatasetError, scan_dataset
from finetune_core.datastore import runs_root
from finetune_core.fixes import FixesError, add_fixes, dataset_stamp, fixes_path, load_fixes, undo_fix
from finetune_core.review import (KIND_LABELS, KINDS, RELABEL_CONFIDENCE, ReviewJob, decided, fixes_for, load_result,
                                  left_to_a_person, result_path, suggested_action,
                                  suggested_fixes)
from tuneboard_ui import LIVE_REFRESH_S, flash, page, picture

PER_PAGE = 12


@st.cache_resource(show_spinner=False)
def review_jobs() -> dict[str, ReviewJob]:
    """The review jobs of this server process, by dataset root (one at a time per dataset)."""
    return {}


def choose_dataset() -> str:
    """The folder to review: the one chosen on the Train page, or typed here. A fresh session (the
    page opened by its address) starts where Train does: the address's ?data=, else the example."""
    default = st.session_state.get("review_data") or st.session_state.get("current_dataset", "")
    if not default and "review_data_input" not in st.session_state:
        with st.spinner("Writing the example dataset (once)…"):
            default = datastore.default_dataset(st.query_params.get("data", ""))
    path = st.text_input("Dataset folder", value=default, key="review_data_input", placeholder="/path/to/photos")
    if not path:
        st.info("Choose a dataset on the Train page, or type its folder here.")
        return ""
    try:
        path = str(datastore.check_data_folder(path))
    except datastore.FolderNotAllowed as exc:
        st.error(analysis.markdown_message(str(exc), paths=(path, *exc.paths)))
        return ""
    if not os.path.isdir(path):  # said plainly, not as the scan's "[Errno 2] No such file or directory"
        st.error(analysis.markdown_message(f"{path}: {'not a folder' if os.path.exists(path) else 'does not exist'}",
                                           paths=(path,)))
        return ""
    st.session_state["review_data"] = path
    return path


@st.cache_data(ttl=60, show_spinner="Scanning the dataset…")
def scan(path: str, stamp: tuple):
    """The scan (fixes applied), read again when the folder or its fixes file changes (as on Train):
    not on every click of a large dataset's review."""
    return scan_dataset(path)


def job_section(root: str, data: str) -> None:
    """Start, follow and stop the review of `root`."""
    jobs = review_jobs()
    job = jobs.get(root)
    if job is not None and job.running:
        live_progress(root)
        return
    if job is not None and job.snapshot()["state"] in ("failed", "stopped"):
        snap = job.snapshot()
        (st.error if snap["state"] == "failed" else st.info)(f"Review {snap['state']}: {analysis.markdown_message(snap['message'])}")
    folds = st.number_input("Folds", 2, 10, 5, key="review_folds",
                            help="each image is predicted by a head fitted on the other folds")
    if st.button("Review this dataset", type="primary", key="review_start"):
        jobs[root] = ReviewJob(data, result_path(root, runs_root()), folds=int(folds),
                               runs_dir=runs_root()).start()
        st.rerun()


@st.fragment(run_every=LIVE_REFRESH_S)
def live_progress(root: str) -> None:
    job = review_jobs().get(root)
    if job is None:
        return
    snap = job.snapshot()
    if not job.running:
        st.rerun()  # the whole page: the result is on disk now
    st.progress(min(1.0, snap["progress"]), text=analysis.markdown_message(snap["message"]) or "starting…")
    if st.button("Stop", key="review_stop"):
        job.stop()


def record(root: str, fixes: list, what: str) -> None:
    try:
        path = add_fixes(root, fixes)
    except FixesError as exc:
        st.error(analysis.markdown_message(str(exc)))
        return
    flash(f"{len(fixes)} {what}: recorded in {path}")
    st.rerun()


def issue_card(issue, status: str, key: str, relabel_above: dict | None) -> None:
    with st.container(border=True):
        if issue.other:
            cols = st.columns(2)
            with cols[0]:
                picture(issue.path, caption="this image")
            with cols[1]:
                picture(issue.other, caption="copies this one")
        else:
            picture(issue.path)
        suggestion = f" → **{analysis.markdown_text(issue.suggested)}**" if issue.suggested else ""
        confidence = f" ({issue.confidence:.0%})" if issue.confidence is not None else ""
        st.markdown(f"**{KIND_LABELS[issue.kind]}** · {issue.split} · given **"
                    f"{analysis.markdown_text(issue.given)}**{suggestion}{confidence} · score {issue.score:.2f}")
        st.caption(analysis.markdown_text(f"{issue.detail} · {Path(issue.path).name}"))
        st.caption(f"Accept: {suggestion_words(issue, relabel_above)}")
        if status:
            st.caption(f"Decided: {status}")
        else:
            st.checkbox("select", key=key)


def suggestion_words(issue, relabel_above: dict | None) -> str:
    """What the Accept button does to this issue, in words."""
    action = suggested_action(issue, relabel_above)
    if action == "relabel":
        return f"relabel to '{analysis.markdown_text(issue.suggested)}'"
    if action == "drop_leak":
        return "drop it from the test split"
    if issue.kind == "label":
        needed = (relabel_above or {}).get(issue.suggested, RELABEL_CONFIDENCE)
        return (f"exclude (the model is not sure enough of '{analysis.markdown_text(issue.suggested)}': it relabels "
                f"from {needed:.0%})")
    return "exclude"


def accept_all_section(root: str, result, fixes: list) -> None:
    """One click for every label issue's suggestion on the training split (review.suggested_fixes)."""
    pending = suggested_fixes(result, fixes)
    left = left_to_a_person(result, fixes)
    words = []
    if left["train"]:
        words.append(f"{left['train']} cop{'ies' if left['train'] != 1 else 'y'} or poor photo"
                     f"{'s' if left['train'] != 1 else ''} of the training split (a second photo of an object, or a "
                     "blurred one with a right label, is not an error)")
    if left["test"]:
        words.append(f"{left['test']} issue{'s' if left['test'] != 1 else ''} of the test split (leaks, labels: "
                     "it is what accuracy is measured on)")
    if words:
        st.caption(f"{' and '.join(words)} {'are' if left['train'] + left['test'] != 1 else 'is'} left to you, one "
                   "by one below.")
    if not pending:
        return
    relabel = sum(f.action == "relabel" for f in pending)
    label = (f"Accept all suggested label fixes of the training split ({relabel} relabel, "
             f"{len(pending) - relabel} exclude)")
    if st.button(label, key="act_accept_all",
                 help="Every undecided label issue of the training split: relabelled when the model is as sure of "
                      "the suggested class as it is, on average, of the photos labelled with it, else excluded. "
                      "Copies within the training split and poor photos are left to you (excluding them fixes no "
                      "label), and so are issues of the test split: it is what accuracy is measured on, and "
                      "changing it to the model's answer would only flatter the model. Each fix can be undone "
                      "below."):
        record(root, pending, "suggestions accepted")


def issues_section(root: str, result, fixes: list) -> None:
    counts = result.counts()
    scored = result.method.get("test_scored_by")
    st.caption(f"Reviewed {result.images.get('train', 0)} training and {result.images.get('test', 0)} test images "
               f"in {result.seconds:.0f} s with {result.method.get('backbone')}, {result.method.get('folds')} folds"
               + (f"; test images scored by {scored}." if scored else "."))
    cols = st.columns(max(1, sum(1 for n in counts.values() if n)))
    for col, (kind, n) in zip(cols, [(k, n) for k, n in counts.items() if n]):
        col.metric(KIND_LABELS[kind], n)
    with st.expander("Class health", expanded=bool(result.health_notes)):
        st.dataframe(result.class_health, hide_index=True, width="stretch", column_config={
            "class": "Class", "train": "Training images", "test": "Test images",
            "share": st.column_config.NumberColumn("Share of training", format="percent"),
            "label_issues": "Suspected wrong labels", "copies": "Copies", "low_quality": "Poor photos"})
        for note in result.health_notes:
            st.warning(note)
    accept_all_section(root, result, fixes)
    c = st.columns(3)
    kinds = c[0].multiselect("Kinds", [k for k in KINDS if counts.get(k)], key="review_kinds",
                             format_func=lambda k: KIND_LABELS[k], placeholder="all kinds")
    cls = c[1].selectbox("Class (given)", ["all"] + result.classes, key="review_class")
    show_decided = c[2].toggle("Show decided", key="review_show_decided")
    done = decided(result, fixes)
    status = {id(i): done.get(i.path) or done.get(f"{i.path}|{i.kind}", "") for i in result.issues}
    shown = [i for i in result.issues if (not kinds or i.kind in kinds) and (cls == "all" or i.given == cls)
             and (show_decided or not status[id(i)])]
    if not shown:
        st.success("No issue left to decide with these filters.")
        return
    number = int(st.number_input("Page", 1, max(1, -(-len(shown) // PER_PAGE)), 1, key="review_page"))
    part = shown[(number - 1) * PER_PAGE:number * PER_PAGE]
    st.caption(f"{len(shown)} issues, worst first within each kind; page {number}")
    keys = {f"sel-{i.kind}-{i.path}": i for i in part}
    grid = st.columns(3)
    for k, (name, issue) in enumerate(keys.items()):
        with grid[k % 3]:
            issue_card(issue, status[id(issue)], name, result.method.get("relabel_above"))
    selected = [i for name, i in keys.items() if st.session_state.get(name)]
    actions_bar(root, result, selected)


def actions_bar(root: str, result, selected: list) -> None:
    st.markdown(f"**{len(selected)} selected**")
    c = st.columns([1, 1, 2, 1, 1], vertical_alignment="bottom")
    if c[0].button("Accept", key="act_suggested", disabled=not selected,
                   help="label issue: relabel to the suggested class where the model is sure enough of it, "
                        "else exclude; test leak: drop it from the test split; others: exclude"):
        record(root, fixes_for(result, selected, "suggested"), "suggestions accepted")
    if c[1].button("Exclude", key="act_exclude", disabled=not selected):
        record(root, fixes_for(result, selected, "exclude"), "images excluded")
    to = c[2].selectbox("Relabel the selected images to", result.classes, key="act_relabel_to",
                        help="the class the Relabel button gives the selected images")
    if c[3].button("Relabel", key="act_relabel", disabled=not selected):
        record(root, fixes_for(result, selected, "relabel", to), f"images relabelled to '{to}'")
    if c[4].button("Keep", key="act_keep", disabled=not selected, help="not an issue: hide it from the review"):
        record(root, fixes_for(result, selected, "keep"), "images kept")


def fixes_section(root: str, fixes: list) -> None:
    st.subheader("Fixes")
    path = fixes_path(root)
    if not fixes:
        st.caption(f"None yet. They will be kept in `{path}`; no photo is moved or deleted.")
        return
    st.caption(f"In `{path}`: applied by every scan and training. Undo one to restore the image as it was.")
    for n, fix in enumerate(fixes):
        cols = st.columns([6, 1])
        what = f"relabel to '{fix.to}'" if fix.action == "relabel" else fix.action.replace("_", " ")
        cols[0].markdown(analysis.markdown_text(f"{n + 1}. {what}: {fix.path}"))
        if cols[1].button("Undo", key=f"undo-{n}-{fix.path}"):
            undo_fix(root, n)
            flash(f"Undone: {what} {fix.path}")
            st.rerun()


def main() -> None:
    page("Review", "🧹")
    st.title("Review")
    st.caption("Find photos whose label looks wrong, copies (and test images that copy training ones), and photos "
               "that teach nothing; fix them without touching your files.")
    data = choose_dataset()
    if not data:
        return
    try:
        report = scan(data, dataset_stamp(data))
    except (DatasetError, OSError) as exc:
        st.error(analysis.markdown_message(str(exc), paths=(data,)))
        return
    if not report.usable:
        st.error("This dataset cannot be reviewed: " + analysis.markdown_message(report.reason(), paths=(report.root,)))
        return
    if report.fixes is not None:
        st.info(f"Fixes in force: {report.fixes.text()}")
    root = report.root
    job_section(root, data)
    try:
        fixes = load_fixes(fixes_path(root))
    except FixesError as exc:
        st.error(analysis.markdown_message(str(exc), paths=(str(fixes_path(root)),)))
        return
    result = load_result(result_path(root, runs_root()))
    if result is None:
        st.caption("No review of this dataset yet.")
    else:
        issues_section(root, result, fixes)
    fixes_section(root, fixes)


main()
