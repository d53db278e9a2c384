#!/usr/bin/env bash
# GPU readiness, in one command on a machine with a CUDA GPU (under 8 minutes on one GPU: each step is capped):
#   1. every test marked `cuda` (they skip on CPU-only machines; here they must run),
#   2. the speed benchmark on CUDA: the book's loop against Tuneboard's engine, ResNet-18 at 224 px with
#      random weights (`--weights none`: no machine here has internet; throughput does not depend on them),
#   3. a mid-size timm backbone by name (ConvNeXt-Tiny, random weights) one epoch: images/s,
#   4. a big folder: 50,000 generated JPEGs through the fast preset (bench_scale.py; its own limit, see below),
#   5. with several GPUs, 1 process against one per GPU (DDP over NCCL).
# Everything goes to one results file (default benchmarks/results/gpu_check.md), also when a step fails;
# the exit code is that of the first step that failed.
#
#   bash benchmarks/gpu_check.sh [RESULTS_FILE]
#   PYTHON=.venv/bin/python DATA=path/to/dataset bash benchmarks/gpu_check.sh
#
# DATA: a dataset folder for the benchmark; by default a generated set of SYNTHETIC_IMAGES (8192) random
# JPEGs, enough images per epoch to measure thousands of images/s (throughput only: its accuracy means
# nothing). A dry run of the script's steps on a CPU-only machine (the cuda tests then skip):
#   DEVICE=cpu SYNTHETIC_IMAGES=64 EPOCHS=1 bash benchmarks/gpu_check.sh /tmp/gpu_check_dry.md
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${1:-benchmarks/results/gpu_check.md}
STEP_LIMIT_S=${STEP_LIMIT_S:-240}   # no step may take longer: the whole check stays under 8 minutes
DEVICE=${DEVICE:-cuda}
SYNTHETIC_IMAGES=${SYNTHETIC_IMAGES:-8192}
EPOCHS=${EPOCHS:-3}
mkdir -p "$(dirname "$OUT")"
status=0
note() { echo "$*" | tee -a "$OUT"; }
step() {  # step TITLE COMMAND...: run it under the time limit, its output into the results file
  local title=$1; shift
  note ""; note "## $title"; note ""; note '```'; note "\$ $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$STEP_LIMIT_S" "$@" 2>&1 | tail -n 60 | tee -a "$OUT"
  local rc=${PIPESTATUS[0]}
  note "(exit $rc after $((SECONDS - t0)) s)"; note '```'
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
  return 0
}

: > "$OUT"
note "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
note ""
note '```'
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi: not found"; } | tee -a "$OUT"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "GPUs", torch.cuda.device_count())' 2>&1 | tee -a "$OUT"
note '```'
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  note ""; note "No CUDA GPU on this machine: nothing to check."; exit 1
fi
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')

step "Tests marked cuda" "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider

DATA=${DATA:-}
if [ -z "$DATA" ]; then
  DATA=$(mktemp -d)/synthetic
  "$PYTHON" - "$DATA" "$SYNTHETIC_IMAGES" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, rng = Path(sys.argv[1]), np.random.default_rng(0)
n_train = int(sys.argv[2])
for split, n in (("train", n_train), ("test", max(16, n_train // 8))):
    for k, name in enumerate(("a", "b")):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(n // 2):
            pixels = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8) // 2 + 100 * k
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
print(f"generated {root}: {n_train} training and {max(16, n_train // 8)} test images (random, 320x256 JPEG)")
EOF
fi
note ""; note "Benchmark data: $DATA"

step "Speed: the book's loop and the engine, ResNet-18 224 px, random weights, bf16 on CUDA" \
  "$PYTHON" benchmarks/bench_train.py --data "$DATA" --backbone resnet18 --weights none --device "$DEVICE" \
  --epochs "$EPOCHS" --target 2 --runs book,engine --out "benchmarks/results/gpu_bench_train_$DEVICE.md"

# Any backbone (issue 23): a mid-size timm model by name, ConvNeXt-Tiny, random weights (no internet: the
# architecture is timm's, its weights would come from the hub cache), all layers, one epoch on the same data
# through the command line; its final JSON line holds images_per_s.
step "Any backbone: timm ConvNeXt-Tiny (convnext_tiny.fb_in22k_ft_in1k), random weights, all layers, 1 epoch" \
  "$PYTHON" -m finetune_core train --data "$DATA" --backbone convnext_tiny.fb_in22k_ft_in1k --weights none \
  --lr 0.01 --loss-reduction mean --batch-size 128 --epochs 1 --device "$DEVICE" --runs-dir "$(mktemp -d)" \
  --quiet --json

# Big folders (issue 22 item 5): 50,000 generated 500 x 375 JPEGs through the fast preset, one epoch, cold cache:
# time to the first step, total, peak memory, cache on disk, images/s. Generating them takes every core
# a few minutes, so this step has its own limit (SCALE_LIMIT_S) beyond the 8 minutes above; SCALE_IMAGES=0 skips it.
SCALE_IMAGES=${SCALE_IMAGES:-50000}
if [ "$SCALE_IMAGES" -gt 0 ]; then
  STEP_LIMIT_S=${SCALE_LIMIT_S:-900} step "Big folder: $SCALE_IMAGES synthetic JPEGs, fast preset, 1 epoch, cold cache" \
    "$PYTHON" benchmarks/bench_scale.py --sizes "$SCALE_IMAGES" --presets fast --epochs 1 --device "$DEVICE" \
    --out "benchmarks/results/gpu_bench_scale_$DEVICE.md"
fi

if [ "$GPUS" -gt 1 ] && [ "$DEVICE" = cuda ]; then
  step "1 process against $GPUS (DDP, NCCL)" "$PYTHON" benchmarks/bench_ddp.py --data "$DATA" --device cuda \
    --processes "$GPUS" --recipes all --epochs 2 --out benchmarks/results/gpu_bench_ddp.md
else
  note ""; note "One GPU: no DDP scaling figures (tests/test_cuda.py's NCCL test needs 2 GPUs and skips)."
fi
note ""; note "gpu_check: exit $status"
exit "$status"
