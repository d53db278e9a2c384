"""Confidence that means what it says: temperature scaling and the "not sure" threshold.

A network's softmax is usually over-confident after fine-tuning. Temperature scaling (Guo et al.
2017, "On Calibration of Modern Neural Networks") divides every logit by one scalar T > 0, fitted by
minimising the negative log-likelihood on held-out images: the argmax (the answer) never changes,
only how sure it claims to be. The expected calibration error (ECE) measures the gap: the images
are put in bins of confidence, and the gap between each bin's mean confidence and its accuracy is
averaged, weighted by the bin's share of the images.

Which held-out images: the validation split when the run holds one out (`val_fraction` > 0). Most
runs do not (the book's way and the `fast` preset evaluate on the test split every epoch), and
the training images are no use (the model has fitted them): those runs fit T on the test split,
the split they already choose their checkpoint on, by K-fold cross-validation, so the ECE "after"
that the run reports is measured on images that did not fit the T it was scored with. The T the
run keeps is fitted on the whole split.

"Not sure": below a confidence threshold the answer is "not sure" with the top guesses. The
threshold is chosen on the same held-out images as T (their calibrated confidences, out-of-fold
without a validation split) for a stated error rate among the images it does answer: the lowest
threshold at which at most `max_error` of the answered images are wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ECE_BINS = 15           # Guo et al.'s number of confidence bins
CV_FOLDS = 5            # folds of the cross-validated temperature, without a validation split
MAX_ERROR = 0.05        # the default "not sure" threshold keeps errors among answered images at most this
NOT_SURE = "not sure"   # the answer below the threshold
MIN_T, MAX_T = 0.05, 20.0
MIN_CALIBRATION_IMAGES = 50  # fewer held-out images fit a temperature and a threshold to noise (T = 20 on 2)
# The default threshold never answers "not sure" to more than this share of held-out images. It is the
# confidence rule's part of the 5% of in-class photos that the combined "not sure" may refuse
# (novelty.MAX_IN_CLASS_NOT_SURE); the rest, at least 2 points, is the distance rule's, which is what
# catches photos of none of the classes. With 0.2, a trashnet6 run (89% accurate) spent 11.8% of its
# own test photos on low confidence and left the distance rule nothing. A model that needs more
# refusals for 5% errors answers with the error rate it reaches, and says so (threshold_capped).
MAX_NOT_SURE = 0.03


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T that minimises the mean NLL of softmax(logits / T): LBFGS on log T (so T stays positive),
    from T = 1. 1.0 for fewer than two images or a fit that does not converge to a finite value."""
    if len(labels) < 2:
        return 1.0
    logits, labels = logits.detach().float().clone(), labels.detach().long().clone()  # not inference tensors
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    t = log_t.detach().exp().item()
    if not torch.isfinite(torch.tensor(t)):
        return 1.0
    return min(MAX_T, max(MIN_T, t))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return F.cross_entropy(logits.float() / temperature, labels).item()


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """The reliability diagram's bins that hold images: `lower`, `upper` (the bin's confidence range),
    `confidence` (mean top probability), `accuracy`, `count`."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    out = []
    for k in range(bins):
        inside = (conf > edges[k]) & (conf <= edges[k + 1]) if k else (conf >= 0) & (conf <= edges[1])
        n = int(inside.sum())
        if n:
            out.append({"lower": round(float(edges[k]), 4), "upper": round(float(edges[k + 1]), 4),
                        "confidence": float(conf[inside].mean()), "accuracy": float(correct[inside].mean()),
                        "count": n})
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Σ over bins of (share of images) x |accuracy - mean confidence| (Guo et al., eq. 3)."""
    total = len(labels)
    if not total:
        return 0.0
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in reliability(probs, labels, bins))


def folds_of(n: int, folds: int = CV_FOLDS) -> list[torch.Tensor]:
    """Indices of `folds` interleaved folds of n images (every k-th image: each fold spans the split,
    whatever its order, and the result does not depend on a random draw)."""
    folds = max(2, min(folds, n))
    return [torch.arange(k, n, folds) for k in range(folds)]


def cross_validated_probabilities(logits: torch.Tensor, labels: torch.Tensor, folds: int = CV_FOLDS
                                  ) -> torch.Tensor:
    """Each image's calibrated probabilities with a T fitted on the other folds."""
    probs = torch.empty_like(logits, dtype=torch.float32)
    for held_out in folds_of(len(labels), folds):
        rest = torch.ones(len(labels), dtype=torch.bool)
        rest[held_out] = False
        t = fit_temperature(logits[rest], labels[rest])
        probs[held_out] = torch.softmax(logits[held_out].float() / t, dim=1)
    return probs


def choose_threshold(probs: torch.Tensor, labels: torch.Tensor, max_error: float = MAX_ERROR) -> float:
    """The lowest confidence threshold at which at most `max_error` of the answered images (top
    probability >= threshold) are wrong: the most answers for that error rate, never cutting between
    images of equal confidence (the threshold answers all of them). 1.0 (answer only what it gives 1.0)
    when even the most confident images miss it; 0.0 with no images."""
    if not len(labels):
        return 0.0
    conf, pred = probs.max(1)
    order = conf.argsort(descending=True)
    wrong = (pred[order] != labels[order]).float().cumsum(0)
    answered = torch.arange(1, len(labels) + 1, dtype=torch.float32)
    sorted_conf = conf[order]
    # a threshold answers every image at its confidence: a cut only where the next image is less sure
    at_end_of_tie = torch.ones(len(labels), dtype=torch.bool)
    at_end_of_tie[:-1] = sorted_conf[:-1] > sorted_conf[1:]
    ok = ((wrong / answered <= max_error + 1e-12) & at_end_of_tie).nonzero()
    if not len(ok):
        return 1.0
    k = int(ok.max())  # answer the k + 1 most confident images
    return float(conf[order][k])


def answered_share(probs: torch.Tensor, threshold: float) -> float:
    return float((probs.max(1).values >= threshold).float().mean()) if len(probs) else 0.0


def error_among_answered(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> float | None:
    conf, pred = probs.max(1)
    answered = conf >= threshold
    if not answered.any():
        return None
    return float((pred[answered] != labels[answered]).float().mean())


@dataclass
class Calibration:
    """What a run records about its confidences (status.json's `temperature` and `calibration`)."""
    temperature: float
    method: str                # how T was fitted, in words
    fitted_on: str             # "val" or "test"
    images: int                # how many images fitted it
    nll_before: float          # on the images that fitted it
    nll_after: float
    ece_before: float          # on the test split, uncalibrated
    ece_after: float           # on the test split, calibrated (out-of-fold when fitted on it)
    threshold: float           # the default "not sure" threshold
    max_error: float
    test_not_sure: float       # the share of test images answered "not sure" at the threshold
    test_error_answered: float | None  # the error rate among the test images answered
    bins_before: list[dict]
    bins_after: list[dict]
    threshold_capped: bool = False  # the threshold for max_error would refuse over MAX_NOT_SURE: lowered (capped_threshold)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def capped_threshold(probs: torch.Tensor, labels: torch.Tensor, max_error: float = MAX_ERROR,
                     max_not_sure: float = MAX_NOT_SURE) -> float:
    """choose_threshold's, lowered where it would answer "not sure" to more than `max_not_sure` of
    these images: a weak model (84% accurate) needs 0.92 for 5% errors and refused 65% of its test
    photos and a 91% answer, which a first user read as broken; and the distance rule needs its part
    of the in-class budget (MAX_NOT_SURE). The page's slider goes stricter."""
    threshold = choose_threshold(probs, labels, max_error)
    if not len(labels):
        return threshold
    conf = probs.max(1).values.sort().values
    most_refusing = float(conf[min(len(conf) - 1, int(max_not_sure * len(conf)))])
    return min(threshold, most_refusing)


def calibrate(test_logits: torch.Tensor, test_labels: torch.Tensor, val_logits: torch.Tensor | None = None,
              val_labels: torch.Tensor | None = None, max_error: float = MAX_ERROR) -> Calibration:
    """Fit T (on the validation split when given, else cross-validated on the test split), choose
    the "not sure" threshold on the same images (capped_threshold), and measure both on the test
    split. With fewer than MIN_CALIBRATION_IMAGES held-out images, or a T that does not lower the
    held-out calibration error, the run keeps T = 1 and says why (`method`); with too few, no
    threshold either."""
    test_logits = test_logits.float()
    before = torch.softmax(test_logits, dim=1)
    held_out_images = len(val_labels) if val_logits is not None and len(val_labels) else len(test_labels)
    if held_out_images < MIN_CALIBRATION_IMAGES:
        return Calibration(
            temperature=1.0, method=f"not calibrated: {held_out_images} held-out images, too few to fit a "
                                    f"temperature or a \"not sure\" threshold (at least {MIN_CALIBRATION_IMAGES})",
            fitted_on="", images=held_out_images, nll_before=nll(test_logits, test_labels),
            nll_after=nll(test_logits, test_labels), ece_before=expected_calibration_error(before, test_labels),
            ece_after=expected_calibration_error(before, test_labels), threshold=0.0, max_error=max_error,
            test_not_sure=0.0, test_error_answered=error_among_answered(before, test_labels, 0.0),
            bins_before=reliability(before, test_labels), bins_after=reliability(before, test_labels))
    if val_logits is not None and len(val_labels):
        t = fit_temperature(val_logits, val_labels)
        fit_logits, fit_labels = val_logits.float(), val_labels
        held_out = torch.softmax(fit_logits / t, dim=1)
        after = torch.softmax(test_logits / t, dim=1)
        method, fitted_on = f"fitted on the validation split ({len(val_labels)} images)", "val"
    else:
        t = fit_temperature(test_logits, test_labels)
        fit_logits, fit_labels = test_logits, test_labels
        after = held_out = cross_validated_probabilities(test_logits, test_labels)
        method = (f"{len(folds_of(len(test_labels)))}-fold cross-validation on the test split "
                  f"({len(test_labels)} images; no validation split): the ECE after is out-of-fold")
        fitted_on = "test"
    fit_before = torch.softmax(fit_logits, dim=1)
    if expected_calibration_error(held_out, fit_labels) >= expected_calibration_error(fit_before, fit_labels):
        t, method = 1.0, method + "; the temperature did not lower the held-out calibration error: kept 1"
        held_out, after = fit_before, before
    threshold = capped_threshold(held_out, fit_labels, max_error)
    capped = threshold < choose_threshold(held_out, fit_labels, max_error)
    return Calibration(
        temperature=t, method=method, fitted_on=fitted_on, images=len(fit_labels),
        nll_before=nll(fit_logits, fit_labels), nll_after=nll(fit_logits, fit_labels, t),
        ece_before=expected_calibration_error(before, test_labels),
        ece_after=expected_calibration_error(after, test_labels),
        threshold=threshold, max_error=max_error,
        test_not_sure=1.0 - answered_share(after, threshold),
        test_error_answered=error_among_answered(after, test_labels, threshold),
        bins_before=reliability(before, test_labels), bins_after=reliability(after, test_labels),
        threshold_capped=capped)
