"""Scoring and splitting: the validation split by content, a run scored by the model it keeps,
dataset discovery in a folder of several datasets, the Predict page with a missing test image."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import make_dataset, tiny_train_config, write_image


def dataset_with_copies(root: Path) -> Path:
    """Two classes of 12 training images; in 'cat', 6 files are byte-identical copies of one photo
    (a photo saved under several names), and four 'dog' files are copies of 'cat' photos (filed
    under both classes)."""
    make_dataset(root, per_class=12, test_per_class=3)
    cats = root / "train" / "cat"
    for i in range(1, 6):
        shutil.copyfile(cats / "cat_0.png", cats / f"cat_{i}.png")
    for i in range(8, 12):
        shutil.copyfile(cats / f"cat_{i}.png", root / "train" / "dog" / f"dog_{i}.png")
    return root


def test_the_validation_split_keeps_exact_copies_on_one_side_and_says_so(tmp_path):
    from finetune_core import prepare
    from finetune_core.data import scan_dataset

    report = scan_dataset(dataset_with_copies(tmp_path / "copies"))
    data = prepare.prepare_data(report, 32, cache_dir="")
    split = prepare.validation_split(data, 0.25)
    train_content = {data.train_sha1[i] for i in split.train}
    assert split.val and not [data.train_paths[i] for i in split.val if data.train_sha1[i] in train_content]
    assert sorted(split.train + split.val) == list(range(len(data.train_labels)))
    assert (split.copy_sets, split.copy_images) == (1, 6)
    record = split.record()
    assert record["split_by"] == "file content" and record["copy_sets"] == 1
    assert "6 images are exact copies" in split.describe()
    # copies filed under both classes: those the order held out of 'cat' went back to training
    assert split.moved_to_training and {Path(p).parent.name for p in split.moved_to_training} == {"cat"}
    assert "moved to training" in split.describe()
