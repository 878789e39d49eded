"""`rtloop run --envs N`: the fleet, with `rtloop run`'s outputs (trace, summary, live view, Prometheus).

The checks come first and cost nothing: N against the cores (one env per worker: a sim that shares a core
cannot hold its rate), options that have no fleet form, an unreachable Ray address.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack

from rtloop.errors import InputError

# `rtloop run` options that have no fleet form yet, and why
NOT_IN_FLEET = {
    "video": "--video",
    "policy_process": "--policy-process (the fleet's policy already runs beside the envs, not under their GIL)",
}


def check_envs(envs: int, cores: int, oversubscribe: bool, where: str = "this machine") -> None:
    if envs < 1:
        raise InputError(f"--envs must be >= 1 (got {envs})")
    if envs > cores and not oversubscribe:
        raise InputError(f"--envs {envs} is more than {where}'s {cores} cores (one env per worker, each needs a "
                         f"core to hold its rate); pass --oversubscribe to run them anyway")


def validate_fleet(args: argparse.Namespace) -> None:
    from rtloop.commands import run as command

    if args.envs is None:
        args.envs = 1
    args.device_requested, args.engine_requested = args.device, args.engine
    for name, what in NOT_IN_FLEET.items():
        if getattr(args, name):
            raise InputError(f"{what} does not work with --envs yet")
    if args.address is not None and args.backend != "ray":
        raise InputError("--address is for --backend ray")
    if args.backend == "local":
        check_envs(args.envs, os.cpu_count() or 1, args.oversubscribe)
    else:
        from rtloop.fleet import ray_backend

        ray_backend.check_address(args.address)
        command.validate(args)  # the rest of the cheap checks before Ray starts
        ray_backend.start_ray(args.address)
        cpus, gpus = ray_backend.cluster_resources()
        check_envs(args.envs, cpus, args.oversubscribe, where="the Ray cluster")
        if args.device_requested == "auto" and gpus and not args.device.startswith("cuda"):
            args.device = "cuda"  # the policy actor holds one of the cluster's GPUs, not this machine's
            args.engine = None if args.engine_requested is None else args.engine_requested
    command.validate(args)


def env_spec(args: argparse.Namespace) -> dict:
    """What an env worker needs to build its env and run its episodes (plain values: it crosses to the
    worker): the env's options, the loop's config, the clock and, for the virtual clock, the latency model's
    options (the worker builds the model; on the wall clock the policy is padded instead)."""
    from dataclasses import asdict

    from rtloop.commands import run as command

    return {"sim": args.sim, "suite": args.suite, "seed": args.seed,
            "replay": None if args.replay is None else str(args.replay),
            "loop": asdict(command.loop_config(args)), "clock": args.clock,
            "latency": {"inject_delay": args.inject_delay, "latency_profile": args.latency_profile,
                        "latency_scale": args.latency_scale, "latency_order": args.latency_order}}


def make_backend(args: argparse.Namespace, checkpoint, envs: int, log_path: str | None):
    """Where the env workers and the policy live: local processes and this process, or Ray actors (Ray
    started by validate_fleet). Builds the policy (`rtloop run`'s factory, on args.device)."""
    from rtloop.commands import run as command

    if args.backend == "ray":
        from rtloop.fleet import ray_backend

        return ray_backend.RayBackend(args.device, env_spec(args), envs, command.build_policy,
                                      (args, checkpoint, args.device))
    from rtloop.fleet.local import LocalBackend

    return LocalBackend(env_spec(args), log_path, command.build_policy, (args, checkpoint, args.device))


def make_fleet(args: argparse.Namespace, backend, envs: int, sinks):
    from rtloop.commands.run import report_warm
    from rtloop.fleet.fleet import Fleet
    from rtloop.fleet.worker import waits_for_actions

    return Fleet(backend.make_link, envs, backend.policies, sinks, args.suite, waits=waits_for_actions(env_spec(args)),
                 report_warm=report_warm)


def policy_threads(envs: int) -> int:
    """On CPU, torch gets the cores the env workers leave (at least one)."""
    return max(1, (os.cpu_count() or 1) - envs)


def main(args: argparse.Namespace) -> int:
    import anyio

    from rtloop.commands import run as command
    from rtloop.runtime.live import LiveView, run_live_view
    from rtloop.runtime.loop import LoopConfig, first_error
    from rtloop.runtime.records import Fanout, RunRecord
    from rtloop.runtime.summary import RecordLog, format_summary, summarize
    from rtloop.runtime.trace import TraceSink

    from rtloop.sim.versions import mujoco_version_warning

    validate_fleet(args)
    checkpoint = command.resolve_checkpoint(args.checkpoint)
    mujoco_warning = mujoco_version_warning() if args.sim == "libero" else None
    if mujoco_warning:  # once, after the input checks, as `rtloop run` does
        print(f"rtloop: warning: {mujoco_warning}", file=sys.stderr)
    device = args.device
    if args.torch_threads is None and device == "cpu":
        args.torch_threads = policy_threads(args.envs)
    trace_path = args.trace or command.default_trace_path()
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    workers_log = trace_path.with_name("workers.log")
    assignments = [(args.task, e) for e in range(args.episode_start, args.episode_start + args.episodes)]
    envs = min(args.envs, len(assignments))

    with ExitStack() as cleanup:
        backend = make_backend(args, checkpoint, envs, str(workers_log))
        cleanup.callback(backend.close)
        log, trace = RecordLog(), TraceSink(trace_path)
        cleanup.callback(trace.close)
        sinks = [log, trace]
        if args.metrics_port:
            from rtloop.metrics.exporter import PrometheusSink, start_metrics_server

            prometheus = PrometheusSink()
            cleanup.callback(start_metrics_server(args.metrics_port, prometheus.registry).close)
            sinks.append(prometheus)
        config = LoopConfig(rate=args.rate, max_steps=args.max_steps)
        fanout = Fanout(sinks)
        fleet = make_fleet(args, backend, envs, fanout)
        cleanup.callback(fleet.close)
        label = backend.policies[0][0].label
        title = (f"rtloop run: {label} | fleet of {envs} envs ({args.backend}) | {args.sim} {args.suite} task "
                 f"{args.task} | {'sync' if args.sync else 'async'} at {args.rate:g} Hz, {args.clock} clock, "
                 f"on {device}")
        live = None

        async def run_all() -> None:
            nonlocal live
            await fleet.prepare(assignments)
            info = fleet.slots[0].info
            fanout.on_record(RunRecord({
                "rate": args.rate, "suite": args.suite, "task": args.task, "engine": args.engine, "sync": args.sync,
                "clock": args.clock,
                "envs": envs, "backend": args.backend, "policy": label, "mujoco_warning": mujoco_warning, "random_weights": "RANDOM WEIGHTS" in label,
                "sim": info["label"], "instruction": info["instruction"], "horizon": info["horizon"],
                "steps_limit": info["steps_limit"], "checkpoint": str(checkpoint), "device": device,
                "torch_threads": args.torch_threads, "policy_replicas": len(backend.policies),
                "config": {k: str(v) if k in ("checkpoint", "replay", "trace") else v
                           for k, v in vars(args).items() if not k.startswith("_")},
                "machine": command.machine(device), "versions": command.versions(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }))
            async with anyio.create_task_group() as tg:
                if not args.quiet:
                    live = LiveView(title, config.steps_limit(info["horizon"]), args.episodes)
                    fanout.sinks.append(live)
                    tg.start_soon(run_live_view, live)
                await fleet.run()
                tg.cancel_scope.cancel()

        interrupted = False
        try:
            anyio.run(run_all)
        except KeyboardInterrupt:
            interrupted = True
        except ExceptionGroup as group:  # an InputError from a worker (an episode past the init states)
            raise first_error(group) from None
        summary = summarize(log.records)
        summary["run"] = log.info
        summary["interrupted"] = interrupted
        summary_path = trace_path.with_name("summary.json")
        summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(format_summary(summary, title))
        where = f"  worker output: {workers_log}" if args.backend == "local" else ""
        print(f"trace: {trace_path}  summary: {summary_path}{where}")
    if interrupted:
        print("rtloop: interrupted", file=sys.stderr)
        return 130
    return 1 if any(e["error"] for e in summary["episodes"]) else 0
