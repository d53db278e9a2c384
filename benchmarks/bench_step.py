"""The network's own training step, without any data loading: what bounds every loop.

    python benchmarks/bench_step.py [--backbone efficientnet_lite0] [--size 224] [--batches 32 128]

One SGD step (forward, summed cross-entropy, backward, update) on random tensors, for each batch
size, memory layout (NCHW / channels_last) and precision (fp32 / bf16 autocast). Prints images/s.
If Tuneboard's loop trains at the channels_last rate for its batch size, data handling costs nothing
and only a cheaper step (another layout, precision, batch or network) can make it faster.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from finetune_core.models import build_model, device_description  # noqa: E402


def step_rate(backbone: str, size: int, batch: int, channels_last: bool, bf16: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(backbone, 2, "none").train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 2, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y, reduction="sum")
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()
    print(f"{device_description()}, {args.backbone}, {args.size} px")
    print("| batch | layout | precision | images/s |\n|---|---|---|---|")
    for batch in args.batches:
        for channels_last in (False, True):
            for bf16 in (False, True):
                rate = step_rate(args.backbone, args.size, batch, channels_last, bf16, max(2, 128 // batch))
                print(f"| {batch} | {'channels_last' if channels_last else 'NCHW'} | {'bf16' if bf16 else 'fp32'} | "
                      f"{rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
