"""Predict: what the model gets right and wrong, how sure it is, where it looks, classify dropped
images or a whole folder, export the model."""
from __future__ import annotations

import tempfile
from pathlib import Path

import streamlit as st

from finetune_core import analysis, calibration, datastore, novelty, plots
from finetune_core.datastore import runs_root
from finetune_core.heatmaps import METHOD, HeatmapError, Heatmapper
from finetune_core.predict import (MAX_IMAGE_BYTES, PredictError, Predictor, bundle_warning, bundle_zip_bytes,
                                   export_bundle, image_from_bytes, predict_zip, predictions_frame, relative_to)
from finetune_core.runs import CHECKPOINT_LAST, PREDICTIONS, RunDir, RunInfo, list_runs
from tuneboard_ui import keep_run_choice, page, picture, state_label


def choose_run() -> RunInfo | None:
    """A finished run with a model and test predictions; None when there is none yet."""
    every = list_runs(runs_root())
    runs = [r for r in every if not r.error and r.has_checkpoint and (Path(r.path) / PREDICTIONS).exists()]
    damaged = [r for r in every if r.error or (r.warning and not r.has_checkpoint)]
    if damaged:
        st.caption("Not offered, damaged: " + "; ".join(f"`{r.id}` ({r.error or r.warning})" for r in damaged))
    if not runs:
        st.info("No finished run with a model yet: train one on the Train page.")
        return None
    by_id = {r.id: r for r in runs}
    best = analysis.best_of_newest_group(runs)  # not the newest: often a comparison's scratch twin
    keep_run_choice("predict_run", by_id)  # its label ends with the id, as run_choice_label's
    run_id = st.selectbox("Run", list(by_id), key="predict_run", index=list(by_id).index(best),
                          format_func=lambda i: f"{by_id[i].name} · {state_label(by_id[i].state)} · "
                                                f"{by_id[i].score.text()} · {i}")
    return by_id[run_id]


GALLERY_PAGE = 30  # test images a page of the gallery shows


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def predictor(path: str, stamp: float) -> Predictor:
    return Predictor.from_run(path)


@st.cache_resource(show_spinner="Preparing heatmaps…", max_entries=2)
def heatmapper(path: str, stamp: float) -> Heatmapper:
    return Heatmapper(predictor(path, stamp))


@st.cache_data(show_spinner=False, max_entries=600)
def overlay(path: str, stamp: float, data: bytes, class_index: int | None):
    """The heatmap over one image (bytes: a dropped image, or a test image's file), kept for the
    session: over the whole photo, as the photo beside it is shown (the part the model does not see faded)."""
    images, explained = heatmapper(path, stamp).overlays([image_from_bytes(data)], class_index, framing="photo")
    return images[0], explained[0]


def heatmap_controls(model: Predictor, key: str) -> tuple[bool, int | None]:
    """(show heatmaps, the class to explain or None for the answer)."""
    c = st.columns([1, 2])
    show = c[0].toggle("Show where the model looks", key=f"heatmaps_{key}",
                       help=f"{METHOD} heatmaps over the whole photo, framed as the photo beside it: red is where "
                            "the evidence for the class is; the model sees the photo squeezed to a square and its "
                            "centre, so the faded border is what it does not see")
    choice = c[1].selectbox("Explain", ["the answer"] + [str(x) for x in model.classes], key=f"explain_{key}",
                            disabled=not show, format_func=lambda x: x if x == "the answer" else f"why {x}?")
    return show, None if choice == "the answer" else [str(x) for x in model.classes].index(choice)


def show_heatmap(info: RunInfo, model: Predictor, data: bytes, class_index: int | None) -> None:
    try:
        image, explained = overlay(info.path, model_stamp(info), data, class_index)
    except (HeatmapError, PredictError) as exc:
        st.caption(f"No heatmap: {analysis.markdown_message(str(exc))}")
        return
    st.image(image, width="stretch", caption=f"why {model.classes[explained]} (faded: unseen by the model)")


def model_stamp(info: RunInfo) -> float:
    return (Path(info.path) / CHECKPOINT_LAST).stat().st_mtime


def gallery_tab(predictions, classes, info: RunInfo, model: Predictor) -> None:
    show_maps, class_index = heatmap_controls(model, "gallery")
    c = st.columns(3)
    mistakes = c[0].checkbox("Mistakes only", key="mistakes_only")
    cls = c[1].selectbox("True class", ["all"] + [str(x) for x in classes], key="gallery_class")
    sort = c[2].selectbox("Order", ["loss", "confidence", "least confident"], key="gallery_sort",
                          format_func=lambda s: {"loss": "worst mistakes first", "confidence": "most confident first",
                                                 "least confident": "least confident first"}[s])
    shown = analysis.gallery(predictions, mistakes, None if cls == "all" else cls, sort)
    last = analysis.page_of(shown, 1, GALLERY_PAGE)[1]
    if st.session_state.get("gallery_page", 1) > last:  # fewer pages since (a filter): the box shows the last
        st.session_state["gallery_page"] = last
    number = int(st.number_input("Page", min_value=1, max_value=last, value=1, step=1, key="gallery_page",
                                 help=f"{GALLERY_PAGE} images a page")) if len(shown) > GALLERY_PAGE else 1
    part, pages = analysis.page_of(shown, number, GALLERY_PAGE)
    first = min(number, pages) * GALLERY_PAGE - GALLERY_PAGE
    st.caption(f"{len(shown)} images" + (f": {first + 1}-{first + len(part)} shown, page {min(number, pages)} of "
                                         f"{pages}" if pages > 1 else ""))
    for k, (_, row) in enumerate(part.iterrows()):
        if k % 6 == 0:  # a row of columns per six images: on a phone they stack in order, row by row
            grid = st.columns(6)
        ok = str(row["true"]) == str(row["predicted"])
        with grid[k % 6]:
            picture(row["path"])
            if show_maps and Path(row["path"]).is_file():
                show_heatmap(info, model, Path(row["path"]).read_bytes(), class_index)
            st.caption(f"{'right' if ok else 'WRONG'}: true **{analysis.markdown_text(row['true'])}** · predicted "
                       f"**{analysis.markdown_text(row['predicted'])}** "
                       f"({row['confidence']:.0%})")


def metrics_tab(predictions, classes) -> None:
    matrix = analysis.confusion(predictions, classes)
    st.plotly_chart(plots.confusion_figure(matrix, [str(x) for x in classes]), width="stretch", key="confusion")
    st.dataframe(analysis.per_class_metrics(predictions, classes).style.format(precision=3),  # "0.900", not "0.9"
                 width="stretch", hide_index=True)


def confusion_cell_section(predictions, classes, info: RunInfo) -> None:
    """Pick a cell of the confusion matrix: its images, worst first, with the Review page's fixes."""
    from finetune_core.fixes import FixesError, add_fixes, fixes_for_images
    from tuneboard_ui import flash

    st.subheader("A cell of the matrix")
    names = [str(x) for x in classes]
    c = st.columns(2)
    true = c[0].selectbox("True class", names, key="cell_true")
    predicted = c[1].selectbox("Predicted class", names, key="cell_predicted", index=min(1, len(names) - 1))
    cell = analysis.confusion_cell(predictions, true, predicted).head(GALLERY_PAGE)
    st.caption(f"{len(cell)} test images labelled '{true}' and predicted '{predicted}', worst first")
    grid = st.columns(6)
    for k, (_, row) in enumerate(cell.iterrows()):
        with grid[k % 6]:
            picture(row["path"])
            st.checkbox(f"{row['confidence']:.0%}", key=f"cell-{row['path']}")
    chosen = [row["path"] for _, row in cell.iterrows() if st.session_state.get(f"cell-{row['path']}")]
    root = (RunDir(info.path).read_config().get("dataset") or {}).get("root", "")
    c = st.columns(2)
    action = None
    if c[0].button(f"Relabel to '{predicted}'", key="cell_relabel", disabled=not chosen or not root):
        action = fixes_for_images(root, chosen, "relabel", to=predicted, kind="label")
    if c[1].button("Exclude", key="cell_exclude", disabled=not chosen or not root):
        action = fixes_for_images(root, chosen, "exclude", kind="label")
    if action:
        try:
            flash(f"{len(action)} fixes recorded in {add_fixes(root, action)}; the next training uses them")
        except FixesError as exc:
            st.error(analysis.markdown_message(str(exc)))
            return
        st.rerun()


def confidence_tab(info: RunInfo, model: Predictor, predictions) -> float:
    """The run's calibration (reliability diagram, ECE before and after) and the "not sure" threshold
    (the run's, adjustable here for every tab): returns the threshold in force."""
    status = RunDir(info.path).read_status(default={})
    record = status.get("calibration")
    threshold = st.slider("Answer \"not sure\" below this confidence", 0.0, 1.0, float(model.threshold), 0.01,
                          key=f"threshold_{info.id}",
                          help="the calibrated top probability under which the answer is \"not sure\" with the top "
                               "guesses (Classify and A folder use it)")
    unsure, error = analysis.not_sure_summary(predictions, threshold)
    st.caption(f"On the {len(predictions)} test images at {threshold:.2f}: {unsure:.0%} \"not sure\", "
               + (f"{error:.1%} wrong among those answered" if error is not None else "none answered"))
    if not record:
        st.info("This run is from before calibration: its confidences are the plain softmax (temperature 1) and "
                "it answers every photo unless the threshold above is raised.")
        return threshold
    st.markdown(f"**Temperature {record['temperature']:.2f}** ({record['method']}). Expected calibration error on "
                f"the test split: **{record['ece_before']:.3f}** before, **{record['ece_after']:.3f}** after. The "
                f"run's threshold, {record['threshold']:.2f}, "
                + (f"aims at {record['max_error']:.0%} errors among the answered images, which this model cannot "
                   "reach (below)." if record.get("threshold_capped") else
                   f"was chosen for at most {record['max_error']:.0%} errors among the answered images."))
    if record.get("threshold_capped"):
        st.warning(f"This model is often wrong even where it answers: at the run's threshold, "
                   f"{record['test_error_answered'] or 0:.1%} of the test photos it answers are wrong (measured when the "
                   f"run ended; the line above the slider counts at the slider's value). Keeping that to "
                   f"{record['max_error']:.0%} would have meant "
                   f"\"not sure\" for more than {calibration.MAX_NOT_SURE:.0%} of the photos, so the threshold stops "
                   f"at {calibration.MAX_NOT_SURE:.0%} \"not sure\". Train longer or on more photos; or raise the "
                   "slider for fewer wrong answers and more \"not sure\".")
    st.plotly_chart(plots.reliability_figure(record["bins_before"], record["bins_after"]), width="stretch",
                    key="reliability")
    if model.reference is not None:
        st.markdown(f"**Photos of none of the classes**: a photo is also \"not sure\" when it is *unlike the training "
                    f"photos*: its features (the head's input) lie further than {model.distance_threshold:.3f} from "
                    f"the {model.neighbours}th nearest of {len(model.reference):,} training photos the run kept. "
                    f"That distance was {record['distance_method']}, so that both rules together leave at most "
                    f"{novelty.MAX_IN_CLASS_NOT_SURE:.0%} "
                    f"of in-class photos \"not sure\": {record['test_not_sure_combined']:.1%} of the test photos at "
                    f"the run's thresholds (the slider moves the confidence rule only).")
    else:
        st.caption(model.not_sure_rule[0].upper() + model.not_sure_rule[1:] + ".")
    return threshold


def show_answer(column, result, name: str) -> None:
    best, p = result.top[0]
    if result.not_sure:
        column.markdown(f"**{analysis.markdown_text(name)}**: **not sure**, {result.why} (top guess "
                        f"{analysis.markdown_text(best)}, {p:.1%})")
    else:
        column.markdown(f"**{analysis.markdown_text(name)}**: **{analysis.markdown_text(best)}** ({p:.1%})")


def classify_tab(info: RunInfo, model: Predictor, threshold: float) -> None:
    classes = model.classes
    files = st.file_uploader("Drop one or more images", accept_multiple_files=True, key="classify_upload",
                             max_upload_size=MAX_IMAGE_BYTES // 2**20)  # the widget states the limit that applies
    if st.toggle("Use the camera", key="use_camera"):
        shot = st.camera_input("Take a picture", key="camera")
        if shot is not None:
            files = list(files or []) + [shot]
    top_k = st.slider("Classes to show", 1, max(1, min(10, len(classes))), min(3, len(classes)), key="top_k")
    show_maps, class_index = heatmap_controls(model, "classify")
    for f in files or []:
        result = model.predict_bytes(f.getvalue(), f.name, top_k=top_k, threshold=threshold)
        cols = st.columns([1, 1, 3] if show_maps else [1, 3])
        if result.error:
            cols[-1].error(analysis.markdown_message(result.error))
            continue
        cols[0].image(f.getvalue(), width="stretch")
        if show_maps:
            with cols[1]:
                show_heatmap(info, model, f.getvalue(), class_index)
        show_answer(cols[-1], result, f.name)
        cols[-1].plotly_chart(plots.top_k_figure(result.top), width="stretch", key=f"topk-{f.name}-{f.file_id}")


MAX_FOLDER_ZIP_BYTES = 200 * 1024**2  # a zip of photos to classify (the dataset upload allows more)


def folder_tab(model: Predictor, threshold: float) -> None:
    """A folder inside the data roots, or a zip of photos: a table and its CSV."""
    st.write("Classify every image in a folder (sub-folders included) in batches: a folder inside the data "
             f"folder, or a zip of photos (at most {MAX_FOLDER_ZIP_BYTES // 2**20} MB, unpacked safely and "
             "deleted afterwards). From a terminal: `python -m finetune_core predict --run RUN DIR --csv out.csv`.")
    c = st.columns([3, 1])
    folder = c[0].text_input("A folder", key="predict_folder", placeholder="e.g. hotdog/test/hotdog")
    go = c[1].button("Classify the folder", key="predict_folder_go", disabled=not folder.strip())
    upload = st.file_uploader("or a zip of photos", type=["zip"], key="predict_zip",
                              max_upload_size=MAX_FOLDER_ZIP_BYTES // 2**20)
    bar = st.empty()

    def progress(done: int, total: int) -> None:
        bar.progress(done / max(1, total), text=f"{done}/{total} images")

    zip_key = (model.source, upload.file_id) if upload is not None else None
    try:
        if go:
            path = datastore.check_data_folder(folder.strip())
            results = relative_to(model.predict_folder(path, threshold=threshold, progress=progress), path)
            st.session_state["folder_results"] = (model.source, results)
        elif zip_key is not None and st.session_state.get("folder_zip_done") != zip_key:  # a new zip, or run
            results = predict_zip(model, upload, upload.name, threshold=threshold, progress=progress)
            st.session_state["folder_results"] = (model.source, results)
            st.session_state["folder_zip_done"] = zip_key
    except (datastore.FolderNotAllowed, datastore.UploadError, PredictError) as exc:
        st.error(analysis.markdown_message(str(exc), paths=(folder, *getattr(exc, "paths", ()))))
        return
    finally:
        bar.empty()
    made_by, results = st.session_state.get("folder_results", (None, None))
    if made_by != model.source:  # none yet, or another run's model made them
        return
    for r in results:  # the threshold may have moved since
        r.threshold = threshold
    frame = predictions_frame(results)
    unsure, errors = int(frame["not_sure"].eq(True).sum()), int((frame["error"] != "").sum())
    unlike = sum(r.not_sure and r.unlike for r in results)
    st.caption(f"{len(frame)} images: {len(frame) - unsure - errors} answered, {unsure} not sure ({unlike} of them "
               f"unlike the training photos), {errors} unreadable")
    # The error column wide and holding the reason alone (the file column names the file), and each
    # unreadable file's reason in full below: a narrow cell showed the start of the path and cut off why.
    shown = frame.assign(error=[r.reason for r in results])
    st.dataframe(shown, width="stretch", hide_index=True, key="folder_table",
                 column_config={"error": st.column_config.TextColumn("error", width="large")})
    unreadable = [r for r in results if r.error]
    if unreadable:
        with st.expander(f"Unreadable: {len(unreadable)} file{'s' if len(unreadable) > 1 else ''}, with the reason",
                         expanded=len(unreadable) <= 5):
            for r in unreadable:
                st.markdown(f"- {analysis.markdown_message(r.error, paths=(r.name,))}")
    st.download_button("Download the CSV", frame.to_csv(index=False), file_name="predictions.csv", mime="text/csv",
                       key="download_folder_csv")


def export_tab(info: RunInfo) -> None:
    st.write("A bundle that works without Tuneboard: `weights.safetensors`, `model.json` (classes and "
             "preprocessing), `model.pt2` (a `torch.export` program) and `model.onnx` (for onnxruntime and other "
             "ONNX runtimes; the README shows the lines that classify a photo with it). "
             "From Tuneboard's folder, `python -m finetune_core predict --run bundle.zip IMAGE` accepts it.")
    if st.button("Build the bundle", key="build_bundle"):
        with st.spinner("Exporting…"):
            with tempfile.TemporaryDirectory() as tmp:
                bundle = export_bundle(info.path, Path(tmp) / "b")
                st.session_state["bundle"] = (info.id, bundle_zip_bytes(bundle), bundle_warning(bundle))
    if st.session_state.get("bundle", (None,))[0] == info.id:
        _, data, warning = st.session_state["bundle"]
        if warning:
            st.warning(f"{warning}. The rest of the bundle is complete.")
        st.download_button("Download bundle.zip", data, file_name=f"{info.id}-bundle.zip", mime="application/zip",
                           key="download_bundle")


def main() -> None:
    page("Predict", "🔮")
    st.title("Predict")
    info = choose_run()
    if info is None:
        return
    try:  # a damaged or crafted checkpoint, a damaged predictions.csv: say so, keep the page
        model = predictor(info.path, model_stamp(info))
        predictions = RunDir(info.path).read_predictions()
    except (PredictError, OSError, ValueError) as exc:
        st.error(f"This run cannot be used for prediction: {analysis.markdown_message(str(exc))}")
        return
    classes = model.classes
    st.caption(f"{model.backbone}, {len(classes)} classes, {model.image_size} px · {info.score.text()} "
               f"on {len(predictions)} test images")
    tab_images, tab_metrics, tab_confidence, tab_classify, tab_folder, tab_export = st.tabs(
        ["Test images", "Confusion and per-class metrics", "Confidence", "Classify your images", "A folder",
         "Export"])
    with tab_confidence:  # first: its threshold is the one Classify and A folder use
        threshold = confidence_tab(info, model, predictions)
    with tab_images:
        gallery_tab(predictions, classes, info, model)
    with tab_metrics:
        metrics_tab(predictions, classes)
        confusion_cell_section(predictions, classes, info)
    with tab_classify:
        classify_tab(info, model, threshold)
    with tab_folder:
        folder_tab(model, threshold)
    with tab_export:
        export_tab(info)


main()
