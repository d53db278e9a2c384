"""The network's own training step, without any data loading: what bounds every loop.

    python benchmarks/bench_step.py [--backbone efficientnet_lite0] [--size 224] [--batches 32 128]

One SGD step (forward, summed cross-entropy, backward, update) on random tensors, in a worker
thread as the dashboard trains, for each batch size, memory layout (NCHW / channels_last),
precision (fp32 / bf16 autocast) and glibc malloc settings (its defaults; Tuneboard's set by
GLIBC_TUNABLES when the process starts, as the re-exec did; the same set by mallopt inside the
process, as serve.py and the command line do now), each in a child process. Prints images/s and the share of the time spent
in the kernel (page faults, mostly). If Tuneboard's loop trains at the step's rate for its batch
size, data handling costs nothing and only a cheaper step can make it faster.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune_core import memory  # noqa: E402

if "--mallopt" in sys.argv:  # the child measuring mallopt: before torch or any thread
    assert memory.tune_in_process(), "mallopt refused the settings"

import torch  # noqa: E402
from finetune_core.models import build_model, device_description  # noqa: E402


def step_rate(backbone: str, size: int, batch: int, channels_last: bool, bf16: bool,
              steps: int) -> tuple[float, float, float]:
    """(images/s, share of the CPU time spent in the kernel, CPU seconds per image) over `steps`
    steps after a warm-up one. The CPU time per image moves less than images/s when other work
    shares the machine."""
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
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    seconds, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    sys_s, user_s = cpu1.ru_stime - cpu0.ru_stime, cpu1.ru_utime - cpu0.ru_utime
    return batch * steps / seconds, sys_s / max(sys_s + user_s, 1e-9), (sys_s + user_s) / (batch * steps)


def measure(backbone: str, size: int, batch: int, channels_last: bool, bf16: bool) -> tuple[float, float, float]:
    """step_rate's figures, in a worker thread."""
    out = []
    worker = threading.Thread(target=lambda: out.append(
        step_rate(backbone, size, batch, channels_last, bf16, max(2, 256 // batch))))
    worker.start()
    worker.join()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--layouts", nargs="+", choices=["NCHW", "channels_last"], default=["NCHW", "channels_last"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--allocators", nargs="+", choices=["default", "tunables", "mallopt"],
                        default=["default", "tunables", "mallopt"])
    parser.add_argument("--repeat", type=int, default=1, help="measure each case this many times, interleaved")
    parser.add_argument("--one", nargs=3, type=int, help=argparse.SUPPRESS)  # child: batch channels_last bf16
    parser.add_argument("--mallopt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        rate, kernel, cpu = measure(args.backbone, args.size, args.one[0], bool(args.one[1]), bool(args.one[2]))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e6 if sys.platform == "darwin" else 1e3)
        print(f"RESULT {rate} {kernel} {cpu} {peak_mb}")
        return
    print(f"{device_description()}, {args.backbone}, {args.size} px: `python benchmarks/bench_step.py "
          f"{' '.join(sys.argv[1:])}`".rstrip())
    print("| batch | layout | precision | glibc malloc settings | images/s | time in the kernel | CPU ms per image "
          "| peak memory |\n|---|---|---|---|---|---|---|---|")
    base = memory.untuned_environ()
    allocators = {"default": (base, []), "tunables": (memory.tuned_environ(base), []),
                  "mallopt": (base, ["--mallopt"])} if memory.supported() else {"system": (base, [])}
    allocators = {k: v for k, v in allocators.items() if k in args.allocators or k == "system"}
    for batch in args.batches:
        for channels_last in [layout == "channels_last" for layout in args.layouts]:
            for bf16 in [p == "bf16" for p in args.precisions]:
                for allocator, (env, flags) in [a for _ in range(args.repeat) for a in allocators.items()]:
                    child = [sys.executable, __file__, "--backbone", args.backbone, "--size", str(args.size),
                             "--one", str(batch), str(int(channels_last)), str(int(bf16)), *flags]
                    proc = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
                    rate, kernel, cpu, peak_mb = map(float, proc.stdout.split("RESULT ")[-1].split())
                    print(f"| {batch} | {'channels_last' if channels_last else 'NCHW'} | {'bf16' if bf16 else 'fp32'} "
                          f"| {allocator} | {rate:.1f} | {kernel:.0%} | {cpu * 1000:.0f} | {peak_mb / 1e3:.2f} GB |",
                          flush=True)


if __name__ == "__main__":
    main()
