"""How well the data review finds planted problems in a real dataset, and how long it takes.

A copy of the dataset (the original is never touched) gets known problems:
- 5% of the training images moved to another class folder at random (label flips);
- 20 training images copied byte for byte into the test split, 20 more as near copies (resized to
  60%, JPEG quality 70, 5% cropped off each side) into the test split (leaks);
- 10 training images darkened in place (x -> 0.35 x^2.2) and 10 blurred in place (Gaussian blur,
  radius 1% of the long side).
One `review_dataset` run (cold: a fresh decode cache) gives the copy and quality detectors'
recall and precision, and the time. Its out-of-fold label ranking is then recomputed from the
same features for other label sets: the flips to each class's most confused class instead, and
the unflipped labels (how many images are flagged on a clean set); and compared with ranking by
the training loss of a head fitted on all images (what fastai's cleaner does).

    nice -n 10 python benchmarks/bench_review.py --dataset trashnet6 --out benchmarks/results/bench_review.md

`--loop` measures whether the review pays, as a user would go, paired over several training seeds:
per seed a fast-preset run on the dataset as it is and on a copy with 5% of its training labels
flipped at random (the same flips for every seed; their test split untouched); one review of the
flipped copy (which reads a finished run's cached activations when there is one) whose suggestions
"Accept all suggested" records (review.suggested_fixes); and per seed a run on the fixed copy.
The stages may overlap (one file per result under --work):

    nice -n 19 python benchmarks/bench_review.py --loop --work W --seeds 0,1,2 --jobs 6 --stage before \
        --train-args "--backbone efficientnet_lite0 --image-size 224 --epochs 7 --feature-views 1" &
    nice -n 19 python benchmarks/bench_review.py --loop --work W --seeds 0,1,2 --jobs 3 --stage after
    python benchmarks/bench_review.py --loop --work W --stage report --out benchmarks/results/bench_review_loop.md
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASETS = ROOT.parent / "shared" / "datasets"


def plant(src: Path, dst: Path, seed: int) -> dict:
    """Copy `src` to `dst` and plant the problems; returns what was planted (paths in dst)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("MANIFEST*"))
    rng = random.Random(seed)
    train = sorted(p for p in (dst / "train").glob("*/*") if p.is_file())
    rng.shuffle(train)
    n_flip = round(0.05 * len(train))
    flips, rest = train[:n_flip], train[n_flip:]
    exact_src, near_src, dark, blur = rest[:20], rest[20:40], rest[40:50], rest[50:60]
    planted = {"flips": {}, "exact": {}, "near": {}, "dark": [], "blurry": [], "true": {}}
    for p in exact_src + near_src:
        suffix = "exact" if p in exact_src else "near"
        dest = dst / "test" / p.parent.name / f"planted-{suffix}-{p.name}"
        if suffix == "exact":
            shutil.copy2(p, dest)
        else:
            img = Image.open(p).convert("RGB")
            w, h = img.size
            img = img.crop((round(0.05 * w), round(0.05 * h), round(0.95 * w), round(0.95 * h)))
            img = img.resize((round(img.width * 0.6), round(img.height * 0.6)), Image.BICUBIC)
            img.save(dest.with_suffix(".jpg"), quality=70)
            dest = dest.with_suffix(".jpg")
        planted[suffix][str(dest)] = str(p)
    for p in dark:
        arr = np.asarray(Image.open(p).convert("RGB")) / 255.0
        Image.fromarray((255 * 0.35 * arr ** 2.2).astype(np.uint8)).save(p, quality=95)
        planted["dark"].append(str(p))
    for p in blur:
        img = Image.open(p).convert("RGB")
        img.filter(ImageFilter.GaussianBlur(max(img.size) / 100)).save(p, quality=95)
        planted["blurry"].append(str(p))
    planted["flips"] = flip(dst, flips, rng)
    return planted


def flip(dst: Path, images: list[Path], rng: random.Random) -> dict:
    """Move each of `images` (in dst/train/<class>/) to another class folder chosen at random:
    {new path: the true class}."""
    classes = sorted(p.name for p in (dst / "train").iterdir())
    flips = {}
    for p in images:
        to = rng.choice([c for c in classes if c != p.parent.name])
        dest = dst / "train" / to / p.name
        p.rename(dest)
        flips[str(dest)] = p.parent.name
    return flips


def plant_flips(src: Path, dst: Path, seed: int, share: float = 0.05) -> dict:
    """Copy `src` to `dst` and flip `share` of its training labels at random (nothing else):
    {new path: the true class}."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("MANIFEST*"))
    rng = random.Random(seed)
    train = sorted(p for p in (dst / "train").glob("*/*") if p.is_file())
    rng.shuffle(train)
    return flip(dst, train[:round(share * len(train))], rng)


# --------------------------------------------------------------------------------------------
# The loop: train, review, accept the suggestions, train again


def train_fast(data: Path, runs_dir: Path, name: str, seed: int, overrides: tuple[str, ...] = ()) -> dict:
    """One fast-preset run through the command line, as a fresh process: its test accuracy, run
    folder, wall and CPU time (user + sys of the process and its children, by /usr/bin/time, so that
    several runs can go at once) and the load average around it."""
    import subprocess

    load = Path("/proc/loadavg").read_text().split()[0]
    times = runs_dir / f"{name}.time"
    runs_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%U %S", "-o", str(times),
                          sys.executable, "-m", "finetune_core", "train", "--preset", "fast", "--data", str(data),
                          "--runs-dir", str(runs_dir), "--seed", str(seed), "--name", name, "--json", "--quiet",
                          *overrides],
                         cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"training {name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    run = sorted((p for p in runs_dir.iterdir() if (p / "status.json").is_file() and p.name.endswith(name)),
                 key=lambda p: p.stat().st_mtime)[-1]
    status = json.loads((run / "status.json").read_text())
    predictions = __import__("pandas").read_csv(run / "predictions.csv")
    user, sys_ = (float(v) for v in times.read_text().split()[-2:])
    return {"run": run.name, "test_acc": status["test_acc"], "test_images": len(predictions), "wall_s": round(wall),
            "cpu_s": round(user + sys_), "load": f"{load}-{Path('/proc/loadavg').read_text().split()[0]}"}


def review_and_accept(data: Path, runs_dir: Path, flips: dict | None) -> dict:
    """Review `data` after its run (the run's cached activations give the features), record what
    "Accept all suggested" records, and say what it did; with planted `flips`, how many of them
    the fixes corrected, excluded or left, and how many right labels they changed."""
    import resource

    from finetune_core.fixes import add_fixes, fixes_path, load_fixes
    from finetune_core.review import review_dataset, suggested_fixes

    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    result = review_dataset(data, runs_dir=runs_dir)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    fixes = suggested_fixes(result, load_fixes(fixes_path(data)))
    add_fixes(data, fixes)
    out = {"review_wall_s": round(time.perf_counter() - t0), "review_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime
                                                                                   - cpu0.ru_utime - cpu0.ru_stime),
           "features_from": result.method.get("features_from"), "issues": result.counts(),
           "accepted": {a: sum(f.action == a for f in fixes) for a in ("relabel", "exclude", "drop_leak")},
           "accepted_by_kind": {k: sum(f.kind == k for f in fixes) for k in sorted({f.kind for f in fixes})}}
    if flips is not None:
        true = {str(Path(p).relative_to(data)): c for p, c in flips.items()}
        by_path = {f.path: f for f in fixes}
        out["flips"] = {
            "planted": len(true),
            "relabelled to the true class": sum(by_path[p].action == "relabel" and by_path[p].to == c
                                                for p, c in true.items() if p in by_path),
            "relabelled to a wrong class": sum(by_path[p].action == "relabel" and by_path[p].to != c
                                               for p, c in true.items() if p in by_path),
            "excluded": sum(by_path[p].action == "exclude" for p in true if p in by_path),
            "left as flipped": sum(p not in by_path for p in true),
            "right labels relabelled": sum(f.action == "relabel" for p, f in by_path.items() if p not in true),
            "right labels excluded": sum(f.action == "exclude" for p, f in by_path.items() if p not in true)}
    return out


def loop(args) -> None:
    """Paired runs over several training seeds: per seed, the dataset as shipped, the flipped copy
    (the same planted flips for every seed), and the flipped copy after one review whose suggestions
    are all accepted. `--stage before` trains the first two for every seed, `--stage after` reviews
    and trains the third (so that the "before" runs can start while the fixes' rule is decided);
    `--work` keeps the copies, the runs and the results between stages."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TUNEBOARD_CACHE"] = str(work / "cache")  # cold at first, shared by the runs and the reviews
    runs_dir = work / "runs"
    clean, flipped = work / args.dataset, work / f"{args.dataset}-flipped"
    state, done = work / "loop.json", work / "results"  # one file per run and for the review: stages may overlap
    done.mkdir(exist_ok=True)
    if not clean.is_dir():
        shutil.copytree(DATASETS / args.dataset, clean, ignore=shutil.ignore_patterns("MANIFEST*"))
        flips = plant_flips(DATASETS / args.dataset, flipped, args.seed)
        state.write_text(json.dumps({"dataset": args.dataset, "flip_seed": args.seed, "flipped": len(flips),
                                     "work": str(work), "overrides": args.train_args,
                                     "flips": {str(Path(p).relative_to(flipped)): c for p, c in flips.items()}},
                                    indent=1))
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = tuple(json.loads(state.read_text())["overrides"].split())

    def results() -> dict:
        out = json.loads(state.read_text())
        out["runs"] = {f.stem.replace("-", " "): json.loads(f.read_text()) for f in sorted(done.glob("*.json"))
                       if f.stem != "review"}
        if (done / "review.json").is_file():
            out["review"] = json.loads((done / "review.json").read_text())
        if args.out:
            Path(args.out).with_suffix(".json").write_text(json.dumps(out, indent=1))
        return out

    def train(key: str, data: Path, seed: int) -> None:
        file = done / f"{key.replace(' ', '-')}.json"
        if file.is_file():
            return
        value = train_fast(data, runs_dir, key.replace(" ", "-"), seed, overrides)
        file.write_text(json.dumps(value, indent=1))
        print(key, json.dumps(value), flush=True)

    todo = []
    if args.stage in ("before", "all"):
        todo += [(f"clean {s}", clean, s) for s in seeds] + [(f"flipped {s}", flipped, s) for s in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda t: train(*t), todo))
    if args.stage in ("after", "all"):
        if not (done / "review.json").is_file():
            flips = {str(flipped / p): c for p, c in json.loads(state.read_text())["flips"].items()}
            review = review_and_accept(flipped, runs_dir, flips)
            (done / "review.json").write_text(json.dumps(review, indent=1))
            print("review", json.dumps(review), flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda t: train(*t), [(f"after {s}", flipped, s) for s in seeds]))
    text = "\n".join(loop_report(results()))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def loop_report(r: dict) -> list[str]:
    runs = r["runs"]
    seeds = sorted({int(k.split()[1]) for k in runs})
    lines = [f"# bench_review --loop: {r['dataset']}, the fast preset {r.get('overrides', '')}, "
             f"{r['flipped']} training labels flipped at random (flip seed {r['flip_seed']}), training seeds "
             + ", ".join(map(str, seeds)), "",
             "| seed | as shipped | 5% flipped | flipped, after review | flips cost | recovered | share |",
             "|---|---|---|---|---|---|---|"]
    costs, regained = [], []
    for s in seeds:
        acc = {k: runs[f"{k} {s}"]["test_acc"] for k in ("clean", "flipped", "after") if f"{k} {s}" in runs}
        cells = [f"{acc[k]:.4f}" if k in acc else "-" for k in ("clean", "flipped", "after")]
        cost = acc["clean"] - acc["flipped"] if {"clean", "flipped"} <= acc.keys() else None
        back = acc["after"] - acc["flipped"] if {"after", "flipped"} <= acc.keys() else None
        if cost is not None and back is not None:
            costs.append(cost)
            regained.append(back)
        lines.append(f"| {s} | " + " | ".join(cells) + " | " + (f"{cost:+.4f}" if cost is not None else "-") + " | "
                     + (f"{back:+.4f}" if back is not None else "-") + " | "
                     + (f"{back / cost:.0%}" if cost and back is not None else "-") + " |")
    if costs:
        cost, back = float(np.mean(costs)), float(np.mean(regained))
        lines.append(f"| mean of {len(costs)} | | | | {cost:+.4f} | {back:+.4f} | "
                     + (f"{back / cost:.0%}" if cost > 0 else "-") + " |")
    lines += ["", "| run | test acc | test images | wall s | CPU s (user + sys) | load |", "|---|---|---|---|---|---|"]
    for key, v in sorted(runs.items()):
        lines.append(f"| {key} | {v['test_acc']:.4f} | {v['test_images']} | {v['wall_s']} | {v['cpu_s']} | "
                     f"{v['load']} |")
    if "review" in r:
        v = r["review"]
        lines += ["", f"review of the flipped copy: {v['review_wall_s']} s wall, {v['review_cpu_s']} s CPU, features: "
                      f"{v['features_from']}; issues {json.dumps({k: n for k, n in v['issues'].items() if n})}; "
                      f"accepted {json.dumps(v['accepted'])}, by kind {json.dumps(v['accepted_by_kind'])}"]
        if "flips" in v:
            lines.append("planted flips: " + ", ".join(f"{k} {n}" for k, n in v["flips"].items()))
    return lines


def ranking_scores(labels: np.ndarray, probs: np.ndarray) -> dict:
    from finetune_core.review import label_issues

    score, flagged = label_issues(labels, probs)
    return {"score": score, "flagged": flagged}


def label_metrics(score: np.ndarray, flagged: np.ndarray | None, is_flip: np.ndarray) -> dict:
    order = np.argsort(-score)
    n, k = len(score), int(is_flip.sum())
    top10 = set(order[: max(1, n // 10)].tolist())
    out = {"flipped": k, "recall_top10": float(np.mean([i in top10 for i in np.flatnonzero(is_flip)])) if k else 0.0,
           "precision_at_k": float(is_flip[order[:k]].mean()) if k else 0.0}
    if flagged is not None:
        out["flagged"] = int(flagged.sum())
        out["flagged_share"] = float(flagged.mean())
        out["flag_precision"] = float(is_flip[flagged].mean()) if flagged.any() else 0.0
        out["flag_recall"] = float(flagged[is_flip].mean()) if k else 0.0
    return out


def training_loss_scores(features: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """The baseline: the loss of each image under a head fitted on all images (in sample)."""
    from finetune_core.review import _head, _probabilities

    probs = _probabilities(_head(len(labels)).fit(features, labels), features, n_classes)
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))


def label_rows(features: np.ndarray, labels: np.ndarray, true: np.ndarray, n_classes: int, folds: int,
               seed: int) -> tuple[list, float]:
    """The label table: random flips (as planted), flips to the most confused class, no flips;
    the review's ranking and flags against the training-loss baseline. And the time of one
    out-of-fold pass."""
    from finetune_core.review import out_of_fold_probabilities

    rows = []
    t0 = time.perf_counter()
    probs = out_of_fold_probabilities(features, labels, n_classes, folds)
    seconds = time.perf_counter() - t0
    clean_probs = out_of_fold_probabilities(features, true, n_classes, folds)
    confusion = np.zeros((n_classes, n_classes))
    for t, p in zip(true, clean_probs.argmax(1)):
        confusion[t, p] += 1
    np.fill_diagonal(confusion, -1)
    most_confused = confusion.argmax(1)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(true), int((labels != true).sum()), replace=False)
    confused = true.copy()
    confused[chosen] = most_confused[true[chosen]]
    confused_probs = out_of_fold_probabilities(features, confused, n_classes, folds)
    for name, given, p in (("random flips 5%", labels, probs), ("flips to the most confused class 5%", confused,
                                                                 confused_probs)):
        review = ranking_scores(given, p)
        rows.append((name, "review (out of fold, cleanlab)", label_metrics(review["score"], review["flagged"],
                                                                          given != true)))
        rows.append((name, "training loss (in sample)",
                     label_metrics(training_loss_scores(features, given, n_classes), None, given != true)))
    clean = ranking_scores(true, clean_probs)
    rows.append(("no flips", "review (out of fold, cleanlab)",
                 label_metrics(clean["score"], clean["flagged"], np.zeros(len(true), dtype=bool))))
    return rows, seconds


def label_table(rows: list) -> list[str]:
    lines = ["| flips | ranking | flipped | in top 10% | precision at k=flipped | flagged | flagged share | "
             "flag precision | flag recall |", "|---|---|---|---|---|---|---|---|---|"]
    for flips, method, m in rows:
        lines.append(f"| {flips} | {method} | {m['flipped']} | {m['recall_top10']:.2f} | {m['precision_at_k']:.2f} | "
                     f"{m.get('flagged', '-')} | "
                     + (f"{m['flagged_share']:.3f}" if "flagged_share" in m else "-") + " | "
                     + (f"{m['flag_precision']:.2f}" if "flag_precision" in m else "-") + " | "
                     + (f"{m['flag_recall']:.2f}" if "flag_recall" in m else "-") + " |")
    return lines


def judged_lines(others: list[str], root: str, dataset: str, n_others: int) -> list[str]:
    """The other images flagged as copies, split by a person's judgement of each pair
    (benchmarks/<dataset>_copies_judged.txt: the same object photographed twice, or two different ones)."""
    file = Path(__file__).with_name(f"{dataset}_copies_judged.txt")
    if not file.is_file():
        return []
    verdict = {}
    for line in file.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            word, pair = line.split(maxsplit=1)
            verdict[pair.split(" ~ ")[0].strip()] = word
    found = [verdict.get(p.replace(root, ""), "not judged") for p in others]
    return [f"  - judged by eye ({file.name}): {found.count('copy')} the same object photographed twice, "
            f"{found.count('different')} different objects ({found.count('different') / n_others:.2%} of the "
            f"other images), {found.count('not judged')} not judged"]


def copies_from_dump(dump: str, dataset: str, seed: int) -> list[str]:
    """The near-copy detector again on a --dump file's features, without the backbone: the dataset is
    planted again (the same seed plants the same copies), the centre views hashed, and near_copies run
    on both; what it finds of the planted near copies and how many other images it flags."""
    import torch

    from finetune_core.prepare import decode_test
    from finetune_core.review import near_copies, perceptual_hashes

    z = np.load(dump)
    old_root = str(Path(str(z["train_paths"][0])).parents[2])
    with tempfile.TemporaryDirectory(prefix="bench-review-") as tmp:
        data = Path(tmp) / dataset
        planted = plant(DATASETS / dataset, data, seed)
        paths = [str(p).replace(old_root, str(data)) for p in list(z["train_paths"]) + list(z["test_paths"])]
        hashes = []
        for start in range(0, len(paths), 64):
            views = np.stack([decode_test(p, int(z["image_size"]) if "image_size" in z else 224)
                              for p in paths[start:start + 64]])
            hashes.append(perceptual_hashes(torch.from_numpy(views)))
        pairs = near_copies(tuple(np.concatenate([h[k] for h in hashes]) for k in range(3)),
                            np.concatenate([z["train"], z["test"]]))
        flagged = {paths[i]: paths[j] for i, j, _ in pairs}
        found = sum(flagged.get(p) == src for p, src in planted["near"].items())
        others = [p for p in flagged if p not in planted["near"] and p not in planted["exact"]]
        n_others = len(paths) - len(planted["near"])
        return ([f"Near copies from {dump} (features of the dump, pHashes computed again):", "",
                 f"- near copies (60%, JPEG 70, 5% crop) in test found: {found}/{len(planted['near'])}",
                 f"- other images flagged as copies: {len(others)} of {n_others} ({len(others) / n_others:.2%})"]
                + judged_lines(others, str(data) + "/", dataset, n_others)
                + [f"  - {p.replace(str(data) + '/', '')} ~ {flagged[p].replace(str(data) + '/', '')}" for p in others])


def true_labels(paths: list[str], planted: dict, classes: list[str]) -> np.ndarray:
    return np.array([classes.index(planted["flips"].get(p, Path(p).parent.name)) for p in paths])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="trashnet6")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--dump", default="", help="also save the features, labels and planted problems (.npz), "
                        "to tune thresholds without running the backbone again")
    parser.add_argument("--features", default="", help="a --dump file: only the label table, from its features")
    parser.add_argument("--loop", action="store_true", help="train, review, accept the suggestions, train again "
                        "(the fast preset), on the dataset and on a copy with 5%% of its labels flipped")
    parser.add_argument("--train-args", default="", help="--loop: settings added to each fast-preset run, e.g. "
                        "'--epochs 7 --feature-views 2' on a loaded machine")
    parser.add_argument("--copies-from", default="", help="a --dump file: only the near-copy detector, from its "
                        "features and the pHashes of the planted dataset made again")
    parser.add_argument("--seeds", default="0,1,2", help="--loop: the training seeds (--seed plants the flips)")
    parser.add_argument("--jobs", type=int, default=1, help="--loop: fast-preset runs at once")
    parser.add_argument("--stage", default="all", choices=("before", "after", "all", "report"),
                        help="--loop: 'before' trains as shipped and flipped, 'after' reviews and trains again "
                        "(the two may run at once), 'report' writes the tables of what has finished")
    parser.add_argument("--work", default="", help="--loop: the folder kept between stages (copies, runs, state)")
    parser.add_argument("--loop-report", default="", help="the --loop table again from its .json (also a loop "
                        "that has not finished)")
    args = parser.parse_args()
    if args.loop_report:
        text = "\n".join(loop_report(json.loads(Path(args.loop_report).read_text())))
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return
    if args.loop:
        loop(args)
        return

    if args.copies_from:
        text = "\n".join(copies_from_dump(args.copies_from, args.dataset, args.seed))
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return
    if args.features:
        z = np.load(args.features)
        classes, planted = list(z["classes"]), json.loads(str(z["planted"]))
        true = true_labels(list(z["train_paths"]), planted, classes)
        rows, seconds = label_rows(z["train"], z["train_labels"], true, len(classes), args.folds, args.seed)
        text = "\n".join([f"Label issues from {args.features}; one out-of-fold pass {seconds:.1f} s", ""]
                         + label_table(rows))
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return

    from finetune_core.review import review_dataset

    with tempfile.TemporaryDirectory(prefix="bench-review-") as tmp:
        data = Path(tmp) / args.dataset
        planted = plant(DATASETS / args.dataset, data, args.seed)
        features: dict = {}
        t0 = time.perf_counter()
        result = review_dataset(data, folds=args.folds, cache_dir=str(Path(tmp) / "cache"), features_out=features,
                                kept=set())
        seconds = time.perf_counter() - t0
        classes = result.classes
        if args.dump:
            np.savez(args.dump, train=features["train"], test=features["test"], train_labels=features["train_labels"],
                     test_labels=features["test_labels"], train_paths=np.array(features["train_paths"]),
                     test_paths=np.array(features["test_paths"]), planted=json.dumps(planted),
                     classes=np.array(classes))
        true = true_labels(features["train_paths"], planted, classes)
        rows, label_seconds = label_rows(features["train"], features["train_labels"], true, len(classes), args.folds,
                                         args.seed)

        # copies and leaks
        n_images = result.images["train"] + result.images["test"] + len(planted["exact"])
        copy_found = {i.path: i for i in result.issues if i.kind in ("leak", "near_duplicate", "exact_duplicate")}
        exact_found = sum(1 for p in planted["exact"] if p in copy_found and copy_found[p].kind == "leak")
        near_found = sum(1 for p in planted["near"] if p in copy_found and copy_found[p].kind == "leak")
        planted_copies = set(planted["exact"]) | set(planted["near"])
        others = [p for p in copy_found if p not in planted_copies]
        quality = {}
        normal = n_images - 20 - 20 - 20
        for kind in ("dark", "blurry"):
            found = {i.path for i in result.issues if i.kind == kind}
            quality[kind] = (sum(p in found for p in planted[kind]) / len(planted[kind]),
                             len(found - set(planted[kind])))
        any_quality = {i.path for i in result.issues if i.kind in ("dark", "light", "blurry", "low_information",
                                                                   "odd_aspect_ratio", "tiny")}
        fp_quality = len(any_quality - set(planted["dark"]) - set(planted["blurry"]))
        root = str(data) + "/"

    lines = [f"# bench_review: {args.dataset} ({result.images['train']} training, {result.images['test']} test "
             f"images after planting), {args.folds} folds, {result.method['backbone']} at "
             f"{result.method['image_size']} px", "",
             f"Review time, cold (decoding, features, folds, copies, quality): {seconds:.0f} s; the out-of-fold "
             f"label step alone from the features: {label_seconds:.1f} s.", "",
             "## Label issues", ""] + label_table(rows)
    lines += ["", "## Copies and leaks", "",
              f"- exact copies in test found as leaks: {exact_found}/20",
              f"- near copies (60%, JPEG 70, 5% crop) in test found as leaks: {near_found}/20",
              f"- other images flagged as copies: {len(others)} of {n_images - 40} "
              f"({len(others) / (n_images - 40):.2%})"] + judged_lines(others, root, args.dataset, n_images - 40) + [
              "",
              "## Images that teach nothing", ""]
    for kind, (recall, fp) in quality.items():
        lines.append(f"- {kind}: {recall:.0%} of 10 planted found; {fp} other images flagged {kind}")
    lines.append(f"- any quality flag on a normal photo: {fp_quality} of {normal} ({fp_quality / normal:.2%})")
    lines += ["", "Other copies flagged (for a person to judge):"] + [
        f"- {p.replace(root, '')} ~ {copy_found[p].other.replace(root, '')} ({copy_found[p].kind}, "
        f"{copy_found[p].score})" for p in others[:20]]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
