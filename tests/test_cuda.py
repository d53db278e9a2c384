"""What needs a CUDA GPU: marked `cuda`, skipped with the reason elsewhere; benchmarks/gpu_check.sh runs them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_train_config
from finetune_core import prepare
from finetune_core.engine import train

pytestmark = pytest.mark.cuda


def test_a_tiny_run_trains_on_the_gpu_with_bf16(tiny_dataset, tmp_path, cache_dir):
    config = tiny_train_config(tiny_dataset, device="cuda", precision="auto", epochs=3)
    status = train(config, tmp_path / "run", cache_dir=cache_dir)
    assert status["state"] == "completed", status["message"]
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["device"].startswith("cuda")
    assert record["precision"] == ("bf16 autocast" if torch.cuda.is_bf16_supported() else "fp32")
    assert 0 <= status["test_acc"] <= 1 and status["images_per_s"] > 0


def test_partial_fine_tuning_on_cached_activations_on_the_gpu(tiny_dataset, tmp_path, cache_dir):
    config = tiny_train_config(tiny_dataset, device="cuda", train_stages="1", feature_views=2, epochs=2)
    status = train(config, tmp_path / "run", cache_dir=cache_dir)
    assert status["state"] == "completed", status["message"]


def test_the_gpu_crop_kernel_matches_the_cpu_crops():
    yy, xx = np.meshgrid(np.linspace(0, 255, 64), np.linspace(0, 255, 64), indexing="ij")
    image = np.stack([yy, xx, (yy + xx) / 2]).astype(np.uint8)
    boxes = [(8.0, 8.0, 40.0, 48.0), (0.0, 0.0, 64.0, 64.0), (20.0, 4.0, 60.0, 30.0)]
    on_gpu = prepare.crops_batched(torch.from_numpy(np.stack([image] * 3)).cuda(), boxes, 32)
    assert on_gpu.device.type == "cuda"
    per_image = prepare.crops_per_image([image] * 3, boxes, 32)
    assert (on_gpu.cpu().float() - per_image.float()).abs().mean() < 2.0


def test_two_gpus_train_one_run_with_nccl(tiny_dataset, tmp_path, cache_dir):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs for NCCL (one process per GPU); this machine has {torch.cuda.device_count()}")
    from test_distributed import only_run, torchrun, train_flags

    config = tiny_train_config(tiny_dataset, device="cuda", epochs=2)
    done = torchrun(*train_flags(config, tmp_path / "runs"), env={"TUNEBOARD_CACHE": cache_dir})
    assert done.returncode == 0, done.stdout + done.stderr
    status = only_run(tmp_path / "runs").read_status()
    assert status["state"] == "completed" and status["world_size"] == 2 and status["backend"] == "nccl"
