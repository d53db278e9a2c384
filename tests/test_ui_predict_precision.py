"""The app predicts as the exported bundle does (issue 25, item 11): a run trained under bf16
autocast gave 52.5% in the app and 48.2% in ONNX for one photo. On real photos, the Predict page's
path (Predictor.from_run) and the bundle's model.onnx agree within 1e-4 in probability."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_train_config
from finetune_core.data import load_rgb
from finetune_core.engine import train
from finetune_core.predict import Predictor, export_bundle
from finetune_core.prepare import normalize_batch
from finetune_core.runs import RunDir

HYMENOPTERA = ROOT.parent / "shared" / "datasets" / "hymenoptera"


def few_real_photos(dst, per_class: int, test_per_class: int):
    """A handful of hymenoptera's photos, in its own train/test layout."""
    for split, n in (("train", per_class), ("test", test_per_class)):
        for cls in ("ants", "bees"):
            (dst / split / cls).mkdir(parents=True)
            for path in sorted((HYMENOPTERA / split / cls).iterdir())[:n]:
                shutil.copy(path, dst / split / cls / path.name)
    return dst


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"the real dataset is not at {HYMENOPTERA}")
def test_the_app_and_the_bundles_onnx_model_give_the_same_probabilities_for_a_bf16_run(tmp_path):
    import onnxruntime as ort

    data = few_real_photos(tmp_path / "hymenoptera", per_class=4, test_per_class=4)
    run = tmp_path / "runs" / "20260101-000000-bf16"
    # A small lr: confidences stay away from 0 and 1, where bf16's rounding shows (0.4 % here; 4.3
    # points on the EfficientNet)
    train(tiny_train_config(data, epochs=1, image_size=64, precision="bf16", tta_flip=True, lr=1e-4, batch_size=4),
          run, cache_dir="")
    if RunDir(run).read_config().get("precision") != "bf16 autocast":
        pytest.skip("this CPU has no native bf16: the run trained in fp32, so there is no bf16 to differ from")
    app = Predictor.from_run(run)
    photos = sorted((data / "test").rglob("*.jpg"))
    in_app = app.probabilities([load_rgb(p) for p in photos]).numpy()
    bundle = export_bundle(run, tmp_path / "bundle")
    batch = torch.stack([app.preprocess(load_rgb(p)) for p in photos])
    x = normalize_batch(batch, app.mean, app.std, channels_last=False).numpy()
    logits = ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"images": x})[0]
    temperature = json.loads((bundle / "model.json").read_text())["temperature"]  # calibrated, as the app's
    in_onnx = torch.softmax(torch.from_numpy(logits) / temperature, dim=1).numpy()
    assert len(photos) == 8 and 0.05 < in_app.max(axis=1).min() < 0.95  # not saturated: a difference would show
    assert np.abs(in_app - in_onnx).max() < 1e-4
