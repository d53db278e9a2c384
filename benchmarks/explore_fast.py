"""How the `fast` preset was chosen: partial fine-tuning settings compared on a held-out
VALIDATION split of each training set (the test split is printed too, but not used to choose).

For each dataset, backbone and trainable depth the frozen layers' outputs are computed once
(the engine's FeatureCache) and every learning rate in the grid trains from the same starting
weights on them, so a grid costs little more than its first cell.

    python benchmarks/explore_fast.py --datasets seefood hymenoptera --backbones efficientnet_lite0 \
        --stages head 1 2 3 --lrs 0.003 0.01 0.03 --out benchmarks/results/explore_fast.md
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASETS = ROOT.parent / "shared" / "datasets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["seefood", "hymenoptera"])
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    parser.add_argument("--stages", nargs="+", default=["head", "1", "2", "3"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.003, 0.01, 0.03])
    parser.add_argument("--head-lr-mults", nargs="+", type=float, default=[10.0])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=0, help="0: each backbone's native size")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fp32-cache", action="store_true", help="store cached activations in float32")
    parser.add_argument("--crop-scale", type=float, default=0.0, help="RandomResizedCrop's smallest area "
                        "(0: the setting's default)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.fp32_cache:
        import torch

        from finetune_core import activations

        activations.FEATURE_DTYPE = torch.float32

    from finetune_core.config import preset_config
    from finetune_core.engine import Reporter, final_test, run_epoch, setup, split_for
    from finetune_core.models import BACKBONES
    from finetune_core.runs import RunDir

    lines = ["| dataset | backbone | px | views | stages | lr | head x | final val acc | best val acc | val acc by "
             "epoch | test acc (best-val checkpoint) | cache s | train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.datasets:
        for backbone in args.backbones:
            size = args.image_size or BACKBONES[backbone].native_size
            for stages in args.stages:
                with tempfile.TemporaryDirectory() as scratch:
                    config = preset_config("fast", data=str(DATASETS / name), backbone=backbone, image_size=size,
                                           train_stages=stages, feature_views=args.views, epochs=args.epochs,
                                           val_fraction=args.val_fraction, lr=args.lrs[0],
                                           batch_size=args.batch_size,
                                           **({"crop_scale": args.crop_scale} if args.crop_scale else {}))
                    run = RunDir(scratch)
                    reporter = Reporter(run, None, None)
                    ctx = setup(config, run, reporter)
                    t0 = time.perf_counter()
                    _, cache = split_for(ctx, stages, reporter)
                    if cache is not None:
                        for view in range(args.views):
                            cache.get("train", view)
                        cache.get("val"), cache.get("val", flip=True)
                    cache_s = time.perf_counter() - t0
                    start_model = copy.deepcopy(ctx.model.state_dict())
                    start_optimizer = copy.deepcopy(ctx.optimizer.state_dict())
                    for lr in args.lrs:
                        for mult in args.head_lr_mults:
                            ctx.model.load_state_dict(start_model)
                            ctx.optimizer.load_state_dict(start_optimizer)
                            for g in ctx.optimizer.param_groups:
                                g["initial_lr"] = lr * (mult if g["name"] == "head" else 1.0)
                            ctx.config = ctx.config.replace(lr=lr, head_lr_mult=mult)
                            ctx.step, ctx.best_score, ctx.epochs_without_gain = 0, -1.0, 0
                            for f in ("checkpoint_best.pt", "checkpoint_last.pt"):
                                run.file(f).unlink(missing_ok=True)
                            t1 = time.perf_counter()
                            vals = [run_epoch(ctx, e, reporter)["val_acc"] for e in range(args.epochs)]
                            train_s = time.perf_counter() - t1
                            _, test_acc, _ = final_test(ctx, reporter)
                            line = (f"| {name} | {backbone} | {size} | {args.views} | {stages} | {lr:g} | {mult:g} | "
                                    f"{vals[-1]:.3f} | {max(vals):.3f} | "
                                    + " ".join(f"{v:.2f}" for v in vals)
                                    + f" | {test_acc:.3f} | {cache_s:.0f} | {train_s:.0f} |")
                            print(line, flush=True)
                            lines.append(line)
                    for c in ctx.caches.values():
                        c.close()
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
