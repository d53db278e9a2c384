"""Where a run's start goes, from a py-spy speedscope profile of its main thread.

    py-spy record --threads --idle -r 50 -f speedscope -o prof.json -- python -m finetune_core train ...
    python benchmarks/profile_timeline.py prof.json [--rate 50] [--until Tensor.backward]

With --idle every sample is a point in wall time, so a sample count / rate is seconds. Each sample of
the main thread (the profile named after the process's first thread) up to the first one that holds
the --until frame is labelled by its innermost three finetune_core frames (or imports); prints the
total per label, then the timeline: consecutive runs of one label of half a second or more.
"""
from __future__ import annotations

import argparse
import collections
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--rate", type=int, default=50, help="py-spy's samples per second (-r)")
    parser.add_argument("--until", default="Tensor.backward", help="stop at the first sample holding this frame")
    args = parser.parse_args()
    profile = json.load(open(args.profile))
    frames = profile["shared"]["frames"]
    main_thread = next(p for p in profile["profiles"] if p["name"].endswith('""') or "MainThread" in p["name"])
    rate = args.rate
    print(main_thread["name"], len(main_thread["samples"]), "samples =", len(main_thread["samples"]) / rate, "s")

    def label(stack: list[int]) -> str:
        kept = [frames[i]["name"] for i in stack
                if "finetune_core" in frames[i].get("file", "") or frames[i]["name"] == "_find_and_load"]
        return " > ".join(kept[-3:])

    runs: list[list] = []
    for k, stack in enumerate(main_thread["samples"]):
        if any(frames[i]["name"] == args.until for i in stack):
            print(f"first {args.until} at sample {k} = {k / rate} s")
            break
        name = label(stack)
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1, k])
    totals = collections.Counter()
    for name, n, _ in runs:
        totals[name] += n
    for name, n in totals.most_common(40):
        print(f"{n / rate:8.1f}s {name}")
    print("--- timeline (runs >= 0.5 s)")
    for name, n, k in runs:
        if n >= rate // 2:
            print(f"{k / rate:7.1f}s +{n / rate:6.1f}s {name}")


if __name__ == "__main__":
    main()
