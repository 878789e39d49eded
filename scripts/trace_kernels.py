"""GPU kernels of a torch profiler trace (rtloop.profiling.torch_trace output), totalled by name, as Markdown.

    python scripts/trace_kernels.py profiles/<dir>/torch_trace.json.gz [--calls 5] [--top 25]

Runs anywhere (reads the JSON only). Per profiled call: total kernel time, and each kernel's ms, launches
and mean duration, largest first: where the GPU time of `generate` goes.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--calls", type=int, default=5, help="policy.act calls the trace holds (default 5)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    total, count = collections.Counter(), collections.Counter()
    for e in kernels:
        total[e["name"]] += e["dur"]
        count[e["name"]] += 1
    n = args.calls
    print(f"{len(kernels) / n:.0f} kernels and {sum(total.values()) / 1000 / n:.2f} ms of kernel time per call\n")
    print("| ms per call | launches per call | mean us | kernel |\n|---:|---:|---:|---|")
    for name, us in total.most_common(args.top):
        print(f"| {us / 1000 / n:.3f} | {count[name] / n:.0f} | {us / count[name]:.1f} | `{name[:110]}` |")


if __name__ == "__main__":
    main()
