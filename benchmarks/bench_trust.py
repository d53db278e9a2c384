"""Issue 24's figures for finished runs: calibration, "not sure" on out-of-class photos, a whole
folder's speed, heatmaps' speed.

    python benchmarks/bench_trust.py --run RUNS/seefood-run --in-class ../shared/datasets/seefood/test \
        --out-of-class ../shared/datasets/hymenoptera --folder ../shared/datasets/seefood \
        [--heatmaps OUT_DIR --heatmap-images 20]

- Calibration: the run's status.json (ECE on the test split before and after its temperature).
- "Not sure": the shares of in-class test photos and out-of-class photos answered "not sure" by the
  Predictor at the run's defaults (low confidence OR unlike the training photos: novelty.py), and
  the share the confidence threshold alone gives; for comparison, three
  out-of-distribution scores at the threshold that flags 5% of the in-class test photos: the top
  calibrated probability, the largest logit, and the energy (logsumexp of the logits, Liu et al. 2020).
- Folder: `Predictor.predict_folder` over every image of --folder (the CLI's path), wall and CPU time.
- Heatmaps: `Heatmapper.overlays` one image at a time (the Predict page's path), seconds per image,
  written to --heatmaps for a look by eye.
Prints a Markdown report; the machine's load average before and after.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune_core.data import load_rgb  # noqa: E402
from finetune_core.predict import Predictor, image_files  # noqa: E402

FLAG_IN_CLASS = 0.05  # the OOD scores are compared at the threshold that flags this share of in-class photos


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def folder_logits(predictor: Predictor, folder: Path, batch: int = 32, every: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the head's input features averaged over the classified views) of every `every`-th image."""
    files = image_files(folder)[::every]
    logits, features = [], []
    for start in range(0, len(files), batch):
        views = torch.stack([predictor.preprocess(load_rgb(f)) for f in files[start:start + batch]])
        f, x = predictor.features_and_logits(views)
        logits.append(x)
        features.append(f)
    return torch.cat(logits), torch.cat(features)


def knn_score(train_features: torch.Tensor, features: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Minus the distance to the k-th nearest training image in normalised feature space (Sun et al.
    2022): higher = more in-class."""
    a = torch.nn.functional.normalize(train_features, dim=1)
    b = torch.nn.functional.normalize(features, dim=1)
    return -torch.cdist(b, a).topk(k, dim=1, largest=False).values[:, -1]


def scores(logits: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Higher = more in-class."""
    return {"top calibrated probability": torch.softmax(logits / temperature, 1).max(1).values,
            "largest logit": logits.max(1).values,
            "energy (logsumexp)": torch.logsumexp(logits, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--in-class", required=True, help="the run's test folder")
    ap.add_argument("--out-of-class", required=True, help="photos of none of the run's classes")
    ap.add_argument("--compare-scores", action="store_true",
                    help="also compare out-of-distribution scores, each at the threshold flagging 5%% of in-class photos")
    ap.add_argument("--train", help="with --compare-scores: the run's training folder, for a kNN distance score")
    ap.add_argument("--folder", help="a folder to classify whole, timed")
    ap.add_argument("--heatmaps", help="write heatmaps of the in-class test photos here")
    ap.add_argument("--heatmap-images", type=int, default=20)
    ap.add_argument("--every", type=int, default=1, help="only every N-th image of the in-class, out-of-class "
                                                          "and training folders (a quicker estimate)")
    args = ap.parse_args()
    print(f"load average before: {load_avg()}\n")
    predictor = Predictor.from_run(args.run)
    status = json.loads((Path(args.run) / "status.json").read_text())
    record = status.get("calibration", {})
    print(f"## {Path(args.run).name} ({predictor.backbone}, {predictor.image_size} px)\n")
    print(f"- test acc {status.get('test_acc'):.3f}; temperature {predictor.temperature:.3f} ({record.get('method')})")
    print(f"- ECE on the test split: {record.get('ece_before'):.4f} before, {record.get('ece_after'):.4f} after "
          f"(ratio {record.get('ece_after') / max(1e-9, record.get('ece_before')):.2f})")
    print(f"- default threshold {predictor.threshold:.3f}: {record.get('test_not_sure'):.1%} of test photos "
          f"'not sure', {record.get('test_error_answered') or 0:.1%} errors among those answered\n")

    print(f"Rule in force: {predictor.not_sure_rule}\n")
    print("| photos | images | \"not sure\" at the run's default (both rules) | of which unlike the training photos | "
          "low confidence alone would give |")
    print("|---|---|---|---|---|")
    for label, folder in (("in-class test", args.in_class), ("out-of-class", args.out_of_class)):
        files = image_files(folder)[::args.every]
        results = [r for r in predictor.predict_many((str(f), f.read_bytes) for f in files) if not r.error]
        print(f"| {label} ({folder}) | {len(results)} | **{sum(r.not_sure for r in results) / len(results):.1%}** | "
              f"{sum(r.unlike for r in results) / len(results):.1%} | "
              f"{sum(r.low_confidence for r in results) / len(results):.1%} |")
    print()
    if args.compare_scores:
        compare_scores(predictor, args)
    folder_and_heatmaps(predictor, args)
    print(f"load average after: {load_avg()}")


def compare_scores(predictor: Predictor, args) -> None:
    inside, inside_features = folder_logits(predictor, Path(args.in_class), every=args.every)
    outside, outside_features = folder_logits(predictor, Path(args.out_of_class), every=args.every)
    at_default = (torch.softmax(outside / predictor.temperature, 1).max(1).values < predictor.threshold).float().mean()
    print(f"Out-of-class photos ({len(outside)} from {args.out_of_class}) answered 'not sure' at the default "
          f"threshold: **{float(at_default):.1%}**\n")
    print(f"| score | threshold flagging {FLAG_IN_CLASS:.0%} of in-class test photos | out-of-class flagged |")
    print("|---|---|---|")
    ins, outs = scores(inside, predictor.temperature), scores(outside, predictor.temperature)
    if args.train:
        train_features = folder_logits(predictor, Path(args.train), every=args.every)[1]
        name = f"kNN distance in feature space (k=10, {len(train_features)} training images)"
        ins[name], outs[name] = knn_score(train_features, inside_features), knn_score(train_features, outside_features)
    for name in ins:
        threshold = torch.quantile(ins[name], FLAG_IN_CLASS).item()
        flagged = (outs[name] < threshold).float().mean().item()
        print(f"| {name} | {threshold:.3f} | {flagged:.1%} |")
    print()


def folder_and_heatmaps(predictor: Predictor, args) -> None:
    if args.folder:
        files = image_files(args.folder)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        results = predictor.predict_folder(args.folder)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        print(f"Folder: {len(files)} images of {args.folder} in **{wall:.1f} s** wall, {cpu:.1f} s CPU "
              f"({len(files) / wall:.1f} images/s; {torch.get_num_threads()} threads); "
              f"{sum(bool(r.error) for r in results)} unreadable\n")

    if args.heatmaps:
        from finetune_core.heatmaps import Heatmapper

        mapper = Heatmapper(predictor)
        out = Path(args.heatmaps)
        out.mkdir(parents=True, exist_ok=True)
        files = image_files(args.in_class)
        step = max(1, len(files) // args.heatmap_images)
        chosen = files[::step][:args.heatmap_images]
        mapper.overlays([load_rgb(chosen[0])])  # the first call builds the hooks' machinery
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        for k, f in enumerate(chosen):
            (image,), (c,) = mapper.overlays([load_rgb(f)])
            image.save(out / f"{k:02d}_{f.parent.name}_{f.stem}_why_{predictor.classes[c]}.png")
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        print(f"Heatmaps (layer `{mapper.layer_name}`): {len(chosen)} images one at a time, "
              f"**{wall / len(chosen):.2f} s** wall and {cpu / len(chosen):.2f} s CPU per image -> {out}\n")


if __name__ == "__main__":
    main()
