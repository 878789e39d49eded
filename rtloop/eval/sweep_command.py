"""`rtloop sweep`: success against latency. A grid of latency (fixed values or profiles) x mode (async,
sync) x tasks x init states, episodes in parallel worker processes, one results JSONL appended per episode
(a rerun resumes), then per cell: success rate with its Wilson 95% interval, fresh fraction, action age
p50/p95, episode length, as table.md and table.json, and success_vs_latency.png.

Exit status: 0 when every episode ran to its end; 1 when some ended on an error (in the results, run again
by a rerun); 2 on bad input (one line, nothing started); 130 on Ctrl-C or SIGTERM (what finished is kept).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    import os

    from rtloop.eval.session import add_run_arguments
    from rtloop.runtime.latency import ORDERS

    p.add_argument("--latency", default="0",
                   help="fixed latencies per inference in seconds, e.g. 0,0.05,0.1 (default 0): each inference takes "
                        "this long in total (`rtloop run --inject-delay`; on the wall clock a faster call is padded "
                        "up to it, a slower one is not shortened); empty for none")
    p.add_argument("--latency-profile", nargs="+", action="extend", default=[], metavar="FILE[:ENGINE]",
                   help="recorded latencies to replay (profiles/latency/*.json, a bench JSON, a trace), one cell "
                        "each per mode")
    p.add_argument("--latency-scale", type=float, default=None, metavar="FACTOR",
                   help="multiply the --latency-profile latencies by FACTOR: a PROJECTION, labelled so")
    p.add_argument("--latency-order", choices=ORDERS, default="iid",
                   help="how profile samples are drawn (as `rtloop run`; default iid, seeded by --seed)")
    p.add_argument("--mode", default="async,sync", help="async, sync or both (default async,sync)")
    p.add_argument("--tasks", default="0", help="task ids, e.g. 0-9 or 0,3 (default 0)")
    p.add_argument("--episodes", type=int, default=10, help="init states per task: 0..N-1 (default 10)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes, one env each (default: the machine's cores)")
    add_run_arguments(p)


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from rtloop.errors import InputError
    from rtloop.eval import grid, report, session
    from rtloop.runtime.latency import load_samples

    latencies = grid.parse_latencies(args.latency) if args.latency else []
    modes = grid.parse_modes(args.mode)
    tasks = grid.parse_ids(args.tasks, "--tasks")
    episodes = session.check_episodes(args.episodes)
    workers = session.check_workers(args.workers, "--workers")
    if not latencies and not args.latency_profile:
        raise InputError("nothing to sweep: give --latency values or --latency-profile files")
    if args.latency_scale is not None and not args.latency_profile:
        raise InputError("--latency-scale projects the --latency-profile latencies; a fixed --latency is what it says")
    scale = 1.0 if args.latency_scale is None else args.latency_scale
    # where the plot puts a profile: its median, scaled (a bad file or scale: one line from rtloop run's checks)
    profiles = {spec: float(np.median(load_samples(spec).seconds)) * scale for spec in args.latency_profile}
    profile_run = {"latency_order": args.latency_order,
                   **({} if args.latency_scale is None else {"latency_scale": args.latency_scale})}
    cells = grid.sweep_cells(latencies, profiles, modes, session.run_options(args), profile_run)
    specs = session.prepare_specs(cells, tasks, args.checkpoint, workers, args.out / "traces" if args.traces else None)
    keys = grid.episode_keys(cells, tasks, episodes)

    outcome = session.run_session(args.out, {"cells": cells}, specs, keys, workers, "sweep")
    notes = [f"suite {args.suite}, tasks {args.tasks}, init states 0-{episodes[-1]} per task, {args.rate:g} Hz, "
             f"{args.clock} clock",
             "latency: the total time of each inference" + (
                 ", a call padded up to it and never shortened" if args.clock == "wall" else ""),
             *([f"profiles scaled x{args.latency_scale:g}: a PROJECTION, not a measurement"]
               if args.latency_scale is not None else []),
             "fresh: ticks that applied an action for the first time; 95% CI: Wilson score interval"]
    md, doc = report.sweep_tables(cells, outcome.rows, notes)
    report.write_tables(args.out, md, doc)
    report.plot_success_vs_latency(doc, args.out / "success_vs_latency.png")
    print(md)
    print(f"plot: {args.out / 'success_vs_latency.png'}")
    return session.finish(outcome, keys, args.out)
