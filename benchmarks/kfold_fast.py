"""Choosing the fast preset by k-fold cross-validation on the TRAINING split only.

A 20-30% validation split of a 250-500 image set holds 50-150 images: one image is 1-2 points of
accuracy, too noisy to rank recipes that differ by one point. Here every training image is held
out once: the frozen layers' outputs are computed once per view for the whole training split
(the engine's FeatureCache), and each fold trains the top on the other folds' rows from the same
starting weights, then scores the held-out rows (centre view + mirror, as the engine does). The
test split is never read.

    python benchmarks/kfold_fast.py --datasets seefood hymenoptera --folds 5 \
        --variants base "stage2:stages=2" "ema:ema=0.99" --out benchmarks/results/kfold_fast.md

A variant is NAME[:key=value,...] over the fast preset; keys: stages, crop (crop_scale), views,
epochs, lr, mult (head_lr_mult), ls (label_smoothing), ema (decay of an exponential moving average
of the trained weights at a constant decay, scored instead of the last weights; 0: off; the engine
ramps its decay up to the setting: min(decay, (1 + t) / (10 + t))), size (image size), ens (an
ensemble of that many tops, each with a new head and other batches, their probabilities averaged), lp
(epochs of the head alone before the schedule starts: LP-FT).

--fraction F keeps a stratified share F of the training split (each class's rows shuffled with the
preset's seed, the first round(F * n) kept), to see how a schedule holds as the set grows. Each row
reports the frozen layers' pass over the views that variant was the first to need (decode included;
0 when earlier variants had computed them) and the training of the top on the cached outputs, in
wall and CPU seconds (the process's CPU time, workers included), summed over the folds.
"""
from __future__ import annotations

import argparse
import copy
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DATASETS = ROOT.parent / "shared" / "datasets"

KEYS = {"stages": ("train_stages", str), "crop": ("crop_scale", float), "views": ("feature_views", int),
        "epochs": ("epochs", int), "lr": ("lr", float), "mult": ("head_lr_mult", float),
        "ls": ("label_smoothing", float), "ema": ("ema", float), "size": ("image_size", int),
        "ens": ("ensemble", int), "lp": ("probe_epochs", int)}


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    values = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        field, kind = KEYS[key]
        values[field] = kind(value)
    return name, values


def folds_of(labels: list[int], k: int, seed: int) -> list[list[int]]:
    """Stratified folds: each class's rows shuffled and dealt round-robin."""
    rng = random.Random(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for c in sorted(set(labels)):
        rows = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(rows)
        for j, row in enumerate(rows):
            folds[j % k].append(row)
    return folds


def stratified_subset(labels: list[int], fraction: float, seed: int) -> list[int]:
    """Positions of a stratified share of the rows: each class's rows shuffled with `seed`, the first
    round(fraction * n) of them kept (at least one), in their original order."""
    rng = random.Random(seed)
    kept: list[int] = []
    for c in sorted(set(labels)):
        rows = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(rows)
        kept += rows[:max(1, round(fraction * len(rows)))]
    return sorted(kept)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (decode workers), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def center_features(ctx, bottom, size: int, crop: float, flip: bool):
    """The frozen bottom's output on every training image's centre view at another test size:
    Resize([size / crop] * 2) + CenterCrop(size) (+ mirror)."""
    import torch
    from torchvision.transforms.v2 import functional as F2

    from finetune_core.activations import FEATURE_DTYPE
    from finetune_core.prepare import normalize_batch

    out = []
    bottom.eval()
    with torch.inference_mode():
        for s in range(0, len(ctx.train_idx), 64):
            idx = ctx.train_idx[s:s + 64]
            src = torch.from_numpy(np.asarray(ctx.data.train_images[np.asarray(idx)]))
            resized = F2.resize(src, [round(size / crop)] * 2, antialias=True)
            x = F2.center_crop(resized, [size, size])
            x = normalize_batch(x.flip(-1) if flip else x, ctx.mean, ctx.std, ctx.config.channels_last)
            with ctx.autocast():
                out.append(bottom(x).to(FEATURE_DTYPE))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["seefood", "hymenoptera"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["base"])
    parser.add_argument("--out", default="")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="keep this stratified share of the training split (0 < F <= 1)")
    parser.add_argument("--eval-views", nargs="+", default=[],
                        help="also score each fold's model on held-out centre views of other sizes: SIZE or "
                             "SIZE/CROP (CROP: the centre crop's share of the resized side, the book's 224/256)")
    args = parser.parse_args()

    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from finetune_core.config import preset_config
    from finetune_core.engine import (Reporter, accuracy_and_loss, batch_loss, batch_slices, evaluate, lr_factor,
                                      resolve_auto, setup, split_for, tensor_batches, train_one_epoch)
    from finetune_core.models import get_head
    from finetune_core.runs import RunDir
    from bench_recipes import four_class_set

    variants = [parse_variant(v) for v in args.variants]
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction {args.fraction}: give a share of the training split in (0, 1]")
    if args.eval_views and any(v.get("ensemble", 1) > 1 for _, v in variants):
        parser.error("--eval-views scores one model per fold; run the ens variants without it")
    header = ("| dataset | train images | variant | settings | mean held-out acc | per fold | frozen pass s (new views, mirror included) "
              "| frozen pass CPU s | train s | train CPU s |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    print(header, flush=True)
    scratch_root = Path(tempfile.mkdtemp(prefix="tb-kfold-"))
    for dataset in args.datasets:
        data_dir = four_class_set(scratch_root) if dataset == "four" else DATASETS / dataset
        # one Setup (and cache) per distinct frozen part and augmentation
        groups: dict[tuple, list] = {}
        for name, values in variants:
            key = (values.get("train_stages"), values.get("crop_scale"), values.get("image_size"))
            groups.setdefault(key, []).append((name, values))
        for (stages, crop, size), members in groups.items():
            base = {k: v for k, v in members[0][1].items() if k in ("train_stages", "crop_scale", "image_size")}
            with tempfile.TemporaryDirectory() as scratch:
                config = preset_config("fast", data=str(data_dir), **base)
                run = RunDir(scratch)
                reporter = Reporter(run, None, None)
                ctx = setup(config, run, reporter)
                cfg = ctx.config
                if args.fraction < 1:
                    all_labels = ctx.data.train_labels[torch.as_tensor(ctx.train_idx)].tolist()
                    ctx.train_idx = [ctx.train_idx[p] for p in stratified_subset(all_labels, args.fraction, cfg.seed)]
                top, cache = split_for(ctx, cfg.train_stages, reporter)
                labels = ctx.data.train_labels[torch.as_tensor(ctx.train_idx)]
                folds = folds_of(labels.tolist(), args.folds, cfg.seed)
                extra = {}
                for spec in args.eval_views:
                    tsize, _, tcrop = spec.partition("/")
                    extra[spec] = [center_features(ctx, cache.bottom, int(tsize), float(tcrop or 224 / 256), flip)
                                   for flip in (False, True)]
                head = get_head(ctx.model, cfg.backbone)
                start_top = copy.deepcopy(top.state_dict())
                start_opt = copy.deepcopy(ctx.optimizer.state_dict())
                for name, values in members:
                    changes = {"epochs": 0, "feature_views": 0, **values}
                    changes.pop("ema", None)
                    changes.pop("ensemble", None)
                    changes.pop("probe_epochs", None)
                    vcfg = resolve_auto(cfg.replace(**changes), ctx.report)
                    # resolve_auto sizes epochs/views for the full training split; keep that
                    views = vcfg.feature_views
                    new_views = (sum(not cache.holds("train", v) for v in range(views))
                                 + (not cache.holds("train", 0, flip=True)))  # the mirror view scored
                    f0, fc0 = time.perf_counter(), cpu_seconds()
                    feats = [cache.get("train", v) for v in range(views)]
                    mirror = cache.get("train", 0, flip=True)
                    frozen_s, frozen_cpu = time.perf_counter() - f0, cpu_seconds() - fc0
                    accs, t0, c0 = [], time.perf_counter(), cpu_seconds()
                    extra_accs = {spec: [] for spec in extra}
                    for f, held in enumerate(folds):
                        held_set = set(held)
                        train_rows = [i for i in range(len(labels)) if i not in held_set]
                        probs = []
                        for m in range(values.get("ensemble", 1)):
                            top.load_state_dict(start_top)
                            torch.manual_seed(vcfg.seed + f + 7919 * m)
                            if m:  # another member: a new head drawn as the engine draws it, other batches and views
                                head.reset_parameters()
                                torch.nn.init.xavier_uniform_(head.weight)
                            ctx.optimizer.load_state_dict(start_opt)
                            for g in ctx.optimizer.param_groups:
                                g["initial_lr"] = vcfg.lr * (vcfg.head_lr_mult if g.get("name") == "head"
                                                             and vcfg.param_groups else 1.0)
                            ema = (AveragedModel(top, multi_avg_fn=get_ema_multi_avg_fn(values["ema"]), use_buffers=True)
                                   if values.get("ema") else None)
                            steps_per_epoch = len(batch_slices(len(train_rows), vcfg.batch_size))
                            total = steps_per_epoch * vcfg.epochs
                            step = 0
                            rng = random.Random(vcfg.seed * 31 + f + 7919 * m)
                            torch.manual_seed(vcfg.seed + f + 7919 * m)

                            def before() -> None:
                                factor = lr_factor(vcfg, step, total)
                                for g in ctx.optimizer.param_groups:
                                    g["lr"] = g["initial_lr"] * factor

                            def after(*_):
                                nonlocal step
                                step += 1
                                if ema is not None:
                                    ema.update_parameters(top)

                            loss_fn = lambda lg, y: batch_loss(lg, y, vcfg.loss_reduction,  # noqa: E731
                                                               vcfg.label_smoothing)
                            rows_t = torch.as_tensor(train_rows)

                            def one_epoch(view: int, before_step, after_step) -> None:
                                order = list(range(len(train_rows)))
                                rng.shuffle(order)
                                train_one_epoch(top, loss_fn, ctx.optimizer,
                                                tensor_batches(feats[view % views][rows_t], labels[rows_t], order,
                                                               vcfg.batch_size, ctx.device, vcfg.channels_last),
                                                before_step, after_step, ctx.autocast)

                            probe_epochs = values.get("probe_epochs", 0)
                            if probe_epochs:  # LP-FT: the head alone first, at its full rate. The rest of the
                                # top: no gradient (so no momentum either) and batch norm in eval mode; the
                                # head keeps its momentum into the fine-tuning
                                for g in ctx.optimizer.param_groups:
                                    g["lr"] = g["initial_lr"]
                                head_ids = {id(q) for q in head.parameters()}
                                for q in top.parameters():
                                    q.requires_grad_(id(q) in head_ids)
                                for epoch in range(probe_epochs):
                                    one_epoch(epoch, lambda: (top.eval(), head.train()), lambda *_: None)
                                for q in top.parameters():
                                    q.requires_grad_(True)
                            for epoch in range(vcfg.epochs):
                                one_epoch(epoch + m, before, after)
                            scorer = ema.module if ema is not None else top
                            held_t = torch.as_tensor(held)

                            def held_batches():
                                for s in range(0, len(held), 256):
                                    idx = held_t[s:s + 256]
                                    xs = [feats[0][idx].float()] + ([mirror[idx].float()] if vcfg.tta_flip else [])
                                    yield xs, labels[idx]

                            logits, y = evaluate(scorer, held_batches(), ctx.autocast)
                            probs.append(torch.softmax(logits.float(), 1))
                        accs.append(accuracy_and_loss(torch.stack(probs).mean(0).log(), y)[1])
                        for spec, (plain, flipped) in extra.items():
                            views_of = lambda idx, a=plain, b=flipped: [a[idx].float()] + (  # noqa: E731
                                [b[idx].float()] if vcfg.tta_flip else [])
                            logits, y = evaluate(scorer, ((views_of(held_t[s:s + 256]), labels[held_t[s:s + 256]])
                                                          for s in range(0, len(held), 256)), ctx.autocast)
                            extra_accs[spec].append(accuracy_and_loss(logits, y)[1])
                    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
                    mean = sum(accs) / len(accs)
                    shown = {k: v for k, v in values.items()}
                    shown.update(train_stages=vcfg.train_stages, views=views, epochs=vcfg.epochs)
                    line = (f"| {dataset} | {len(labels)} | {name} | {' '.join(f'{k}={v}' for k, v in shown.items())} | "
                            f"{mean:.4f} | {' '.join(f'{a:.3f}' for a in accs)} | {frozen_s:.0f} ({new_views}) | "
                            f"{frozen_cpu:.0f} | {seconds:.0f} | {cpu:.0f} |")
                    print(line, flush=True)
                    lines.append(line)
                    for spec, got in extra_accs.items():
                        line = (f"| {dataset} | {len(labels)} | {name} @ {spec} | (scored on centre views {spec}) | "
                                f"{sum(got) / len(got):.4f} | {' '.join(f'{a:.3f}' for a in got)} | | | | |")
                        print(line, flush=True)
                        lines.append(line)
                for c in ctx.caches.values():
                    c.close()
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
