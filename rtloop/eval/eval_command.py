"""`rtloop eval`: a suite's success rate per task in one command. All its tasks (or a list), the first N
init states of each, one cell of `rtloop run` options, episodes in N worker processes (`--envs N`, one env
each), results appended per episode (a rerun resumes), then a per-task table with Wilson 95% intervals
and episodes per hour, as table.md and table.json.

Exit status as `rtloop sweep`'s: 0, 1 (some episode ended on an error), 2 (bad input), 130 (interrupted).
"""

from __future__ import annotations

import argparse


def backends() -> dict:
    """--backend -> how the episodes run: a function with rtloop.eval.pool.run_episodes's signature. A batched
    fleet (one policy serving N envs) or Ray actors go here; a backend the choices name but this dict lacks
    is refused with one line."""
    from rtloop.eval.pool import run_episodes

    return {"local": run_episodes}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from rtloop.eval.session import INIT_STATES, add_run_arguments

    p.add_argument("--tasks", default=None, help="task ids, e.g. 0,3 or 0-4 (default: every task of the suite)")
    p.add_argument("--episodes", type=int, default=INIT_STATES,
                   help=f"init states per task: 0..N-1 (default {INIT_STATES}, the official protocol)")
    p.add_argument("--envs", type=int, default=1, help="envs, each in its own worker process (default 1)")
    p.add_argument("--sync", action="store_true",
                   help="the blocking loop of the official evaluation: the sim waits for the model every tick")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local worker processes (default), or Ray actors")
    p.add_argument("--address", default=None, help="Ray cluster address for --backend ray")
    add_run_arguments(p)


def suite_tasks(args: argparse.Namespace) -> list[int]:
    """Every task of the suite: LIBERO's list, or the recording's for --sim replay."""
    if args.sim == "replay":
        import numpy as np

        from rtloop.sim import DEFAULT_RECORDING

        with np.load(args.replay or DEFAULT_RECORDING, allow_pickle=False) as data:
            return sorted(data["task_ids"].tolist())
    from rtloop.sim.libero_env import load_task

    bench, _ = load_task(args.suite, 0)
    return list(range(bench.n_tasks))


def main(args: argparse.Namespace) -> int:
    from rtloop.errors import InputError
    from rtloop.eval import grid, report, session

    runner = backends().get(args.backend)
    if runner is None:
        raise InputError(f"--backend {args.backend} is not in rtloop yet (the local worker pool is)")
    if args.address is not None:
        raise InputError("--address is for --backend ray")
    episodes = session.check_episodes(args.episodes)
    workers = session.check_workers(args.envs, "--envs")
    if args.replay is not None and not args.replay.is_file():
        raise InputError(f"--replay {args.replay}: no such file")
    tasks = grid.parse_ids(args.tasks, "--tasks") if args.tasks is not None else suite_tasks(args)
    mode = "sync" if args.sync else "async"
    cells = {"eval": {"mode": mode, "run": {**session.run_options(args), "sync": args.sync}}}
    specs = session.prepare_specs(cells, tasks, args.checkpoint, workers, args.out / "traces" if args.traces else None)
    keys = grid.episode_keys(cells, tasks, episodes)

    outcome = session.run_session(args.out, {"cells": cells}, specs, keys, workers, f"eval {args.suite}", runner)
    throughput = {"episodes": outcome.ran, "wall_s": outcome.wall_s, "workers": workers,
                  "episodes_per_hour": 3600 * outcome.ran / outcome.wall_s if outcome.ran else None,
                  "includes": "worker start, env and policy builds"}
    notes = [f"suite {args.suite}, init states 0-{episodes[-1]} per task, {mode}, {args.rate:g} Hz, {args.clock} clock",
             "95% CI: Wilson score interval; fresh: ticks that applied an action for the first time"]
    md, doc = report.eval_tables(outcome.rows, notes, throughput)
    report.write_tables(args.out, md, doc)
    print(md)
    return session.finish(outcome, keys, args.out)
