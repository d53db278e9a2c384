"""What a run or a review does when its numbers would mislead (a first user's findings): too few
held-out images, a temperature that does not help, a "not sure" threshold that would refuse most
answers, a review detector that flags much of the dataset."""
from __future__ import annotations

import pytest
import torch

from finetune_core import calibration


def _logits(n: int, seed: int = 0, scale: float = 1.0, accuracy: float = 0.85) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    right = torch.rand(n, generator=g) < accuracy
    predicted = torch.where(right, labels, 1 - labels)
    margin = scale * (0.2 + 3 * torch.rand(n, generator=g))
    logits = torch.zeros(n, 2)
    logits[torch.arange(n), predicted] = margin
    return logits, labels


def test_too_few_held_out_images_give_no_temperature_and_no_threshold():
    logits, labels = _logits(2)
    result = calibration.calibrate(logits * 5, labels)
    assert result.temperature == 1.0 and result.threshold == 0.0 and result.test_not_sure == 0.0
    assert "too few" in result.method and "2 held-out images" in result.method


def test_a_temperature_that_does_not_lower_the_held_out_error_is_not_kept(monkeypatch):
    logits, labels = _logits(200, seed=1)
    fitted = calibration.calibrate(logits * 6, labels)  # over-confident: out of fold, T helps and is kept
    assert fitted.temperature > 1.5 and "kept 1" not in fitted.method
    assert fitted.ece_after < fitted.ece_before
    # out of fold, the fitted T makes the error worse (a first user's run: ECE 0.052 -> 0.062): T stays 1
    worse = torch.softmax(logits * 40, 1)
    monkeypatch.setattr(calibration, "cross_validated_probabilities", lambda *a, **k: worse)
    kept = calibration.calibrate(logits, labels)
    assert kept.temperature == 1.0 and "kept 1" in kept.method and kept.ece_after == kept.ece_before


def test_the_default_threshold_never_refuses_more_than_its_cap_of_the_held_out_images():
    logits, labels = _logits(500, seed=3, accuracy=0.8)
    probs = torch.softmax(logits, 1)
    strict = calibration.choose_threshold(probs, labels)
    capped = calibration.capped_threshold(probs, labels)
    assert 1 - calibration.answered_share(probs, strict) > 0.3  # 5% errors would refuse most of them
    assert capped < strict and 1 - calibration.answered_share(probs, capped) <= calibration.MAX_NOT_SURE + 0.01


def test_a_review_detector_that_flags_much_of_the_dataset_is_named_in_a_note_not_listed():
    """The digits example's 8 x 8 scans were all "blurred": 2,155 issues for 1,797 images hid its label issues."""
    from finetune_core.review import WIDESPREAD_SHARE, Issue, unless_widespread

    def blurred(n):
        return [Issue("blurry", f"/d/train/a/{k}.png", "train", "a") for k in range(n)]

    notes: list[str] = []
    few = int(WIDESPREAD_SHARE * 100)
    assert len(unless_widespread(blurred(few), 100, "Blurred", notes)) == few and notes == []
    assert unless_widespread(blurred(few + 1), 100, "Blurred", notes) == []
    assert notes == [f"Blurred: {few + 1} of 100 images ({few + 1}%) would be flagged, which describes this "
                     "dataset's images as a whole rather than a few bad ones; not listed"]


def test_a_folder_to_classify_that_is_missing_says_so_and_a_file_is_not_a_folder(tmp_path):
    """A first user typed a folder that was not there and read "not a folder"."""


    from finetune_core.predict import PredictError, image_files

    with pytest.raises(PredictError, match="nosuchdir: does not exist"):
        image_files(tmp_path / "nosuchdir")
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(PredictError, match="a.jpg: not a folder"):
        image_files(tmp_path / "a.jpg")


def test_the_threshold_never_cuts_between_equally_confident_images():
    """Ten right at 0.9, ten at 0.6 of which five wrong: 0.6 answers all ten at 0.6 (25% errors), so
    the limit of 20% leaves 0.9 (a saturated softmax gives such ties)."""
    probs = torch.tensor([[0.9, 0.1]] * 10 + [[0.6, 0.4]] * 10)
    labels = torch.tensor([0] * 10 + [0] * 5 + [1] * 5)
    assert calibration.choose_threshold(probs, labels, max_error=0.2) == pytest.approx(0.9)


def test_a_widespread_detector_counts_images_not_issues():
    from finetune_core.review import Issue, unless_widespread

    twice = [Issue("near_duplicate", f"/d/{k % 5}.png", "train", "a") for k in range(20)]  # 5 images, 20 pairs
    notes: list[str] = []
    assert len(unless_widespread(twice, 100, "Near copies", notes)) == 20 and notes == []
