"""Does serving and scraping metrics disturb the loop? Tick lateness (start minus deadline) of real
`rtloop run`s with metrics off, served but not scraped, and scraped every second from another process.

    python grafana/measure_scrape_jitter.py --repeats 2 -- --rate 10 --max-steps 150

Conditions are interleaved (off, served, scraped, off, ...) so a change in machine load hits all of them.
Prints a Markdown table and writes the numbers as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from rtloop.metrics.promapi import free_port
from rtloop.runtime.trace import read_trace

CONDITIONS = ("off", "served", "scraped")


def scrape_every_second(url: str, stop: threading.Event, durations: list[float]) -> None:
    """What Prometheus does at a 1 s interval. This thread lives in this process, not in rtloop's."""
    while not stop.wait(1.0):
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                resp.read()
            durations.append(time.perf_counter() - t0)
        except OSError:
            pass  # the run has not started serving yet, or has stopped


def one_run(condition: str, run_args: list[str], trace: Path) -> dict:
    port = free_port() if condition != "off" else 0
    cmd = [sys.executable, "-m", "rtloop", "run", *run_args, "--quiet", "--metrics-port", str(port),
           "--trace", str(trace)]
    stop, durations = threading.Event(), []
    scraper = None
    if condition == "scraped":
        url = f"http://127.0.0.1:{port}/metrics"
        scraper = threading.Thread(target=scrape_every_second, args=(url, stop, durations))
        scraper.start()
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})
    finally:
        stop.set()
        if scraper is not None:
            scraper.join()
    ticks = [r for r in read_trace(trace) if r["kind"] == "tick"]
    return {
        "lateness_s": [r["lateness_s"] for r in ticks],
        "interval_s": [r["interval_s"] for r in ticks if r["interval_s"] is not None],
        "overruns": sum(r["overrun_s"] > 0 for r in ticks),
        "scrape_s": durations,
    }


def summarize(runs: list[dict]) -> dict:
    late = np.array([x for r in runs for x in r["lateness_s"]]) * 1e3
    interval = np.array([x for r in runs for x in r["interval_s"]]) * 1e3
    scrape = np.array([x for r in runs for x in r["scrape_s"]]) * 1e3
    p = lambda a, q: round(float(np.percentile(a, q)), 3) if len(a) else None  # noqa: E731
    return {
        "ticks": int(len(late)),
        "lateness_ms": {"p50": p(late, 50), "p95": p(late, 95), "p99": p(late, 99), "max": p(late, 100)},
        "interval_ms": {"p50": p(interval, 50), "p99": p(interval, 99)},
        "overrun_ticks": int(sum(r["overruns"] for r in runs)),
        "scrapes": int(len(scrape)),
        "scrape_ms_p50": p(scrape, 50),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    parser.add_argument("run_args", nargs="*", help="after --: arguments for `rtloop run`")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {c: [] for c in CONDITIONS}
    with tempfile.TemporaryDirectory(prefix="rtloop-jitter-") as tmp:
        for i in range(args.repeats):
            for condition in CONDITIONS:
                print(f"run {i + 1}/{args.repeats}: metrics {condition}", flush=True)
                runs[condition].append(one_run(condition, args.run_args, Path(tmp) / f"{condition}-{i}.jsonl"))
    result = {
        "command": f"rtloop run {' '.join(args.run_args)}",
        "machine": f"{os.uname().nodename}, {os.cpu_count()} CPUs",
        "conditions": {c: summarize(runs[c]) for c in CONDITIONS},
    }
    print(f"\n{result['command']} on {result['machine']}, {args.repeats} runs each, interleaved\n")
    print("| metrics | ticks | lateness p50 | p95 | p99 | max | interval p99 | overrun ticks | scrape p50 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, s in result["conditions"].items():
        late = s["lateness_ms"]
        scrape = f"{s['scrape_ms_p50']} ms ({s['scrapes']})" if s["scrapes"] else "-"
        print(f"| {c} | {s['ticks']} | {late['p50']} ms | {late['p95']} ms | {late['p99']} ms | {late['max']} ms "
              f"| {s['interval_ms']['p99']} ms | {s['overrun_ticks']} | {scrape} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
