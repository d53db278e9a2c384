"""Issue 24's folder goal (1,000 images in under 60 s on this CPU with the default backbone): the
time of `Predictor.predict_folder` (what `predict --run RUN DIR --csv out.csv` runs) with ResNet-18
at 224 px, one view (the default run has no flip TTA), random weights (the time does not depend on
them). `--code DIR` imports finetune_core from DIR instead, e.g. the code before a change unpacked
with `git archive COMMIT finetune_core | tar -x -C DIR`, to give a ratio measured in the same session:

    python benchmarks/bench_folder_speed.py --folder ../shared/datasets/seefood [--code /tmp/old] [--repeat 2]

Prints wall and CPU time (resource.getrusage) per pass and the load average before and after.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True)
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="where finetune_core is")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, args.code)
    import torch

    from finetune_core.models import build_model
    from finetune_core.predict import Predictor, image_files

    files = image_files(args.folder)[:args.images]
    predictor = Predictor(build_model("resnet18", 2, weights="none"), ["a", "b"], 224, (0.485, 0.456, 0.406),
                          (0.229, 0.224, 0.225), "resnet18")
    predictor.predict_many(((str(f), f.read_bytes) for f in files[:8]))  # warm up
    for _ in range(args.repeat):
        before, cpu0, t0 = load_avg(), cpu_seconds(), time.perf_counter()
        results = predictor.predict_many(((str(f), f.read_bytes) for f in files), total=len(files))
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        print(f"{args.code}: {len(results)} images in {wall:.1f} s wall, {cpu:.1f} s CPU "
              f"({len(results) / wall:.1f} images/s, {torch.get_num_threads()} threads); load {before} -> {load_avg()}",
              flush=True)


if __name__ == "__main__":
    main()
