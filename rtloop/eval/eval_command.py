"""`rtloop eval`: a suite's success rate per task in one command. All its tasks (or a list), the first N
init states of each, one cell of `rtloop run` options, N envs (`--envs N`), results appended per episode
(a rerun resumes), then a per-task table with Wilson 95% intervals, episodes per hour and GPU utilisation,
as table.md and table.json.

How the episodes run depends on the policy. One that batches (OpenVLA) runs on the fleet
(rtloop.eval.fleet_runner): N env workers feeding ONE batched policy, as local processes or, with
`--backend ray`, as Ray actors with the policy an actor holding a GPU. The others run in the worker pool
(rtloop.eval.pool), a policy per worker: the scripted expert keeps state per env, a remote policy has its
own connection per worker. Both give the same rows to the same results file.

Exit status as `rtloop sweep`'s: 0, 1 (some episode ended on an error), 2 (bad input), 130 (interrupted).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from rtloop.eval.session import INIT_STATES, add_run_arguments

    p.add_argument("--tasks", default=None, help="task ids, e.g. 0,3 or 0-4 (default: every task of the suite)")
    p.add_argument("--episodes", type=int, default=INIT_STATES,
                   help=f"init states per task: 0..N-1 (default {INIT_STATES}, the official protocol)")
    p.add_argument("--envs", type=int, default=1,
                   help="envs, each in its own worker (default 1); with OpenVLA they feed one batched policy")
    p.add_argument("--oversubscribe", action="store_true",
                   help="allow --envs beyond this machine's (or the Ray cluster's) cores")
    p.add_argument("--sync", action="store_true",
                   help="the blocking loop of the official evaluation: the sim waits for the model every tick")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local worker processes (default), or Ray actors (env workers and the batched policy)")
    p.add_argument("--address", default=None,
                   help="Ray cluster for --backend ray, e.g. HEAD:6379 (default: start a local cluster)")
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


def check_backend(args: argparse.Namespace) -> bool:
    """Whether the episodes run on the fleet (a batching policy); one line for what cannot run."""
    import os

    from rtloop.commands.policies import parse_policy
    from rtloop.errors import InputError
    from rtloop.fleet.command import check_envs

    on_fleet = parse_policy(args.policy).kind == "openvla"
    if args.address is not None and args.backend != "ray":
        raise InputError("--address is for --backend ray")
    if args.backend == "ray":
        from rtloop.fleet.ray_backend import check_address

        if not on_fleet:
            raise InputError(f"--backend ray runs one batched policy for all envs (--policy openvla); --policy "
                             f"{args.policy} runs a policy per worker process: leave --backend out")
        check_address(args.address)
    else:
        check_envs(args.envs, os.cpu_count() or 1, args.oversubscribe)
    return on_fleet


def main(args: argparse.Namespace) -> int:
    import time

    from rtloop.commands.device import resolve_device
    from rtloop.errors import InputError
    from rtloop.eval import grid, report, session
    from rtloop.eval.gpu import GpuSampler
    from rtloop.eval.pool import run_episodes

    on_fleet = check_backend(args)
    episodes = session.check_episodes(args.episodes)
    if args.replay is not None and not args.replay.is_file():
        raise InputError(f"--replay {args.replay}: no such file")
    tasks = grid.parse_ids(args.tasks, "--tasks") if args.tasks is not None else suite_tasks(args)
    mode = "sync" if args.sync else "async"
    cells = {"eval": {"mode": mode, "run": {**session.run_options(args), "sync": args.sync}}}
    specs = session.prepare_specs(cells, tasks, args.checkpoint, args.envs,
                                  args.out / "traces" if args.traces else None)
    keys = grid.episode_keys(cells, tasks, episodes)
    if on_fleet:
        from rtloop.eval.fleet_runner import FleetRunner, fleet_args

        fleet = fleet_args(specs["eval"], tasks[0], args.envs, args.backend, args.address, args.oversubscribe)
        runner, device = FleetRunner(fleet), fleet.device
        where = "Ray actors" if args.backend == "ray" else "local processes"
        how = f"fleet: one batched policy, env workers as {where}"
    else:
        runner, device, how = run_episodes, resolve_device(args.device), "worker pool: a policy per worker"

    with GpuSampler(args.out / "gpu.csv", device, remote=args.address is not None) as gpu:
        outcome = session.run_session(args.out, {"cells": cells}, specs, keys, args.envs, f"eval {args.suite}", runner)
    ended = time.time()
    started = runner.started if on_fleet else None  # the pool's workers build their policies in their episodes
    calls = [(r["batch_size_mean"], r["inferences"]) for r in outcome.rows if r.get("batch_size_mean")]
    throughput = {"episodes": outcome.ran, "wall_s": outcome.wall_s, "envs": args.envs, "runner": how,
                  "frames_per_policy_call": sum(m * n for m, n in calls) / sum(n for _, n in calls) if calls else None,
                  "episodes_per_hour": 3600 * outcome.ran / outcome.wall_s if outcome.ran else None,
                  "includes": "worker start, env and policy builds"}
    if started is not None and outcome.ran:
        running_s = ended - started
        throughput.update({"setup_s": outcome.wall_s - running_s, "running_s": running_s,
                           "episodes_per_hour_running": 3600 * outcome.ran / running_s})
    notes = [f"suite {args.suite}, init states 0-{episodes[-1]} per task, {mode}, {args.rate:g} Hz, {args.clock} clock",
             "95% CI: Wilson score interval; fresh: ticks that applied an action for the first time"]
    if outcome.interrupted:
        notes.append("interrupted: the episodes per hour count only finished episodes over time that includes the "
                     "unfinished ones (each row's wall_s is its own)")
    if on_fleet and (args.sync or args.clock == "virtual"):
        notes.append("each env waits for its action (sync, virtual clock): the policy batches the frames of the envs "
                     "waiting at the time")
    md, doc = report.eval_tables(outcome.rows, notes, throughput, gpu.summary(started))
    report.write_tables(args.out, md, doc)
    print(md)
    return session.finish(outcome, keys, args.out)
