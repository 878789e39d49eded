"""`rtloop sweep`: success against latency. A grid of latency (fixed values or profiles) x mode (async,
sync) x tasks x init states, episodes in parallel worker processes, one results JSONL appended per episode
(a rerun resumes), then per cell: success rate with its Wilson 95% interval, fresh fraction, action age
p50/p95, episode length, as table.md and table.json, and success_vs_latency.png.

Exit status: 0 when every episode ran to its end; 1 when some ended on an error (in the results, run again
by a rerun); 2 on bad input (one line, nothing started); 130 on Ctrl-C or SIGTERM (what finished is kept).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    import os

    from rtloop.eval.session import add_run_arguments

    p.add_argument("--latency", default="0",
                   help="latencies per inference in seconds, added to the model's own (--inject-delay), e.g. "
                        "0,0.05,0.1 (default 0)")
    p.add_argument("--latency-profile", type=Path, nargs="+", action="extend", default=[], metavar="FILE",
                   help="latency profiles (trace or bench files) to replay, one cell each per mode")
    p.add_argument("--latency-scale", type=float, default=1.0,
                   help="scale every latency by this (a projection to a slower or faster machine)")
    p.add_argument("--mode", default="async,sync", help="async, sync or both (default async,sync)")
    p.add_argument("--tasks", default="0", help="task ids, e.g. 0-9 or 0,3 (default 0)")
    p.add_argument("--episodes", type=int, default=10, help="init states per task: 0..N-1 (default 10)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes, one env each (default: the machine's cores)")
    add_run_arguments(p)


def main(args: argparse.Namespace) -> int:
    from rtloop.errors import InputError
    from rtloop.eval import grid, report, session

    latencies = grid.parse_latencies(args.latency) if args.latency else []
    modes = grid.parse_modes(args.mode)
    tasks = grid.parse_ids(args.tasks, "--tasks")
    episodes = session.check_episodes(args.episodes)
    workers = session.check_workers(args.workers, "--workers")
    for path in args.latency_profile:
        if not path.is_file():
            raise InputError(f"--latency-profile {path}: no such file")
    if not latencies and not args.latency_profile:
        raise InputError("nothing to sweep: give --latency values or --latency-profile files")
    if not args.latency_scale > 0:
        raise InputError(f"--latency-scale must be > 0 (got {args.latency_scale:g})")
    shared = {**({"latency_scale": args.latency_scale} if args.latency_scale != 1.0 else {})}
    cells = grid.sweep_cells(latencies, args.latency_profile, modes, {**shared, **session.run_options(args)})
    specs = session.prepare_specs(cells, tasks, args.checkpoint, workers, args.out / "traces" if args.traces else None)
    keys = grid.episode_keys(cells, tasks, episodes)

    outcome = session.run_session(args.out, {"cells": cells}, specs, keys, workers, "sweep")
    notes = [f"suite {args.suite}, tasks {args.tasks}, init states 0-{episodes[-1]} per task, {args.rate:g} Hz, "
             f"{args.clock} clock",
             "latency: a delay added to every inference on top of the model's own time"
             + (f", scaled x{args.latency_scale:g} (a projection)" if args.latency_scale != 1.0 else ""),
             "fresh: ticks that applied an action for the first time; 95% CI: Wilson score interval"]
    md, doc = report.sweep_tables(cells, outcome.rows, notes)
    report.write_tables(args.out, md, doc)
    report.plot_success_vs_latency(doc, args.out / "success_vs_latency.png")
    print(md)
    print(f"plot: {args.out / 'success_vs_latency.png'}")
    return session.finish(outcome, keys, args.out)
