"""Load a trained model (a run directory or an exported bundle) and classify images; export bundles.

A bundle is a folder (or a zip of it) that works without Tuneboard's UI:
    model.json             backbone, classes, preprocessing (resize, crop, mean, std)
    weights.safetensors    the state_dict (safetensors: loading it can never run code)
    model.pt2              the whole model as a torch.export program: torch.export.load(path).module()
                           takes a normalised float batch N x 3 x S x S (any N) and returns logits
    model.onnx             the same model in ONNX (one file, weights inside): input `images`, the same
                           normalised float32 batch (any N), output `logits`; runs with onnxruntime alone

Both model files compute what the Predict page computes: with flip test-time augmentation on, the
logits are averaged with those of the mirrored batch inside the model (model.json says so), in
fp32. The Predict page and the CLI predict in fp32 too, whatever precision the run trained in:
under bf16 autocast a confidence moved by up to 4 points (a borderline photo could change class
between the app and the exported model).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from PIL import Image
from torch import nn

from .calibration import NOT_SURE
from .data import images_under, load_rgb, resize_size_for
from .models import build_model, classified_views, get_head, mean_logits
from .novelty import LOW_CONFIDENCE, NEIGHBOURS, REFERENCE_FILE, UNLIKE, distances, head_inputs, load_reference
from .prepare import normalize_batch, test_view
from .runs import CHECKPOINT_BEST, CHECKPOINT_LAST, RunDir

MAX_IMAGE_BYTES = 25 * 1024 * 1024
BATCH_SIZE = 32  # images a forward pass of a folder's prediction
BUNDLE_FORMAT = "tuneboard-bundle-1"


class PredictError(ValueError):
    """An image or model that cannot be used; the message names it."""


@dataclass
class Prediction:
    name: str
    top: list[tuple[str, float]]  # (class, calibrated probability), most likely first
    error: str = ""
    threshold: float = 0.0        # below this top probability the answer is "not sure"
    unlike: bool = False          # far from every training photo's features (novelty.py): "not sure" however confident

    @property
    def reason(self) -> str:
        """Why an image could not be read, without the name its error begins with."""
        prefix = f"{self.name}: "
        return self.error[len(prefix):] if self.error.startswith(prefix) else self.error

    @property
    def low_confidence(self) -> bool:
        return bool(self.top) and self.top[0][1] < self.threshold

    @property
    def not_sure(self) -> bool:
        return self.low_confidence or (bool(self.top) and self.unlike)

    @property
    def why(self) -> str:
        """Why the answer is "not sure" ("unlike the training photos", "low confidence", both), else ""."""
        reasons = ([UNLIKE] if self.unlike and self.top else []) + ([LOW_CONFIDENCE] if self.low_confidence else [])
        return " and ".join(reasons)

    @property
    def answer(self) -> str:
        """The top class, "not sure" below the threshold, "" for an image that could not be read."""
        if not self.top:
            return ""
        return NOT_SURE if self.not_sure else self.top[0][0]

    def to_dict(self) -> dict:
        return {"name": self.name, "answer": self.answer, "not_sure": self.not_sure, "why": self.why,
                "top": [{"class": c, "probability": p} for c, p in self.top], "error": self.error}


def image_from_bytes(data: bytes, name: str = "image") -> Image.Image:
    if len(data) > MAX_IMAGE_BYTES:
        raise PredictError(f"{name}: {len(data) / 1e6:.1f} MB is over the {MAX_IMAGE_BYTES // 2**20} MB limit")
    if not data:
        raise PredictError(f"{name}: the file is empty")
    try:
        return load_rgb(name, data=data)
    except Image.DecompressionBombWarning as exc:
        raise PredictError(f"{name}: too many pixels to be a photo ({exc})") from exc
    except Image.DecompressionBombError as exc:
        raise PredictError(f"{name}: too many pixels to be a photo ({exc})") from exc
    except Exception as exc:  # noqa: BLE001
        raise PredictError(f"{name}: not an image that can be read ({type(exc).__name__})") from exc


class Predictor:
    def __init__(self, model: torch.nn.Module, classes: list[str], image_size: int, mean, std,
                 backbone: str = "", source: str = "", tta_flip: bool = False, temperature: float = 1.0,
                 threshold: float = 0.0, reference: torch.Tensor | None = None,
                 distance_threshold: float | None = None, neighbours: int = NEIGHBOURS):
        self.model = model.eval()
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.resize = resize_size_for(self.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.backbone = backbone
        self.source = source
        self.tta_flip = bool(tta_flip)  # average the logits of each image and its mirror, as the run evaluated
        self.temperature = float(temperature)  # the run's calibration (calibration.py); 1.0 for older runs
        self.threshold = float(threshold)      # "not sure" below this calibrated top probability; 0: never
        # "not sure" beyond this distance from the training photos' features (novelty.py); None: no reference
        self.reference = reference if distance_threshold is not None else None
        self.distance_threshold = None if reference is None else distance_threshold
        self.neighbours = int(neighbours)  # the distance is to the K-th nearest training photo
        self._building = threading.Lock()  # the inference copy (inference_model)

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, checkpoint: str | None = None) -> "Predictor":
        """checkpoint: "last", "best", or None for the one the run selected (its best validation
        checkpoint when it held a validation split out, else the last), which predictions.csv shows."""
        run = RunDir(run_dir)
        try:
            config = run.read_config()
        except FileNotFoundError as exc:
            raise PredictError(f"{run_dir}: not a run folder (no config.json)") from exc
        status = run.read_status(default={})
        selected = status.get("selected_checkpoint", "last")
        checkpoint = checkpoint or selected
        path = run.file(CHECKPOINT_BEST if checkpoint == "best" else CHECKPOINT_LAST)
        if not path.exists():
            raise PredictError(f"{run_dir}: has no checkpoint yet (the run has not finished an epoch)")
        from .checkpoints import CheckpointError, load_checkpoint

        try:
            state = load_checkpoint(path)["model"]
        except CheckpointError as exc:
            raise PredictError(str(exc)) from None
        cfg = config["config"]
        model = build_model(cfg["backbone"], len(config["classes"]), weights="none")
        model.load_state_dict(state)
        norm = config["normalisation"]
        # the run fitted its temperature and threshold for the checkpoint it selected; another one: plain softmax
        temperature, threshold = run_calibration(status) if checkpoint == selected else (1.0, 0.0)
        reference, distance_threshold = run_reference(run, status) if checkpoint == selected else (None, None)
        neighbours = int((status.get("calibration") or {}).get("distance_neighbours") or NEIGHBOURS)
        return cls(model, config["classes"], cfg["image_size"], norm["mean"], norm["std"], cfg["backbone"], str(path),
                   tta_flip=cfg.get("tta_flip", False), temperature=temperature, threshold=threshold,
                   reference=reference, distance_threshold=distance_threshold, neighbours=neighbours)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike) -> "Predictor":
        """A bundle folder or zip. A zip is read in memory (no temporary folder); the weights are
        safetensors, which cannot run code: any other file in their place is refused."""
        path = Path(path)
        meta_bytes, weights = _bundle_files(path)
        try:
            meta = json.loads(meta_bytes)
            backbone, classes, pre = meta["backbone"], list(meta["classes"]), meta["preprocessing"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PredictError(f"{path}: model.json is not a bundle's ({type(exc).__name__}: {exc})") from None
        from safetensors.torch import load

        try:
            state = load(weights)
        except Exception as exc:  # noqa: BLE001 - a pickle or anything else in place of safetensors
            raise PredictError(f"{path}: weights.safetensors is not a safetensors file (nothing in it was run; "
                               f"{type(exc).__name__}: {exc})") from None
        model = build_model(backbone, len(classes), weights="none")
        model.load_state_dict(state)
        return cls(model, classes, pre["image_size"], pre["mean"], pre["std"], backbone, str(path),
                   tta_flip=pre.get("tta_flip", False), temperature=float(meta.get("temperature", 1.0)),
                   threshold=float(meta.get("not_sure_threshold", 0.0)))

    @classmethod
    def load(cls, path: str | os.PathLike, checkpoint: str | None = None) -> "Predictor":
        """A run folder or a bundle (folder or zip)."""
        path = Path(path)
        if not path.exists():
            raise PredictError(f"{path}: no such run folder or bundle")
        if path.is_dir() and (path / "config.json").exists():
            return cls.from_run(path, checkpoint)
        return cls.from_bundle(path)

    # --- predicting ----------------------------------------------------------------------------
    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(test_view(img, self.image_size).copy())

    @property
    def inference_model(self) -> nn.Module:
        """What classifies: a copy of the model with each BatchNorm folded into its convolution
        (activations.fold_batchnorm, checked against the model) in channels_last, made once: a
        ResNet-18 forward pass took 0.6x the CPU time (benchmarks/bench_trust.py --folder). The
        model itself stays as it is (heatmaps need its gradients; the bundle exports it)."""
        with self._building:  # two sessions' first calls build one copy
            if getattr(self, "_inference", (None, None))[0] is not self.model:  # made again for a new model
                from .activations import fold_batchnorm

                folded = fold_batchnorm(self.model.eval())
                if folded is self.model:  # nothing to fold (LayerNorm models): channels_last on a copy, not the model
                    folded = copy.deepcopy(self.model)
                self._inference = (self.model, folded.to(memory_format=torch.channels_last))
            return self._inference[1]

    def logits(self, images: list[Image.Image]) -> torch.Tensor:
        """In fp32, as the bundle's model files compute them (see the module docstring)."""
        return self.batch_logits(torch.stack([self.preprocess(img) for img in images]))

    @torch.inference_mode()
    def batch_logits(self, batch: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """The logits of a uint8 batch of test views (preprocess's), in fp32, by `model` (the
        inference model unless given)."""
        x = normalize_batch(batch, self.mean, self.std, channels_last=True)
        return mean_logits(model or self.inference_model, classified_views(x, self.tta_flip))

    def features_and_logits(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the head's input averaged over the classified views, the logits) of a uint8 batch, one pass."""
        model = self.inference_model  # read once: the hooked head and the pass are of one model
        with head_inputs(get_head(model, self.backbone)) as seen:  # this thread's passes only
            logits = self.batch_logits(batch, model)
        return torch.stack(seen).mean(0), logits

    def probabilities(self, images: list[Image.Image]) -> torch.Tensor:
        """Calibrated: softmax(logits / temperature)."""
        return torch.softmax(self.logits(images) / self.temperature, dim=1)

    def judged(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated probabilities, whether each photo is unlike the training photos) of a uint8
        batch of test views: one forward pass; the features are what the head receives
        (novelty.head_inputs). All False without a reference."""
        if self.reference is None:
            logits = self.batch_logits(batch)
            return torch.softmax(logits / self.temperature, dim=1), torch.zeros(len(logits), dtype=torch.bool)
        features, logits = self.features_and_logits(batch)
        unlike = distances(self.reference, features, self.neighbours) > self.distance_threshold
        return torch.softmax(logits / self.temperature, dim=1), unlike

    @property
    def not_sure_rule(self) -> str:
        """When the answer is "not sure", in words (the Predict page, the CLI)."""
        confidence = f"below {self.threshold:.0%} confidence" if self.threshold > 0 else ""
        if self.reference is not None:
            return (f"\"not sure\" {confidence + ' or ' if confidence else ''}for a photo {UNLIKE} (its features "
                    f"compared with {len(self.reference)} kept from the run)")
        return (f"\"not sure\" {confidence or 'never (no threshold)'}, by confidence alone: this model keeps no "
                f"reference of its training photos (a run from before it, an exported bundle, or another checkpoint "
                f"than the calibrated one), so a photo of none of its classes can get a confident answer")

    def top_k(self, probs: torch.Tensor, k: int) -> list[tuple[str, float]]:
        values, indices = probs.topk(min(k, len(self.classes)))
        return [(self.classes[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]

    def predict_files(self, paths: list[str | os.PathLike], top_k: int = 3,
                      threshold: float | None = None) -> list[Prediction]:
        """One image at a time: predict_many with batches of one."""
        return self.predict_many(((str(p), Path(p).read_bytes) for p in paths), top_k, threshold, batch_size=1)

    def predict_bytes(self, data: bytes, name: str, top_k: int = 3, threshold: float | None = None) -> Prediction:
        try:
            img = image_from_bytes(data, name)
        except PredictError as exc:
            return Prediction(name, [], str(exc))
        probs, unlike = self.judged(self.preprocess(img)[None])
        return Prediction(name, self.top_k(probs[0], top_k), threshold=self.threshold_for(threshold),
                          unlike=bool(unlike[0]))

    def threshold_for(self, threshold: float | None) -> float:
        """The threshold given, else the run's."""
        return self.threshold if threshold is None else float(threshold)

    def predict_many(self, sources: Iterable[tuple[str, Callable[[], bytes]]], top_k: int = 3,
                     threshold: float | None = None, batch_size: int = BATCH_SIZE,
                     progress: Callable[[int, int], None] | None = None, total: int = 0) -> list[Prediction]:
        """Classify many images in batches (the single-image path's numbers: the same preprocessing,
        batch or not). `sources`: (name, a function returning its bytes) each; an image that cannot
        be read or decoded gets a Prediction naming why and the rest go on. `progress(done, total)`
        after every batch."""
        out: list[Prediction] = []
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            if pending:
                probs, unlike = self.judged(torch.stack([view for _, view in pending]))
                for (slot, _), p, far in zip(pending, probs, unlike.tolist()):
                    out[slot] = Prediction(out[slot].name, self.top_k(p, top_k),
                                           threshold=self.threshold_for(threshold), unlike=far)
                pending.clear()
            if progress is not None:
                progress(len(out), total or len(out))

        for name, view, error in in_threads(self._test_view, sources, window=2 * batch_size):
            out.append(Prediction(name, [], error))
            if view is None:
                continue
            pending.append((len(out) - 1, view))
            if len(pending) == batch_size:
                flush()
        flush()
        return out

    def _test_view(self, source: tuple[str, Callable[[], bytes]]) -> tuple[str, torch.Tensor | None, str]:
        """(name, the uint8 test view, "") or (name, None, why it cannot be read): read, decoded and
        preprocessed on a reading thread (PIL releases the GIL), while the model classifies a batch."""
        name, read = source
        try:
            return name, self.preprocess(image_from_bytes(read(), name)), ""
        except PredictError as exc:
            return name, None, str(exc)
        except OSError as exc:
            return name, None, f"{name}: cannot be read ({exc.strerror or exc})"

    def predict_folder(self, folder: str | os.PathLike, top_k: int = 3, threshold: float | None = None,
                       batch_size: int = BATCH_SIZE, progress: Callable[[int, int], None] | None = None
                       ) -> list[Prediction]:
        """Every image file under `folder` (sorted, sub-folders included), in batches."""
        files = image_files(folder)
        return self.predict_many(((str(f), f.read_bytes) for f in files), top_k, threshold, batch_size,
                                 progress, total=len(files))


def run_calibration(status: dict) -> tuple[float, float]:
    """(temperature, "not sure" threshold) a run recorded (engine.calibration_of); (1.0, 0.0), the
    plain softmax answering every photo, for a run from before calibration."""
    calibration = status.get("calibration") or {}
    return float(status.get("temperature") or 1.0), float(calibration.get("threshold") or 0.0)


def in_threads(fn: Callable, items: Iterable, window: int) -> Iterator:
    """fn(item) for each item, in order, computed on the reading threads (prepare.readers) at most
    `window` ahead of the caller (a folder of 10,000 photos is not held decoded at once)."""
    from collections import deque

    from .prepare import readers

    ahead: deque = deque()
    for item in items:
        ahead.append(readers().submit(fn, item))
        if len(ahead) >= window:
            yield ahead.popleft().result()
    while ahead:
        yield ahead.popleft().result()


def run_reference(run: RunDir, status: dict) -> tuple[torch.Tensor | None, float | None]:
    """(the training photos' features, the distance threshold) a run kept (engine.reference_of);
    (None, None), the confidence rule alone, for a run from before it or one whose file is missing."""
    distance_threshold = (status.get("calibration") or {}).get("distance_threshold")
    if distance_threshold is None:
        return None, None
    reference = load_reference(run.file(REFERENCE_FILE))
    return (None, None) if reference is None else (reference, float(distance_threshold))


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The files under `folder` to classify: every file with an image extension, sub-folders
    included, hidden ones left out, sorted by path. Raises PredictError for a missing folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PredictError(f"{folder}: {'not a folder' if folder.exists() else 'does not exist'}")
    return sorted(images_under(folder))


def predict_zip(predictor: "Predictor", source, name: str, top_k: int = 3, threshold: float | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """Every image in an uploaded zip, unpacked safely (datastore.extract_zip's limits: no paths
    outside it, no links, size, count and compression ratio) into a temporary folder that is gone
    afterwards; names relative to the zip. Raises datastore.UploadError for a refused archive."""
    import tempfile

    from .datastore import extract_zip

    with tempfile.TemporaryDirectory(prefix="tuneboard-predict-") as tmp:
        folder = extract_zip(source, tmp, "upload", class_folders=False)  # photos, not a dataset
        results = relative_to(predictor.predict_folder(folder, top_k, threshold, progress=progress), folder)
    return results


def relative_to(results: list[Prediction], folder: str | os.PathLike) -> list[Prediction]:
    """The results' names and error texts relative to `folder` (a zip's temporary folder, a folder
    named on the page): an error then begins with the name the table shows, so the page can name the
    file whole (a folder with spaces in its path was cut into pieces of code)."""
    for r in results:
        r.name = relative_name(r.name, Path(folder))
        r.error = r.error.replace(f"{folder}/", "")
    return results


def relative_name(name: str, folder: Path) -> str:
    try:
        return str(Path(name).relative_to(folder))
    except ValueError:
        return name


def image_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The images named on a command line: files as given (one that cannot be read is named in its
    Prediction, and the others go on), folders expanded to their image files (image_files)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(image_files(p) if p.is_dir() else [p])
    return out


def predictions_frame(predictions: list[Prediction], top_k: int = 3):
    """The table of a folder's predictions: file, answer (`not sure` below the threshold or unlike
    the training photos), confidence (the top calibrated probability), not_sure, why (not sure),
    top-1..k as "class (p)", error."""
    import pandas as pd

    rows = []
    for p in predictions:
        row = {"file": p.name, "answer": p.answer, "confidence": p.top[0][1] if p.top else None,
               "not_sure": p.not_sure if p.top else None, "why": p.why}
        for k in range(top_k):
            row[f"top{k + 1}"] = f"{p.top[k][0]} ({p.top[k][1]:.3f})" if k < len(p.top) else ""
        row["error"] = p.error
        rows.append(row)
    return pd.DataFrame(rows, columns=["file", "answer", "confidence", "not_sure", "why",
                                       *[f"top{k + 1}" for k in range(top_k)], "error"])


# --------------------------------------------------------------------------------------------
# Export


MAX_BUNDLE_BYTES = 4 * 1024**3
# Only the confidence rule travels: the distance rule needs the training photos' features, and a bundle is
# made to be shared, where features of the user's own photos do not belong; the ONNX model keeps one output.
BUNDLE_NOT_SURE_RULE = ("confidence only: \"not sure\" below not_sure_threshold. The run's second rule (\"not sure\" "
                        "for a photo unlike the training photos, by its distance to their features) does not travel: "
                        "it needs features of the training photos, which a bundle made for sharing leaves out")  # model.json and weights.safetensors together, unpacked


def _bundle_files(path: Path) -> tuple[bytes, bytes]:
    """(model.json, weights.safetensors) of a bundle folder or zip, read into memory."""
    names = ("model.json", "weights.safetensors")
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:  # the files at the top, or in bundle/ (bundle_zip_bytes)
            entries = {i.filename.removeprefix(f"{BUNDLE_FOLDER}/"): i for i in zf.infolist()}
            missing = [n for n in names if n not in entries]
            if missing:
                raise PredictError(f"{path}: not a bundle (no {' or '.join(missing)} in the zip)")
            if sum(entries[n].file_size for n in names) > MAX_BUNDLE_BYTES:
                raise PredictError(f"{path}: its files unpack to more than {MAX_BUNDLE_BYTES // 2**30} GB")
            return zf.read(entries[names[0]]), zf.read(entries[names[1]])
    if not path.is_dir():
        raise PredictError(f"{path}: not a run folder, a bundle folder or a bundle zip")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise PredictError(f"{path}: not a bundle (no {' or '.join(missing)})")
    return (path / names[0]).read_bytes(), (path / names[1]).read_bytes()


def export_bundle(run_dir: str | os.PathLike, out_dir: str | os.PathLike, checkpoint: str | None = None) -> Path:
    """Write a bundle folder for a finished run (see the module docstring)."""
    from safetensors.torch import save_file

    predictor = Predictor.from_run(run_dir, checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in predictor.model.state_dict().items()}
    save_file(state, str(out / "weights.safetensors"))
    with contextlib.suppress(OSError):  # safetensors writes it owner-only; the bundle is for sharing
        os.chmod(out / "weights.safetensors", 0o644)
    meta = {
        "format": BUNDLE_FORMAT, "backbone": predictor.backbone, "classes": predictor.classes,
        "preprocessing": {"image_size": predictor.image_size, "resize": predictor.resize,
                          "steps": f"RGB (EXIF orientation applied, transparency on white), "
                                   f"Resize([{predictor.resize}, {predictor.resize}]) bilinear, "
                                   f"CenterCrop({predictor.image_size}), scale to [0, 1], Normalize(mean, std)"
                                   + ("; model.pt2 and model.onnx average the logits with the mirrored image's "
                                      "themselves (tta_flip)" if predictor.tta_flip else ""),
                          "mean": list(predictor.mean), "std": list(predictor.std),
                          "tta_flip": predictor.tta_flip,
                          "precision": "fp32"},
        "source_run": str(Path(run_dir).resolve()),
        # calibrated probabilities are softmax(logits / temperature); below not_sure_threshold (a
        # calibrated top probability) the answer is "not sure" (calibration.py)
        "temperature": predictor.temperature,
        "not_sure_threshold": predictor.threshold,
        "not_sure_rule": BUNDLE_NOT_SURE_RULE,
    }
    deployed = Deployed(predictor.model, predictor.tta_flip).eval()
    example = torch.zeros(2, 3, predictor.image_size, predictor.image_size)
    program = torch.export.export(deployed, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(out / "model.pt2"))
    (out / "model.onnx").unlink(missing_ok=True)
    try:  # the ONNX exporter is a separate piece (onnxscript): without it the rest of the bundle still stands
        export_onnx(deployed, predictor.image_size, out / "model.onnx")
    except Exception as exc:  # noqa: BLE001 - named in model.json and by export's callers
        (out / "model.onnx").unlink(missing_ok=True)
        meta["onnx_error"] = f"model.onnx could not be exported: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    return out


def bundle_warning(bundle_dir: str | os.PathLike) -> str:
    """What an exported bundle lacks ("" when it is whole): the ONNX model's export error."""
    try:
        return json.loads((Path(bundle_dir) / "model.json").read_text()).get("onnx_error", "")
    except (OSError, ValueError):
        return ""


class Deployed(nn.Module):
    """What a bundle's model files compute: the logits of a normalised float batch, averaged with
    the mirrored batch's when the run predicts with flip test-time augmentation (as Predictor)."""

    def __init__(self, model: nn.Module, tta_flip: bool):
        super().__init__()
        self.model, self.tta_flip = model, tta_flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return mean_logits(self.model, classified_views(images, self.tta_flip))


def export_onnx(module: nn.Module, image_size: int, path: str | os.PathLike) -> Path:
    """`module` as one ONNX file (weights inside) with any batch size: input `images` (N x 3 x S x S,
    normalised float32), output `logits` (N x classes). PyTorch's torch.export-based exporter
    (the default since PyTorch 2.9; it needs onnxscript)."""
    path = Path(path)
    example = torch.zeros(2, 3, image_size, image_size)
    torch.onnx.export(module.eval(), (example,), str(path), dynamo=True, input_names=["images"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                      external_data=False, optimize=True, verbose=False)
    return path


BUNDLE_FOLDER = "bundle"  # the folder a bundle zip unpacks to (the README's lines read bundle/model.json)


def bundle_zip_bytes(bundle_dir: str | os.PathLike) -> bytes:
    """The bundle as a zip that unpacks to a `bundle/` folder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(Path(bundle_dir).iterdir()):
            zf.write(f, f"{BUNDLE_FOLDER}/{f.name}")
    return buf.getvalue()
